"""Tests for training/evaluation/comparison.py, goals.py and the README headline: verdicts that cannot overclaim."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.evaluation import comparison, goals, summary
from training.evaluation.comparison import INCONCLUSIVE, LOSS, WIN


@pytest.mark.parametrize(
    ("low", "high", "n", "higher", "expected"),
    [
        (0.01, 0.05, 100, True, WIN),
        (-0.05, -0.01, 100, True, LOSS),
        (-0.05, -0.01, 100, False, WIN),  # log loss: lower is better
        (0.01, 0.05, 99, True, INCONCLUSIVE),  # too few positives, however clear the CI
        (-0.01, 0.05, 5000, True, INCONCLUSIVE),  # CI crosses 0
        (0.0, 0.05, 5000, True, INCONCLUSIVE),  # CI touches 0
        (0.0, 0.0, 5000, True, INCONCLUSIVE),  # identical arms
        (np.nan, np.nan, 5000, True, INCONCLUSIVE),
    ],
)
def test_verdict_is_a_win_or_loss_only_with_enough_positives_and_a_ci_excluding_zero(low, high, n, higher, expected) -> None:
    assert comparison.verdict(low, high, n, higher) == expected
    assert bool(comparison.inconclusive_reason(low, high, n)) == (expected == INCONCLUSIVE)


def test_inconclusive_reason_names_every_cause() -> None:
    assert comparison.inconclusive_reason(-0.1, 0.1, 40) == "only 40 positives (< 100); CI crosses 0"
    assert comparison.inconclusive_reason(0.1, 0.2, 150) == ""


def _table(values: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"recall_at_10": values, "ndcg_at_10": values})


def test_compare_rankings_pairs_users_and_counts_them_as_positives() -> None:
    ours = _table([1.0, 0.0] * 60)
    tables = {"lightgbm": ours, "same_baseline": ours.copy(), "worse_baseline": ours * 0.5}
    found = {(c.baseline, c.metric): c for c in comparison.compare_rankings(tables, "lightgbm", ["same_baseline", "worse_baseline"], n_boot=50)}
    same, worse = found[("same_baseline", "recall_at_10")], found[("worse_baseline", "ndcg_at_10")]
    assert (same.difference, same.ci_low, same.ci_high, same.verdict) == (0.0, 0.0, 0.0, INCONCLUSIVE)
    assert worse.n_positive == 120 and worse.difference == pytest.approx(0.25) and worse.verdict == WIN
    assert worse.model_value == pytest.approx(0.5) and worse.baseline_value == pytest.approx(0.25)
    small = comparison.compare_rankings({"lightgbm": ours.iloc[:40], "b": ours.iloc[:40] * 0.5}, "lightgbm", ["b"], n_boot=50)[0]
    assert small.ci_low > 0 and small.verdict == INCONCLUSIVE and "40 positives" in small.reason


def test_compare_propensity_calls_a_lower_log_loss_a_win() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(size=3000)
    y = (rng.uniform(size=3000) < p).astype(int)
    scores = {"lightgbm": p, "base_rate_baseline": np.full(3000, y.mean())}
    found = {c.metric: c for c in comparison.compare_propensity(y, scores, "lightgbm", ["base_rate_baseline"], n_boot=50)}
    assert found["roc_auc"].verdict == WIN and found["roc_auc"].baseline_value == pytest.approx(0.5)
    assert found["log_loss"].difference < 0 and not found["log_loss"].higher_is_better and found["log_loss"].verdict == WIN
    assert found["log_loss"].n_positive == int(y.sum())


def _comparison(metric: str, baseline: str, value: float, higher: bool = True, low: float = 0.01, high: float = 0.02, n: int = 500) -> comparison.Comparison:
    return comparison.Comparison("ranking" if higher else "propensity", metric, "lightgbm", baseline, 0.5, value, 0.5 - value, low, high, n, higher)


def test_against_best_baseline_takes_the_highest_point_value_and_the_lowest_log_loss() -> None:
    found = comparison.against_best_baseline(
        [
            _comparison("recall_at_10", "a", 0.2),
            _comparison("recall_at_10", "b", 0.4),
            _comparison("ndcg_at_10", "a", 0.3),
            _comparison("log_loss", "mlp", 0.30, higher=False),
            _comparison("log_loss", "base_rate", 0.36, higher=False),
        ]
    )
    assert {(c.metric, c.baseline) for c in found} == {("recall_at_10", "b"), ("ndcg_at_10", "a"), ("log_loss", "mlp")}


def _entry(comparisons: list[comparison.Comparison], oracle: dict | None = None) -> dict:
    as_json = [c.to_json() for c in comparisons]
    oracle = oracle or {"status": "not compared", "reason": "no oracle"}
    info = {"test_cutoffs": ["2024-01-08T00:00:00+00:00"], "test_rows": 900, "test_positive_rows": 120, "test_buyers_ranked": 120,
            "candidate_recall_test": 0.9, "command": "propensity evaluate --label x"}
    return {"comparisons": as_json, "best_baseline": [c.to_json() for c in comparison.against_best_baseline(comparisons)],
            "oracle": oracle, "goals": goals.dataset_goals(as_json, oracle), "info": info}


def test_goals_need_conclusive_wins_over_both_heuristics_and_the_oracle_targets() -> None:
    heuristics = [_comparison(m, h, 0.3) for h in goals.HEURISTICS for m in goals.GOAL_METRICS]
    oracle = {"status": "compared", "fraction_of_oracle": {"lightgbm": {"recall_at_10": 0.92}}, "user_auc": {"gap": 0.05}}
    met = {g["goal"]: g["met"] for g in _entry(heuristics, oracle)["goals"]}
    assert list(met.values()) == [True, True, True, False]  # both heuristics beaten, recall 0.92 x oracle; AUC gap 0.05 > 0.03
    crossing = heuristics[:-1] + [_comparison(goals.GOAL_METRICS[-1], goals.HEURISTICS[-1], 0.3, low=-0.01)]
    assert [g["met"] for g in _entry(crossing)["goals"]] == [True, False]  # no oracle: no oracle goals


def test_headline_states_only_conclusive_claims_and_lists_the_rest_as_inconclusive(tmp_path: Path) -> None:
    clear = _comparison("recall_at_10", goals.HEURISTICS[0], 0.3)
    few = _comparison("ndcg_at_10", goals.HEURISTICS[0], 0.3, n=60)
    crossing = _comparison("recall_at_10", goals.HEURISTICS[1], 0.3, low=-0.02)
    (tmp_path / "metrics.json").write_text(json.dumps({"shop": _entry([clear, few, crossing]), "old": {"lightgbm": {}, "info": {"command": "c"}}}))
    text = summary.write_summary(tmp_path).read_text()
    conclusive = text.split("## Conclusive")[1].split("## Inconclusive")[0]
    inconclusive = text.split("## Inconclusive")[1].split("## Not re-evaluated")[0]
    assert f"| shop | ranking | Recall@10 | {goals.HEURISTICS[0]} |" in conclusive and "**win**" in conclusive
    assert "NDCG@10" not in conclusive and goals.HEURISTICS[1] not in conclusive
    assert "only 60 positives (< 100)" in inconclusive and "CI crosses 0" in inconclusive
    assert "**win**" not in inconclusive
    assert "old" in text.split("## Not re-evaluated")[1]


def test_a_ci_bound_next_to_zero_never_prints_as_zero() -> None:
    assert comparison.signed(0.0123) == "+0.012" and comparison.signed(0.0) == "+0.000"
    assert comparison.signed(-0.0003) == "-3e-04"
