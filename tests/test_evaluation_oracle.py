"""Tests for training/evaluation/oracle.py on a tiny hand-written oracle directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training import metrics
from training.evaluation import oracle as oracles

CUTOFF = "2011-12-03T00:00:00Z"  # the raw log's clock


def _write_oracle(root: Path, cutoff: str = CUTOFF, horizon: int = 7) -> Path:
    directory = root / oracles.ORACLE_DIR
    directory.mkdir(parents=True)
    (directory / "oracle.json").write_text(json.dumps({"cutoff": cutoff, "horizon_days": horizon, "replicates": 200, "seed": 1, "n_users": 4}))
    pd.DataFrame({"user_id": ["u1", "u2", "u3", "u4"], "p_buy": [0.9, 0.6, 0.2, 0.1]}).to_parquet(directory / "users.parquet")
    pd.DataFrame(
        {
            # u1: c and b tie (ties by item id: b first), a lower; u2: only d.
            "user_id": ["u1", "u1", "u1", "u2"],
            "item_id": ["a", "c", "b", "d"],
            "p_buy": [0.1, 0.5, 0.5, 0.4],
        }
    ).to_parquet(directory / "items.parquet")
    return directory


def test_oracle_ranks_items_by_true_probability_ties_by_item_id(tmp_path: Path) -> None:
    oracle = oracles.load_oracle(_write_oracle(tmp_path))
    assert oracle.cutoff == pd.Timestamp("2011-12-03", tz="UTC") and oracle.horizon_days == 7
    assert oracle.ranked_items(["u1", "u2", "nobody"], k=2) == [["b", "c"], ["d"], []]
    p, missing = oracle.user_probabilities(["u2", "u1", "stranger"])
    assert p.tolist() == [0.6, 0.9, 0.0] and missing == 1


def test_oracle_matches_a_test_cutoff_only_after_prepares_shift_and_with_the_same_horizon(tmp_path: Path) -> None:
    oracle = oracles.load_oracle(_write_oracle(tmp_path))
    shifted = pd.Timestamp("2011-12-03", tz="UTC") + pd.Timedelta(days=5000)
    test = [shifted - pd.Timedelta(days=7), shifted]
    assert oracles.matching_cutoff(oracle, 5000, test, 7) == (shifted, "")
    cutoff, reason = oracles.matching_cutoff(oracle, 4999, test, 7)
    assert cutoff is None and "is not a test cut-off" in reason
    cutoff, reason = oracles.matching_cutoff(oracle, 5000, test, 30)
    assert cutoff is None and "horizon is 7 days, the evaluation's 30" in reason


def test_find_oracle_says_why_there_is_none(tmp_path: Path) -> None:
    oracle, reason = oracles.find_oracle([tmp_path / "raw", tmp_path / "raw"])
    assert oracle is None and "no oracle in the raw data dir" in reason and reason.count("raw/oracle") == 1
    _write_oracle(tmp_path / "other")
    found, _ = oracles.find_oracle([tmp_path / "raw", tmp_path / "other"])
    assert found is not None and found.directory == tmp_path / "other" / "oracle"


def test_compare_with_oracle_reports_fractions_of_the_oracle_and_the_user_auc_gap(tmp_path: Path) -> None:
    oracle = oracles.load_oracle(_write_oracle(tmp_path))
    buyers, relevant = ["u1", "u2"], [{"c"}, {"d", "e"}]
    # The oracle at k=1: u1 gets b (miss), u2 gets d (hit, 1 of 2 bought) -> recall (0 + 0.5) / 2 = 0.25;
    # NDCG: u2 hit at rank 1 against an ideal of one relevant slot at k=1 -> (0 + 1) / 2 = 0.5.
    model = metrics.ranking_metrics_per_user([["c"], ["x"]], relevant, k=1)  # recall 0.5, NDCG 0.5
    result = oracles.compare_with_oracle(
        oracle,
        pd.Timestamp("2011-12-03", tz="UTC"),
        buyers,
        relevant,
        {"lightgbm": model},
        user_ids=["u1", "u2", "u3", "u4"],
        y=np.array([1, 1, 0, 0]),
        model_scores=np.array([0.3, 0.1, 0.2, 0.05]),  # u2 ranked below u3: AUC 3/4
        k=1,
    )
    assert result["oracle"] == pytest.approx({"recall_at_1": 0.25, "ndcg_at_1": 0.5})
    assert result["fraction_of_oracle"]["lightgbm"] == pytest.approx({"recall_at_1": 2.0, "ndcg_at_1": 1.0})
    assert result["user_auc"] == pytest.approx({"oracle": 1.0, "model": 0.75, "gap": 0.25})
    assert result["test_buyers"] == 2 and result["test_rows"] == 4 and result["users_not_in_oracle"] == 0
