"""Tests for the demo shop's oracle: true purchase probabilities by Monte Carlo over the generator itself."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from propensity_cli.main import main
from propensity.demo import DemoDataConfig, generate_demo_data
from propensity.raw_data import load_raw_dataset

END = datetime(2024, 6, 1, tzinfo=timezone.utc)
SHOP = DemoDataConfig(n_users=1500, n_items=150, n_categories=8, n_days=30, seed=3, end_time=END,
                      oracle=True, oracle_horizon_days=7, oracle_replicates=100)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("oracle_shop")
    messages: list[str] = []
    generate_demo_data(out, SHOP, progress=messages.append)
    return out, messages


@pytest.fixture(scope="module")
def truth(shop: tuple[Path, list[str]]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Oracle users and pairs, and the purchases the log realised in the oracle's window."""
    out = shop[0]
    users, pairs = pd.read_parquet(out / "oracle" / "users.parquet"), pd.read_parquet(out / "oracle" / "items.parquet")
    events = pd.read_parquet(out / "events.parquet")
    cutoff = pd.Timestamp(END - timedelta(days=SHOP.oracle_horizon_days))
    realised = events[(events["event_type"] == "purchase") & (events["event_time"] >= cutoff)]
    return users, pairs, realised


def test_files_and_schema(shop: tuple[Path, list[str]]) -> None:
    out, messages = shop
    meta = json.loads((out / "oracle" / "oracle.json").read_text())
    assert meta == {"cutoff": "2024-05-25T00:00:00+00:00", "horizon_days": 7, "replicates": 100, "seed": 3, "n_users": 1500}
    assert pq.read_schema(out / "oracle" / "users.parquet").equals(pa.schema([("user_id", pa.string()), ("p_buy", pa.float64())]))
    assert pq.read_schema(out / "oracle" / "items.parquet").equals(
        pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("p_buy", pa.float64())]))
    assert any(m.startswith("demo oracle: replicates") for m in messages)
    assert messages[-1].startswith("demo oracle: mean P(buy in 7 days)")


def test_probabilities_are_consistent(truth: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]) -> None:
    users, pairs, _ = truth
    assert len(users) == SHOP.n_users and users["user_id"].is_unique
    assert users["p_buy"].between(0, 1).all() and pairs["p_buy"].between(0, 1, inclusive="right").all()
    assert not pairs.duplicated(["user_id", "item_id"]).any()
    # Shares of 100 replicates.
    assert np.allclose(users["p_buy"] * 100, np.round(users["p_buy"] * 100))
    # Buying an item means buying something, replicate by replicate.
    best = pairs.groupby("user_id")["p_buy"].max()
    assert (users.set_index("user_id")["p_buy"].reindex(best.index) >= best).all()


def test_mean_probability_matches_the_realised_buyer_share(truth: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]) -> None:
    users, _, realised = truth
    bought = users["user_id"].isin(realised["user_id"]).to_numpy()
    p = users["p_buy"].to_numpy()
    assert 0.02 < p.mean() < 0.3
    # Shoppers are independent given the state at the cut-off: the buyer count is a sum of Bernoullis.
    # Checked overall and within bands of p, so a well-placed mean cannot hide a bad spread.
    for band in (p >= 0, p < 0.05, (p >= 0.05) & (p < 0.3), p >= 0.3):
        expected, sd = p[band].sum(), np.sqrt((p[band] * (1 - p[band])).sum())
        assert abs(bought[band].sum() - expected) < 4 * sd + 2, (band.sum(), bought[band].sum(), expected)


def test_realised_purchases_were_likely_but_not_foretold(truth: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]) -> None:
    _, pairs, realised = truth
    key = pd.MultiIndex.from_frame(pairs[["user_id", "item_id"]])
    hit = key.isin(pd.MultiIndex.from_frame(realised[["user_id", "item_id"]]))
    n_realised = len(realised.drop_duplicates(["user_id", "item_id"]))
    p_realised = pairs["p_buy"][hit].sum() / n_realised  # pairs the oracle never saw bought count as 0
    assert p_realised > 5 * pairs["p_buy"][~hit].mean()
    # An oracle that copied pre-drawn outcomes would put these near 1.
    assert p_realised < 0.5
    assert abs(n_realised - pairs["p_buy"].sum()) < 4 * np.sqrt(pairs["p_buy"].sum()) + 5


def test_the_oracle_does_not_change_the_log(tmp_path: Path) -> None:
    small = replace(SHOP, n_users=200, oracle_replicates=5)
    generate_demo_data(tmp_path / "with", small, progress=None)
    generate_demo_data(tmp_path / "without", replace(small, oracle=False), progress=None)
    for name in ("events.parquet", "items.parquet", "users.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "with" / name), pd.read_parquet(tmp_path / "without" / name))
    assert not (tmp_path / "without" / "oracle").exists()
    generate_demo_data(tmp_path / "again", small, progress=None)
    for name in ("users.parquet", "items.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "with" / "oracle" / name),
                                      pd.read_parquet(tmp_path / "again" / "oracle" / name))


def test_raw_loading_ignores_the_oracle_folder(shop: tuple[Path, list[str]]) -> None:
    dataset = load_raw_dataset(shop[0])
    assert set(dataset.report.files.values()) == {"events.parquet", "items.parquet", "users.parquet"}
    assert len(dataset.users) == SHOP.n_users


@pytest.mark.parametrize("change", [{"end_time": END + timedelta(hours=1)}, {"end_time": None},
                                    {"oracle_horizon_days": 30}, {"oracle_replicates": 0}])
def test_bad_oracle_config_is_refused(tmp_path: Path, change: dict[str, object]) -> None:
    if change.get("end_time", END) is None and datetime.now(timezone.utc).hour == 0:
        pytest.skip("now is a midnight hour: None resolves to a midnight")
    with pytest.raises(ValueError, match="midnight|oracle_"):
        generate_demo_data(tmp_path, replace(SHOP, **change), progress=None)


def test_cli_writes_the_oracle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROPENSITY_CONFIG", str(tmp_path / "absent.toml"))
    out = tmp_path / "raw"
    assert main(["demo-data", "--out", str(out), "--users", "100", "--items", "40", "--days", "20",
                 "--oracle", "--oracle-horizon-days", "5", "--oracle-replicates", "10"]) == 0
    meta = json.loads((out / "oracle" / "oracle.json").read_text())
    assert (meta["horizon_days"], meta["replicates"], meta["n_users"]) == (5, 10, 100)
    # The CLI ends the log at today's midnight, so the cut-off is a midnight horizon days before it.
    cutoff = datetime.fromisoformat(meta["cutoff"])
    assert cutoff.tzinfo is not None and (cutoff.hour, cutoff.minute, cutoff.second) == (0, 0, 0)
    last = pd.read_parquet(out / "events.parquet")["event_time"].max()
    assert pd.Timestamp(cutoff) <= last < pd.Timestamp(cutoff) + pd.Timedelta(days=5)
