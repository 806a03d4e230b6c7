"""Tests for training/metrics.py: against scikit-learn where it has the same metric, by hand otherwise."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from training import metrics


@pytest.fixture(scope="module")
def scored() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    p = rng.uniform(size=2000)
    y = (rng.uniform(size=2000) < p).astype(int)
    return y, p


def test_threshold_metrics_match_sklearn(scored) -> None:
    y, p = scored
    got = metrics.threshold_metrics(y, p, 0.6)
    assert got["precision"] == pytest.approx(precision_score(y, p >= 0.6))
    assert got["recall"] == pytest.approx(recall_score(y, p >= 0.6))
    assert got["f1"] == pytest.approx(f1_score(y, p >= 0.6))


def test_propensity_metrics_roc_auc_and_brier_match_sklearn(scored) -> None:
    y, p = scored
    got = metrics.propensity_metrics(y, p, 0.5)
    assert got["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert got["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert got["rows"] == 2000


def test_ece_by_hand() -> None:
    # Bin [0.1, 0.2): predicted 0.1, observed 0.5; bin [0.9, 1.0]: predicted 0.9, observed 1.0 -> 0.5*0.4 + 0.5*0.1
    y = np.array([0, 1, 1, 1])
    p = np.array([0.1, 0.1, 0.9, 0.9])
    assert metrics.expected_calibration_error(y, p) == pytest.approx(0.25)
    assert metrics.expected_calibration_error(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.0)


def test_gains_by_decile_puts_all_buyers_in_the_top_decile_of_a_perfect_score() -> None:
    y = np.r_[np.ones(10), np.zeros(90)]
    gains = metrics.gains_by_decile(y, y + np.linspace(0, 0.1, 100))
    assert gains["rows"].tolist() == [10] * 10
    assert gains["lift"].iloc[0] == pytest.approx(10.0)
    assert gains["cumulative_gain"].iloc[0] == pytest.approx(1.0)


def test_ranking_metrics_by_hand() -> None:
    ranked = [["a", "b", "c"], ["x", "y", "z"], ["p", "q"]]
    bought = [{"b"}, {"x", "missing"}, {"r"}]
    table = metrics.ranking_metrics_per_user(ranked, bought, k=2)
    assert table["recall_at_2"].tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert table["hit_rate_at_2"].tolist() == [1.0, 1.0, 0.0]
    assert table["mrr_at_2"].tolist() == pytest.approx([0.5, 1.0, 0.0])
    # NDCG: user 1 hit at rank 2 -> (1/log2 3) / 1; user 2: hit at rank 1, ideal has two relevant -> 1 / (1 + 1/log2 3)
    assert table["ndcg_at_2"].tolist() == pytest.approx([1 / np.log2(3), 1 / (1 + 1 / np.log2(3)), 0.0])


def test_ndcg_matches_sklearn_when_every_relevant_item_is_ranked() -> None:
    from sklearn.metrics import ndcg_score

    rng = np.random.default_rng(0)
    relevance = (rng.uniform(size=(50, 20)) < 0.2).astype(int)
    relevance[:, 0] = 1
    scores = rng.uniform(size=(50, 20))
    ranked = [list(np.argsort(-s)) for s in scores]
    bought = [set(np.flatnonzero(r)) for r in relevance]
    table = metrics.ranking_metrics_per_user(ranked, bought, k=10)
    expected = [ndcg_score(r[None, :], s[None, :], k=10) for r, s in zip(relevance, scores)]
    assert table["ndcg_at_10"].to_numpy() == pytest.approx(expected)


def test_bootstrap_ci_brackets_the_mean() -> None:
    values = pd.DataFrame({"m": np.random.default_rng(1).uniform(size=500)})
    centre, low, high = metrics.bootstrap_ci(values, n_boot=100)["m"]
    assert low < centre < high
    assert high - low < 0.1
