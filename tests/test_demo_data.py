"""Tests for the synthetic demo shop generator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from propensity.demo import (
    EVENTS_SCHEMA,
    Behaviour,
    DemoDataConfig,
    DemoDataSummary,
    generate_demo_data,
)

END = datetime(2024, 6, 1, tzinfo=timezone.utc)
SMALL = DemoDataConfig(n_users=300, n_items=120, n_categories=8, n_days=30, end_time=END)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoDataSummary, Path, list[str]]:
    out = tmp_path_factory.mktemp("shop")
    messages: list[str] = []
    summary = generate_demo_data(out, DemoDataConfig(end_time=END), progress=messages.append)
    return summary, out, messages


@pytest.fixture(scope="module")
def events(shop: tuple[DemoDataSummary, Path, list[str]]) -> pd.DataFrame:
    return pd.read_parquet(shop[1] / "events.parquet")


@pytest.fixture(scope="module")
def without(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., pd.DataFrame]:
    """The default shop's events with one behaviour switched off: the baseline a behaviour is measured against."""

    def generate(**off: float) -> pd.DataFrame:
        out = tmp_path_factory.mktemp("without")
        config = DemoDataConfig(end_time=END, behaviour=replace(Behaviour(), **off))
        generate_demo_data(out, config, progress=None)
        return pd.read_parquet(out / "events.parquet")

    return generate


def _generate(tmp_path: Path, name: str, config: DemoDataConfig) -> pd.DataFrame:
    generate_demo_data(tmp_path / name, config, progress=None)
    return pd.read_parquet(tmp_path / name / "events.parquet")


def test_files_have_exact_raw_schema(shop: tuple[DemoDataSummary, Path, list[str]]) -> None:
    summary, out, _ = shop
    assert summary.files == [out / "events.parquet", out / "items.parquet", out / "users.parquet"]
    assert pq.read_schema(out / "events.parquet").equals(EVENTS_SCHEMA)
    utc = pa.timestamp("us", tz="UTC")
    assert pq.read_schema(out / "items.parquet").equals(pa.schema([
        ("item_id", pa.string()), ("category_id", pa.string()), ("price", pa.float64()),
        ("available", pa.bool_()), ("brand", pa.string()), ("title", pa.string())]))
    assert pq.read_schema(out / "users.parquet").equals(pa.schema([
        ("user_id", pa.string()), ("signup_time", utc), ("age", pa.int64()),
        ("gender", pa.string()), ("region", pa.string())]))


def test_values_and_ids_look_like_the_raw_feed(events: pd.DataFrame,
                                              shop: tuple[DemoDataSummary, Path, list[str]]) -> None:
    out = shop[1]
    items = pd.read_parquet(out / "items.parquet")
    users = pd.read_parquet(out / "users.parquet")
    assert str(events["event_time"].dtype) == "datetime64[us, UTC]"
    assert set(events["event_type"]) == {"view", "add_to_cart", "purchase", "return"}
    assert events["user_id"].str.fullmatch(r"u\d{6}").all()
    assert events["item_id"].str.fullmatch(r"i\d{5}").all()
    assert items["category_id"].str.fullmatch(r"c\d{2}").all()
    assert items["item_id"].is_unique and len(items) == 500
    assert users["user_id"].is_unique and len(users) == 2000
    assert set(events["item_id"]) <= set(items["item_id"])
    assert set(events["user_id"]) <= set(users["user_id"])
    assert 0.9 < items["available"].mean() < 0.99
    assert (items["price"] > 0).all() and items["category_id"].nunique() == 20
    assert set(users["gender"]) <= {"f", "m", "x"}
    assert 6 <= users["region"].nunique() <= 8
    assert users["age"].between(18, 100).all()
    # Events carry the item's catalog price; quantity is mostly one.
    priced = events.merge(items[["item_id", "price"]], on="item_id", suffixes=("", "_item"))
    assert (priced["price"] == priced["price_item"]).all()
    assert (events["quantity"] >= 1).all() and (events["quantity"] == 1).mean() > 0.9


def test_times_are_sorted_inside_the_window(events: pd.DataFrame,
                                           shop: tuple[DemoDataSummary, Path, list[str]]) -> None:
    summary = shop[0]
    assert summary.end_time == END and summary.start_time == END - timedelta(days=60)
    assert events["event_time"].is_monotonic_increasing
    assert events["event_time"].min() >= pd.Timestamp(summary.start_time)
    assert events["event_time"].max() < pd.Timestamp(END)
    assert events["event_id"].is_unique


def test_sessions_are_short_and_belong_to_one_user(events: pd.DataFrame) -> None:
    sessions = events[events["event_type"] != "return"].groupby("session_id")
    assert (sessions["user_id"].nunique() == 1).all()
    span = sessions["event_time"].max() - sessions["event_time"].min()
    assert span.max() <= pd.Timedelta(hours=2)
    by_session = events.sort_values(["session_id", "event_time"]).groupby("session_id")
    gaps = by_session["event_time"].diff()
    assert pd.Timedelta(seconds=30) < gaps.median() < pd.Timedelta(minutes=10)


def test_summary_matches_the_file(events: pd.DataFrame,
                                  shop: tuple[DemoDataSummary, Path, list[str]]) -> None:
    summary, _, messages = shop
    assert summary.n_events == len(events)
    assert summary.counts_by_type == events["event_type"].value_counts().to_dict()
    assert 10 <= len(messages) <= 12
    assert "purchase=" in messages[-1]


def test_funnel_narrows(shop: tuple[DemoDataSummary, Path, list[str]]) -> None:
    c = shop[0].counts_by_type
    assert c["view"] > c["add_to_cart"] > c["purchase"] > c["return"] > 0
    assert 0.05 < c["add_to_cart"] / c["view"] < 0.15
    assert 0.2 < c["purchase"] / c["add_to_cart"] < 0.5
    assert c["return"] / c["purchase"] < 0.15


def _earlier_share(events: pd.DataFrame, later: str, earlier: str) -> float:
    """Share of `later` events with an `earlier` event of the same user and item before them."""
    late = events[events["event_type"] == later].reset_index()
    early = events[events["event_type"] == earlier]
    pairs = late.merge(early, on=["user_id", "item_id"], suffixes=("", "_early"))
    hit = pairs[pairs["event_time_early"] <= pairs["event_time"]]["index"].nunique()
    return hit / len(late)


def test_purchases_follow_views_and_carts(events: pd.DataFrame) -> None:
    assert _earlier_share(events, "purchase", "view") > 0.8
    assert _earlier_share(events, "purchase", "add_to_cart") > 0.8
    assert _earlier_share(events, "return", "purchase") == 1.0


def test_buying_rises_with_repeat_views(events: pd.DataFrame) -> None:
    views = events[events["event_type"] == "view"].groupby(["user_id", "item_id"]).size()
    bought = events[events["event_type"] == "purchase"].set_index(["user_id", "item_id"]).index
    rate = views.index.isin(bought)
    assert rate[views.to_numpy() >= 5].mean() > 5 * rate[views.to_numpy() == 1].mean()


def test_activity_and_popularity_are_heavy_tailed(events: pd.DataFrame) -> None:
    per_user = events["user_id"].value_counts()
    assert per_user.iloc[:200].sum() / len(events) > 0.4  # top 10% of 2000 users
    per_item = events["item_id"].value_counts()
    assert per_item.iloc[:50].sum() / len(events) > 0.3  # top 10% of 500 items


def test_users_stick_to_favourite_categories(events: pd.DataFrame,
                                             shop: tuple[DemoDataSummary, Path, list[str]]) -> None:
    items = pd.read_parquet(shop[1] / "items.parquet")
    views = events[events["event_type"] == "view"].merge(items[["item_id", "category_id"]])
    per_cat = views.groupby(["user_id", "category_id"]).size().sort_values(ascending=False)
    share = per_cat.groupby(level="user_id").head(3).groupby(level="user_id").sum() / views[
        "user_id"].value_counts()
    heavy = views["user_id"].value_counts().index[:200]
    assert share[heavy].mean() > 0.75  # 20 categories: uniform browsing would give ~0.2


def test_carts_are_abandoned_silently(events: pd.DataFrame) -> None:
    carts = events[events["event_type"] == "add_to_cart"].groupby(["user_id", "item_id"])["event_time"].max()
    bought = events[events["event_type"] == "purchase"].groupby(["user_id", "item_id"])["event_time"].max()
    pairs = carts.to_frame("cart").join(bought.rename("bought"))
    abandoned = pairs[pairs["bought"].isna() | (pairs["bought"] < pairs["cart"])]
    assert 0.4 < len(abandoned) / len(pairs) < 0.9
    # Not just shoppers who left: most of them keep shopping a week later without buying or removing it.
    last_seen = events.groupby("user_id")["event_time"].max()
    later = last_seen.reindex(abandoned.index.get_level_values("user_id")).to_numpy() > (
        abandoned["cart"] + pd.Timedelta(days=7)).to_numpy()
    assert later.mean() > 0.5


def _price_response(events: pd.DataFrame) -> float:
    """Buy rate of viewed (user, item) pairs at >= 2x the user's median viewed price, over the rate at <= it.

    Viewing does not depend on price, so the median viewed price stands in for the shopper's reference.
    """
    views = events[events["event_type"] == "view"]
    pairs = views.groupby(["user_id", "item_id"], as_index=False)["price"].first()
    relative = pairs["price"] / pairs["user_id"].map(views.groupby("user_id")["price"].median())
    purchases = events[events["event_type"] == "purchase"]
    bought = pd.MultiIndex.from_frame(pairs[["user_id", "item_id"]]).isin(
        pd.MultiIndex.from_frame(purchases[["user_id", "item_id"]]))
    return bought[relative.to_numpy() >= 2].mean() / bought[relative.to_numpy() <= 1].mean()


def test_buying_falls_with_price_above_the_shoppers_reference(
        events: pd.DataFrame, without: Callable[..., pd.DataFrame]) -> None:
    response, flat = _price_response(events), _price_response(without(sensitivity_mean=0.0))
    assert response < 0.7 and flat > 0.8, (response, flat)


def _repeat_purchases(events: pd.DataFrame) -> tuple[int, float]:
    """(user, item) pairs bought on two or more days, and the median days between such purchases."""
    purchases = events[events["event_type"] == "purchase"].assign(day=lambda f: f["event_time"].dt.floor("D"))
    days = purchases.drop_duplicates(["user_id", "item_id", "day"]).sort_values("day")
    gaps = days.groupby(["user_id", "item_id"])["day"].diff().dropna().dt.days
    return int((days.groupby(["user_id", "item_id"]).size() >= 2).sum()), float(gaps.median())


def test_consumables_are_bought_again(events: pd.DataFrame, without: Callable[..., pd.DataFrame]) -> None:
    repeats, median_gap = _repeat_purchases(events)
    flat_repeats, _ = _repeat_purchases(without(consumable_share=0.0))
    # Without consumables, repeats are only a shopper stumbling on the same item again.
    assert repeats > 1.6 * flat_repeats, (repeats, flat_repeats)
    assert 5 <= median_gap <= 30


def _category_drift(events: pd.DataFrame, items: pd.DataFrame) -> float:
    """Mean total-variation distance between a shopper's category shares of views in the first and last two weeks."""
    views = events[events["event_type"] == "view"].merge(items[["item_id", "category_id"]])
    start, end = views["event_time"].min().floor("D"), views["event_time"].max().ceil("D")
    shares = []
    for first, last in ((start, start + pd.Timedelta(days=14)), (end - pd.Timedelta(days=14), end)):
        window = views[(views["event_time"] >= first) & (views["event_time"] < last)]
        counts = window.groupby(["user_id", "category_id"]).size().unstack(fill_value=0)
        shares.append(counts[counts.sum(axis=1) >= 20])
    early, late = (s.reindex(index=shares[0].index.intersection(shares[1].index),
                             columns=items["category_id"].unique(), fill_value=0) for s in shares)
    assert len(early) >= 100
    return float((0.5 * (early.div(early.sum(axis=1), axis=0) - late.div(late.sum(axis=1), axis=0)).abs().sum(axis=1)).mean())


def test_favourite_categories_drift(events: pd.DataFrame, shop: tuple[DemoDataSummary, Path, list[str]],
                                    without: Callable[..., pd.DataFrame]) -> None:
    items = pd.read_parquet(shop[1] / "items.parquet")
    drift, flat = _category_drift(events, items), _category_drift(without(drift_per_day=0.0), items)
    assert drift > 1.5 * flat, (drift, flat)


def test_signup_precedes_first_event(events: pd.DataFrame,
                                     shop: tuple[DemoDataSummary, Path, list[str]]) -> None:
    users = pd.read_parquet(shop[1] / "users.parquet").set_index("user_id")
    first = events.groupby("user_id")["event_time"].min()
    assert (users.loc[first.index, "signup_time"] < first).all()


def test_same_seed_same_data_other_seed_other_data(tmp_path: Path) -> None:
    a = _generate(tmp_path, "a", SMALL)
    b = _generate(tmp_path, "b", SMALL)
    c = _generate(tmp_path, "c", replace(SMALL, seed=8))
    assert len(a) > 1000
    pd.testing.assert_frame_equal(a, b)
    for name in ("items.parquet", "users.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "a" / name),
                                      pd.read_parquet(tmp_path / "b" / name))
    assert not a.equals(c)


def test_csv_variant_holds_the_same_events(tmp_path: Path) -> None:
    parquet = _generate(tmp_path, "pq", SMALL)
    summary = generate_demo_data(tmp_path / "csv", replace(SMALL, file_format="csv"),
                                 progress=None)
    assert summary.files[0] == tmp_path / "csv" / "events.csv"
    raw = pd.read_csv(summary.files[0], dtype={"user_id": str, "item_id": str})
    assert raw["event_time"].str.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ").all()
    raw["event_time"] = pd.to_datetime(raw["event_time"], utc=True).dt.as_unit("us")
    pd.testing.assert_frame_equal(raw, parquet)


def test_scales_to_hundreds_of_thousands(tmp_path: Path) -> None:
    config = DemoDataConfig(n_users=6000, n_items=2000, n_categories=30, n_days=60, end_time=END)
    summary = generate_demo_data(tmp_path, config, progress=None)
    assert summary.n_events > 200_000
    assert pq.ParquetFile(summary.files[0]).metadata.num_rows == summary.n_events


@pytest.mark.parametrize("change", [{"file_format": "json"}, {"n_items": 5}, {"n_days": 0},
                                    {"end_time": datetime(2024, 6, 1)}])
def test_bad_config_is_refused(tmp_path: Path, change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        generate_demo_data(tmp_path, replace(SMALL, **change), progress=None)
