"""Tests for the feature build: exact values at known snapshots of a hand-made event log.

The log (A is the as-of midnight, A-k is k days earlier):

    u1  A-40 10:00 view i1, 10:05 view i2                   session s1
        A-10 10:00 view i1, 10:01 cart i1, 10:02 buy i1 (10 x 2) session s2
        A-9  00:00 view i3 (exactly on the A-9 boundary)     session s7
        A-3  12:00 view i2, 12:01 cart i2 (never bought)     session s3
        A-1  09:00 view i3                                   session s4
    u2  A-8  08:00 view i1, 08:05 view i3                    session s5
        A-2  14:00 view i2, 14:05 buy i2 (5 x 1)            session s6
"""

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from propensity.settings import FeatureSettings
from training.feature_build import build_features, day_index
from training.prepare import prepare

UTC = timezone.utc
A = datetime(2024, 3, 1, tzinfo=UTC)
FEATURE_REPO = Path(__file__).resolve().parents[1] / "feature_repo"
TABLES = ("user_activity", "user_profile", "user_interests", "user_purchase_history", "item_stats", "item_neighbors", "item_factors", "item_copurchase", "item_content")


def at(days_before: int, hour: int = 0, minute: int = 0) -> datetime:
    return A - timedelta(days=days_before) + timedelta(hours=hour, minutes=minute)


def ts(moment: datetime) -> int:
    return int(moment.timestamp())


def _quiet(_: str) -> None:
    pass


EVENTS = [
    (at(40, 10, 0), "u1", "i1", "view", "s1", None, None),
    (at(40, 10, 5), "u1", "i2", "view", "s1", None, None),
    (at(10, 10, 0), "u1", "i1", "view", "s2", None, None),
    (at(10, 10, 1), "u1", "i1", "add_to_cart", "s2", None, None),
    (at(10, 10, 2), "u1", "i1", "purchase", "s2", 10.0, 2.0),
    (at(9), "u1", "i3", "view", "s7", None, None),
    (at(3, 12, 0), "u1", "i2", "view", "s3", None, None),
    (at(3, 12, 1), "u1", "i2", "add_to_cart", "s3", None, None),
    (at(1, 9, 0), "u1", "i3", "view", "s4", None, None),
    (at(8, 8, 0), "u2", "i1", "view", "s5", None, None),
    (at(8, 8, 5), "u2", "i3", "view", "s5", None, None),
    (at(2, 14, 0), "u2", "i2", "view", "s6", None, None),
    (at(2, 14, 5), "u2", "i2", "purchase", "s6", 5.0, 1.0),
]
ITEMS = pd.DataFrame({
    "item_id": ["i1", "i2", "i3", "i4"],
    "category_id": ["c1", "c2", "c1", "c2"],
    "price": [10.0, 5.0, 3.0, 7.0],
    "available": [True, True, False, True],
})
USERS = pd.DataFrame({
    "user_id": ["u1", "u2"],
    "signup_time": pd.to_datetime(["2023-12-01T00:00:00Z", None], utc=True),
    "age": [30.0, None],
    "gender": ["f", None],
    "region": ["UK", "DE"],
})


def _write_raw(directory: Path, events: list[tuple], items: pd.DataFrame | None = None, users: pd.DataFrame | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(events, columns=["event_time", "user_id", "item_id", "event_type", "session_id", "price", "quantity"])
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True)
    frame.to_parquet(directory / "events.parquet", index=False)
    if items is not None:
        items.to_parquet(directory / "items.parquet", index=False)
    if users is not None:
        users.to_parquet(directory / "users.parquet", index=False)
    return directory


def _build(root: Path, events: list[tuple], items=None, users=None) -> dict[str, pd.DataFrame]:
    prepared = prepare(_write_raw(root / "raw", events, items, users), root / "prepared", progress=_quiet)
    build_features(root / "prepared", root / "offline", prepared.as_of, prepared.event_types, FeatureSettings(), progress=_quiet)
    return {name: pd.read_parquet(root / "offline" / f"{name}.parquet") for name in TABLES}


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pd.DataFrame]:
    return _build(tmp_path_factory.mktemp("features"), EVENTS, ITEMS, USERS)


@pytest.fixture(scope="module")
def offline_dir(tables: dict[str, pd.DataFrame], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.getbasetemp()
    return next(root.glob("features*")) / "offline"


def row(table: pd.DataFrame, key: str, entity: str, moment: datetime) -> pd.Series:
    match = table[(table[key] == entity) & (table["event_timestamp"] == pd.Timestamp(moment))]
    assert len(match) == 1, f"expected one {entity} row at {moment}, found {len(match)}"
    return match.iloc[0]


def boundaries(table: pd.DataFrame, key: str, entity: str) -> set[datetime]:
    return {t.to_pydatetime() for t in table.loc[table[key] == entity, "event_timestamp"]}


# --- user_activity ---------------------------------------------------------------------------

def test_user_activity_at_as_of(tables) -> None:
    r = row(tables["user_activity"], "user_id", "u1", A)
    assert (r.views_1d, r.views_7d, r.views_30d) == (1, 2, 4)
    assert (r.carts_1d, r.carts_7d, r.carts_30d) == (0, 1, 2)
    assert (r.purchases_1d, r.purchases_7d, r.purchases_30d) == (0, 0, 1)
    assert r.purchases_total == 1
    assert r.spend_30d == 20.0
    assert r.avg_purchase_price_30d == 10.0  # unit price paid: 20.0 spent on 2 units
    assert r.cart_to_purchase_rate_30d == 0.5
    assert r.distinct_items_30d == 3
    assert r.active_days_30d == 4
    assert (r.sessions_7d, r.sessions_30d) == (2, 4)
    assert (r.browsing_minutes_7d, r.browsing_minutes_30d) == (1.0, 3.0)
    assert r.last_event_ts == ts(at(1, 9, 0))
    assert r.last_purchase_ts == ts(at(10, 10, 2))
    assert r.first_event_ts == ts(at(40, 10, 0))
    # No 'return' in the log: unknown, not zero.
    assert pd.isna(r.returns_30d)


def test_event_exactly_at_the_snapshot_time_is_excluded(tables) -> None:
    # The A-9 00:00 view sits exactly on the snapshot time A-9: t uses events strictly before t.
    r = row(tables["user_activity"], "user_id", "u1", at(9))
    assert (r.views_1d, r.carts_1d, r.purchases_1d) == (1, 1, 1)  # A-10 only
    assert r.last_event_ts == ts(at(10, 10, 2))
    assert r.sessions_30d == 1
    nxt = row(tables["user_activity"], "user_id", "u1", at(8))
    assert (nxt.views_1d, nxt.carts_1d, nxt.purchases_1d) == (1, 0, 0)  # A-9 only
    assert nxt.last_event_ts == ts(at(9))


def test_events_on_the_snapshot_day_are_excluded(tables) -> None:
    # At A-1 the view made later that day (A-1 09:00) is not yet known.
    r = row(tables["user_activity"], "user_id", "u1", at(1))
    assert r.views_1d == 0
    assert r.views_7d == 1
    assert r.last_event_ts == ts(at(3, 12, 1))


def test_purchase_reaches_running_totals_only_after_its_day(tables) -> None:
    before = row(tables["user_activity"], "user_id", "u1", at(32))
    assert before.purchases_total == 0
    assert pd.isna(before.last_purchase_ts)
    assert before.spend_30d == 0.0
    assert pd.isna(before.avg_purchase_price_30d)
    assert pd.isna(before.cart_to_purchase_rate_30d)  # no carts: undefined, not 0
    after = row(tables["user_activity"], "user_id", "u2", A)
    assert (after.purchases_1d, after.purchases_7d, after.purchases_total) == (0, 1, 1)
    assert after.spend_30d == 5.0
    assert pd.isna(after.cart_to_purchase_rate_30d)  # bought without a cart event


def test_window_expiry(tables) -> None:
    # u2's A-8 views are in the 7-day window at A-1 and have left it at A, but stay in 30 days.
    at_a_minus_1 = row(tables["user_activity"], "user_id", "u2", at(1))
    assert (at_a_minus_1.views_1d, at_a_minus_1.views_7d, at_a_minus_1.views_30d) == (1, 3, 3)
    at_a = row(tables["user_activity"], "user_id", "u2", A)
    assert (at_a.views_1d, at_a.views_7d, at_a.views_30d) == (0, 1, 3)
    assert (at_a.sessions_7d, at_a.sessions_30d) == (1, 2)
    # u1's A-40 day leaves the 30-day window at A-9.
    left = row(tables["user_activity"], "user_id", "u1", at(9))
    assert (left.views_30d, left.distinct_items_30d, left.active_days_30d) == (1, 1, 1)
    assert left.first_event_ts == ts(at(40, 10, 0))


def test_one_active_day_leaves_each_window_at_its_boundary(tables) -> None:
    # u1's two A-40 views: in the 1-day window at A-39 only, in 7 days until A-33, in 30 until A-10.
    activity = tables["user_activity"]
    views = {k: tuple(row(activity, "user_id", "u1", at(k))[["views_1d", "views_7d", "views_30d"]]) for k in (39, 38, 32, 9)}
    assert views == {39: (2, 2, 2), 38: (0, 2, 2), 32: (0, 0, 2), 9: (1, 1, 1)}


def test_user_snapshot_boundaries(tables) -> None:
    # Active day d gives d+1, d+2, d+8, d+31 (those before A), plus A for every user.
    assert boundaries(tables["user_activity"], "user_id", "u1") == {
        at(39), at(38), at(32), at(9), at(8), at(7), at(2), at(1), A,
    }
    assert boundaries(tables["user_activity"], "user_id", "u2") == {at(7), at(6), at(1), A}
    assert boundaries(tables["user_interests"], "user_id", "u2") == {at(7), at(6), at(1), A}


def test_boundaries_are_utc_midnights(tables) -> None:
    for name in ("user_activity", "user_interests", "item_stats", "item_neighbors"):
        stamps = tables[name]["event_timestamp"]
        assert str(stamps.dt.tz) == "UTC", name
        assert (stamps == stamps.dt.floor("D")).all(), name


def test_session_crossing_midnight_counts_only_time_before_the_snapshot(tmp_path: Path) -> None:
    # One session from 23:50 to 00:20: at that midnight only its first 10 minutes have happened.
    events = [
        (at(2, 23, 50), "u1", "i1", "view", "s1", None, None),
        (at(1, 0, 20), "u1", "i2", "view", "s1", None, None),
    ]
    activity = _build(tmp_path, events)["user_activity"]
    r = row(activity, "user_id", "u1", at(1))
    assert r.views_1d == 1
    assert r.last_event_ts == ts(at(2, 23, 50))
    assert r.sessions_7d == 1
    assert r.browsing_minutes_7d == 0.0  # only one event of the session is before t


def test_sessions_without_session_id_split_on_the_inactivity_gap(tmp_path: Path) -> None:
    events = [
        (at(1, 10, 0), "u1", "i1", "view", None, None, None),
        (at(1, 10, 20), "u1", "i2", "view", None, None, None),  # 20 min later: same session
        (at(1, 11, 0), "u1", "i3", "view", None, None, None),   # 40 min later: a new session
    ]
    r = row(_build(tmp_path, events)["user_activity"], "user_id", "u1", A)
    assert r.sessions_7d == 2
    assert r.browsing_minutes_7d == 20.0


# --- user_profile ----------------------------------------------------------------------------

def test_user_profile(tables) -> None:
    profile = tables["user_profile"].set_index("user_id")
    assert profile.loc["u1", "event_timestamp"] == pd.Timestamp("2023-12-01T00:00:00Z")
    assert profile.loc["u1", "signup_ts"] == ts(datetime(2023, 12, 1, tzinfo=UTC))
    assert (profile.loc["u1", "age"], profile.loc["u1", "gender"], profile.loc["u1", "region"]) == (30.0, "f", "UK")
    # Without a sign-up time the profile is valid from the log's first day.
    assert profile.loc["u2", "event_timestamp"] == pd.Timestamp(at(40))
    assert pd.isna(profile.loc["u2", "signup_ts"])


# --- user_interests --------------------------------------------------------------------------

def test_recent_items_most_recent_first_with_per_item_state(tables) -> None:
    r = row(tables["user_interests"], "user_id", "u1", A)
    assert list(r.recent_item_ids) == ["i3", "i2", "i1"]
    assert list(r.recent_item_views_7d) == [1, 1, 0]
    assert list(r.recent_item_carts_7d) == [0, 1, 0]
    assert list(r.recent_item_purchases_30d) == [0, 0, 1]
    # i2 carted and never bought; i1 carted, then bought.
    assert list(r.recent_item_in_cart) == [0, 1, 0]
    assert list(r.recent_item_last_ts) == [ts(at(1, 9, 0)), ts(at(3, 12, 1)), ts(at(10, 10, 2))]


def test_recent_items_at_an_earlier_snapshot(tables) -> None:
    # At A-9: A-40 has left the 30-day window, A-9's view of i3 is not yet known.
    r = row(tables["user_interests"], "user_id", "u1", at(9))
    assert list(r.recent_item_ids) == ["i1"]
    assert list(r.recent_item_views_7d) == [1]
    assert list(r.recent_item_in_cart) == [0]
    # At A-32 only A-40's two views are in the window.
    early = row(tables["user_interests"], "user_id", "u1", at(32))
    assert list(early.recent_item_ids) == ["i2", "i1"]
    assert list(early.recent_item_views_7d) == [0, 0]


def test_top_categories_and_shares(tables) -> None:
    r = row(tables["user_interests"], "user_id", "u1", A)
    # 30 days before A: c1 has 5 events (i1 x3, i3 x2), c2 has 2 (i2).
    assert list(r.top_category_ids) == ["c1", "c2"]
    assert list(r.top_category_shares) == pytest.approx([5 / 7, 2 / 7])
    for shares in tables["user_interests"]["top_category_shares"]:
        assert sum(shares) <= 1 + 1e-9
        assert list(shares) == sorted(shares, reverse=True)


def test_top_categories_are_capped(tmp_path: Path) -> None:
    events = [(at(1, 10, k), "u1", f"i{k}", "view", "s1", None, None) for k in range(4)]
    items = pd.DataFrame({"item_id": [f"i{k}" for k in range(4)], "category_id": ["a", "b", "b", "c"]})
    prepared = prepare(_write_raw(tmp_path / "raw", events, items), tmp_path / "prepared", progress=_quiet)
    build_features(tmp_path / "prepared", tmp_path / "offline", prepared.as_of, prepared.event_types,
                   FeatureSettings(top_categories_per_user=2, recent_items_per_user=3), progress=_quiet)
    r = row(pd.read_parquet(tmp_path / "offline" / "user_interests.parquet"), "user_id", "u1", A)
    assert list(r.top_category_ids) == ["b", "a"]
    assert list(r.top_category_shares) == pytest.approx([0.5, 0.25])
    assert list(r.recent_item_ids) == ["i3", "i2", "i1"]


# --- user_purchase_history -------------------------------------------------------------------

def test_purchase_history_changes_only_the_day_after_a_purchase(tables) -> None:
    history = tables["user_purchase_history"]
    assert boundaries(history, "user_id", "u1") == {at(9)}
    assert boundaries(history, "user_id", "u2") == {at(1)}
    r = row(history, "user_id", "u1", at(9))
    assert (list(r.bought_item_ids), list(r.bought_item_counts), list(r.bought_item_last_ts)) == (["i1"], [1], [ts(at(10, 10, 2))])


def test_purchase_history_spans_the_whole_log_most_bought_first_and_is_capped(tmp_path: Path) -> None:
    # i1 bought twice 60 days back (outside every 30-day window), i2 and i3 once each, i3 last.
    events = [
        (at(60, 10, 0), "u1", "i1", "purchase", "s1", 1.0, 1.0),
        (at(60, 10, 1), "u1", "i1", "purchase", "s1", 1.0, 1.0),
        (at(5, 10, 0), "u1", "i2", "purchase", "s2", 1.0, 1.0),
        (at(2, 10, 0), "u1", "i3", "purchase", "s3", 1.0, 1.0),
    ]
    prepared = prepare(_write_raw(tmp_path / "raw", events), tmp_path / "prepared", progress=_quiet)
    build_features(tmp_path / "prepared", tmp_path / "offline", prepared.as_of, prepared.event_types,
                   FeatureSettings(bought_items_per_user=2), progress=_quiet)
    history = pd.read_parquet(tmp_path / "offline" / "user_purchase_history.parquet")
    assert prepared.as_of == at(1)  # the day after the last purchase: its snapshot is the latest
    assert boundaries(history, "user_id", "u1") == {at(59), at(4), at(1)}
    before_i3 = row(history, "user_id", "u1", at(4))
    assert (list(before_i3.bought_item_ids), list(before_i3.bought_item_counts)) == (["i1", "i2"], [2, 1])
    latest = row(history, "user_id", "u1", at(1))
    assert (list(latest.bought_item_ids), list(latest.bought_item_counts)) == (["i1", "i3"], [2, 1])  # i2 is older: capped out
    assert list(latest.bought_item_last_ts) == [ts(at(60, 10, 1)), ts(at(2, 10, 0))]


# --- item_stats ------------------------------------------------------------------------------

def test_item_stats_at_as_of(tables) -> None:
    i1 = row(tables["item_stats"], "item_id", "i1", A)
    assert (i1.item_views_7d, i1.item_views_30d) == (0, 2)
    assert (i1.item_carts_7d, i1.item_carts_30d) == (0, 1)
    assert (i1.item_purchases_7d, i1.item_purchases_30d) == (0, 1)
    assert i1.item_buyers_30d == 1
    assert i1.item_conversion_rate_30d == 0.5
    assert (i1.category_id, i1.item_price, i1.item_available) == ("c1", 10.0, 1)
    assert pd.isna(i1.item_return_rate_30d)

    i2 = row(tables["item_stats"], "item_id", "i2", A)
    assert (i2.item_views_7d, i2.item_views_30d, i2.item_carts_7d, i2.item_purchases_7d) == (2, 2, 1, 1)
    assert i2.item_conversion_rate_30d == 0.5

    i3 = row(tables["item_stats"], "item_id", "i3", A)
    assert (i3.item_views_7d, i3.item_views_30d, i3.item_purchases_30d, i3.item_buyers_30d) == (1, 3, 0, 0)
    assert i3.item_conversion_rate_30d == 0.0
    assert i3.item_available == 0


def test_item_without_events_gets_one_as_of_row(tables) -> None:
    i4 = tables["item_stats"][tables["item_stats"]["item_id"] == "i4"]
    assert i4["event_timestamp"].tolist() == [pd.Timestamp(A)]
    r = i4.iloc[0]
    assert (r.item_views_30d, r.item_purchases_30d, r.item_buyers_30d) == (0, 0, 0)
    assert pd.isna(r.item_conversion_rate_30d)
    assert (r.category_id, r.item_price) == ("c2", 7.0)


def test_item_snapshot_boundaries(tables) -> None:
    # i1 is active on: d+1, d+8, d+31 before A, plus A.
    assert boundaries(tables["item_stats"], "item_id", "i1") == {at(39), at(32), at(9), at(7), at(2), A}


# --- item_neighbors --------------------------------------------------------------------------

def test_items_viewed_in_one_session_are_neighbours(tables) -> None:
    neighbors = tables["item_neighbors"]
    # u2's A-8 session holds i1 and i3.
    i1 = row(neighbors, "item_id", "i1", A)
    i3 = row(neighbors, "item_id", "i3", A)
    assert (list(i1.neighbor_item_ids), list(i1.neighbor_scores)) == (["i3"], [1.0])
    assert (list(i3.neighbor_item_ids), list(i3.neighbor_scores)) == (["i1"], [1.0])
    # u1's A-40 session (i1, i2) is visible from the weekly snapshots inside its 30 days only.
    early = row(neighbors, "item_id", "i2", at(35))
    assert list(early.neighbor_item_ids) == ["i1"]
    assert not ((neighbors["item_id"] == "i2") & (neighbors["event_timestamp"] == pd.Timestamp(A))).any()


def test_neighbor_snapshots_are_weekly_and_point_in_time(tables) -> None:
    neighbors = tables["item_neighbors"]
    assert set(neighbors["event_timestamp"]) <= {pd.Timestamp(A - timedelta(days=7 * k)) for k in range(6)}
    # The A-8 session is not known at A-14.
    at_14 = row(neighbors, "item_id", "i1", at(14))
    assert list(at_14.neighbor_item_ids) == ["i2"]


# --- event types absent from the log ---------------------------------------------------------

def test_purchase_only_log_gives_null_views_and_carts_but_real_purchases(tmp_path: Path) -> None:
    events = [
        (at(3, 10), "u1", "i1", "purchase", None, 4.0, 1.0),
        (at(1, 10), "u1", "i2", "purchase", None, 6.0, 2.0),
    ]
    built = _build(tmp_path, events)
    r = row(built["user_activity"], "user_id", "u1", A)
    for column in ("views_1d", "views_7d", "views_30d", "carts_1d", "carts_7d", "carts_30d",
                   "returns_30d", "cart_to_purchase_rate_30d"):
        assert pd.isna(r[column]), column
    assert (r.purchases_1d, r.purchases_7d, r.purchases_30d, r.purchases_total) == (1, 2, 2, 2)
    assert r.spend_30d == 16.0
    assert r.avg_purchase_price_30d == pytest.approx(16.0 / 3)  # unit price paid: 16.0 over 3 units
    item = row(built["item_stats"], "item_id", "i2", A)
    for column in ("item_views_7d", "item_views_30d", "item_carts_7d", "item_carts_30d", "item_conversion_rate_30d"):
        assert pd.isna(item[column]), column
    assert (item.item_purchases_7d, item.item_purchases_30d, item.item_buyers_30d) == (1, 1, 1)
    interests = row(built["user_interests"], "user_id", "u1", A)
    for column in ("recent_item_views_7d", "recent_item_carts_7d", "recent_item_in_cart"):
        assert interests[column] is None, column
    assert list(interests.recent_item_ids) == ["i2", "i1"]
    assert list(interests.recent_item_purchases_30d) == [1, 1]


def test_item_without_catalog_price_gets_the_unit_price_paid(tmp_path: Path) -> None:
    # No items file: the price comes from purchases. Two units at 6.0 cost 12.0, but the item costs 6.0.
    events = [
        (at(3, 10), "u1", "i1", "purchase", None, 4.0, 1.0),
        (at(1, 10), "u1", "i2", "purchase", None, 6.0, 2.0),
    ]
    stats = _build(tmp_path, events)["item_stats"]
    assert row(stats, "item_id", "i1", A).item_price == 4.0
    assert row(stats, "item_id", "i2", A).item_price == 6.0


def test_user_tables_built_in_buckets_equal_the_one_pass_build(tables, tmp_path: Path) -> None:
    extra = [(at(5, 11, k), f"x{k}", f"i{1 + k % 3}", "purchase" if k % 2 else "view", None, 2.0, 1.0) for k in range(6)]
    one = _build(tmp_path / "one", EVENTS + extra, ITEMS, USERS)
    prepared = tmp_path / "one" / "prepared"
    build_features(prepared, tmp_path / "bucketed", at(0), frozenset({"view", "add_to_cart", "purchase"}),
                   FeatureSettings(events_per_user_bucket=4), progress=_quiet)  # 19 events -> 5 buckets
    assert sorted(p.name for p in (tmp_path / "bucketed").iterdir()) == sorted(f"{name}.parquet" for name in TABLES)
    for name in TABLES:
        key = "item_id" if name.startswith("item") else "user_id"
        bucketed = pd.read_parquet(tmp_path / "bucketed" / f"{name}.parquet")
        expected = one[name]
        assert bucketed[key].nunique() == expected[key].nunique() and len(bucketed) == len(expected), name
        order = [key, "event_timestamp"]
        pd.testing.assert_frame_equal(bucketed.sort_values(order).reset_index(drop=True), expected.sort_values(order).reset_index(drop=True), obj=name)


def test_as_of_must_be_a_day_boundary() -> None:
    assert day_index(A) == ts(A) // 86_400
    with pytest.raises(ValueError, match="not a UTC day boundary"):
        day_index(A + timedelta(hours=1))


# --- the tables match the Feast definitions --------------------------------------------------

def _feast_definitions() -> tuple[dict, dict[str, str]]:
    """The repository's feature views by name, and each entity's join key."""
    sys.path.insert(0, str(FEATURE_REPO))
    try:
        import entities
        import feature_views
    finally:
        sys.path.remove(str(FEATURE_REPO))
    views = {name: getattr(feature_views, name) for name in TABLES}
    keys = {entity.name: entity.join_key for entity in (entities.user, entities.item)}
    return views, keys


_ARROW = {"Int64": pa.int64(), "Float64": pa.float64(), "String": pa.string()}


def _arrow_type(dtype) -> pa.DataType:
    name = str(dtype)
    if name.startswith("Array("):
        return pa.list_(_ARROW[name[len("Array("):-1]])
    return _ARROW[name]


@pytest.mark.parametrize("name", TABLES)
def test_table_columns_equal_the_feature_view_schema(tables, offline_dir: Path, name: str) -> None:
    views, join_keys = _feast_definitions()
    view = views[name]
    keys = [join_keys[entity] for entity in view.entities]
    expected = set(keys) | {"event_timestamp"} | {field.name for field in view.features}
    assert set(tables[name].columns) == expected
    assert len(tables[name].columns) == len(expected)
    schema = pq.read_schema(offline_dir / f"{name}.parquet")
    for field in view.features:
        assert schema.field(field.name).type == _arrow_type(field.dtype), f"{name}.{field.name}"
    for key in keys:
        assert schema.field(key).type == pa.string()
    assert schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
