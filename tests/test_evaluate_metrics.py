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


def test_fast_roc_auc_and_clipped_log_loss_match_sklearn(scored) -> None:
    from sklearn.metrics import log_loss

    y, p = scored
    tied = np.round(p, 1)  # ties get average ranks, as in scikit-learn
    assert metrics.fast_roc_auc(y, p) == pytest.approx(roc_auc_score(y, p))
    assert metrics.fast_roc_auc(y, tied) == pytest.approx(roc_auc_score(y, tied))
    assert np.isnan(metrics.fast_roc_auc(np.ones(5), p[:5]))
    assert metrics.clipped_log_loss(y, p) == pytest.approx(log_loss(y, np.clip(p, metrics.EPS, 1 - metrics.EPS)))


def _ranking_table(rng: np.random.Generator, n: int) -> pd.DataFrame:
    return pd.DataFrame({"recall_at_10": rng.uniform(size=n), "ndcg_at_10": rng.uniform(size=n)})


def test_paired_bootstrap_means_is_the_hand_computed_percentile_interval_of_resampled_mean_differences() -> None:
    rng = np.random.default_rng(5)
    a, b = _ranking_table(rng, 40), _ranking_table(rng, 40)
    got = metrics.paired_bootstrap_means(a, b, n_boot=50, seed=9)
    idx = np.random.default_rng(9).integers(0, 40, size=(50, 40))  # the same users for both arms in each resample
    for column in a.columns:
        draws = [a[column].to_numpy()[i].mean() - b[column].to_numpy()[i].mean() for i in idx]
        difference, low, high = got[column]
        assert difference == pytest.approx(a[column].mean() - b[column].mean())
        assert (low, high) == pytest.approx(tuple(np.quantile(draws, [0.025, 0.975])))


def test_paired_bootstrap_means_of_identical_arms_is_zero_width_at_zero_and_of_a_shift_is_that_shift() -> None:
    table = _ranking_table(np.random.default_rng(1), 300)
    same = metrics.paired_bootstrap_means(table, table.copy(), n_boot=100)
    assert all(v == (0.0, 0.0, 0.0) for v in same.values())
    shifted = metrics.paired_bootstrap_means(table + 0.07, table, n_boot=100)
    for difference, low, high in shifted.values():
        assert difference == pytest.approx(0.07) and low == pytest.approx(0.07) and high == pytest.approx(0.07)
    with pytest.raises(ValueError, match="paired tables differ"):
        metrics.paired_bootstrap_means(table, table.iloc[:10])


def test_paired_bootstrap_rows_resamples_rows_in_pairs(scored) -> None:
    y, p = scored
    y, p = y[:300], p[:300]
    other = np.random.default_rng(2).uniform(size=300)
    fns = {"roc_auc": metrics.fast_roc_auc, "mean": lambda _y, q: float(np.mean(q))}
    same = metrics.paired_bootstrap_rows(y, p, p.copy(), fns, n_boot=50)
    assert same["roc_auc"] == (0.0, 0.0, 0.0)
    assert metrics.paired_bootstrap_rows(y, p + 0.25, p, fns, n_boot=50)["mean"] == pytest.approx((0.25, 0.25, 0.25))
    got = metrics.paired_bootstrap_rows(y, p, other, fns, n_boot=50, seed=4)
    rng = np.random.default_rng(4)
    draws = []
    for _ in range(50):
        i = rng.integers(0, 300, 300)
        draws.append(roc_auc_score(y[i], p[i]) - roc_auc_score(y[i], other[i]))
    assert got["roc_auc"] == pytest.approx((roc_auc_score(y, p) - roc_auc_score(y, other), *np.quantile(draws, [0.025, 0.975])))
    assert got["roc_auc"][1] > 0  # p carries the labels' signal, other is noise


def test_paired_bootstrap_rows_skips_resamples_with_one_class_for_both_arms() -> None:
    y = np.r_[1, np.zeros(9, dtype=int)]
    p = np.linspace(0, 1, 10)
    difference, low, high = metrics.paired_bootstrap_rows(y, p, p[::-1], {"roc_auc": metrics.fast_roc_auc}, n_boot=200)["roc_auc"]
    assert np.isfinite([difference, low, high]).all()
