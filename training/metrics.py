"""Evaluation metrics: propensity (probability quality, thresholded, lift) and ranking (per-user top-k), with bootstrap CIs.

Everything here is pure numpy / pandas on arrays of labels and scores, so it is tested against
scikit-learn where scikit-learn has the same metric. Paired bootstraps resample the same users
(or rows) for both arms of a comparison, so what is shared between the arms cancels out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

EPS = 1e-15


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """ECE with equal-width probability bins: sum over bins of |mean(y) - mean(p)| weighted by the bin's share of rows."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total += mask.mean() * abs(y[mask].mean() - p[mask].mean())
    return float(total)


def reliability_curve(y: np.ndarray, p: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Per equal-width bin: rows, mean predicted probability, observed rate (for calibration plots)."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    frame = pd.DataFrame({"bin": idx, "y": y, "p": p}).groupby("bin").agg(rows=("y", "size"), predicted=("p", "mean"), observed=("y", "mean"))
    return frame.reset_index()


def threshold_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Precision, recall and F1 when everyone scoring at or above threshold is called a buyer."""
    y = np.asarray(y).astype(bool)
    predicted = np.asarray(p) >= threshold
    tp = float((predicted & y).sum())
    precision = tp / predicted.sum() if predicted.sum() else 0.0
    recall = tp / y.sum() if y.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "f1": f1, "flagged_share": float(predicted.mean())}


def gains_by_decile(y: np.ndarray, p: np.ndarray) -> pd.DataFrame:
    """Rows sorted by score into 10 equal groups (decile 1 = highest scores): buyers, rate, lift, cumulative gain."""
    y = np.asarray(y, dtype=float)
    order = np.argsort(-np.asarray(p, dtype=float), kind="stable")
    decile = np.empty(len(y), dtype=int)
    decile[order] = np.arange(len(y)) * 10 // max(len(y), 1) + 1
    frame = pd.DataFrame({"decile": decile, "y": y}).groupby("decile").agg(rows=("y", "size"), buyers=("y", "sum"))
    frame["rate"] = frame["buyers"] / frame["rows"]
    base = y.mean() if len(y) else np.nan
    frame["lift"] = frame["rate"] / base if base else np.nan
    frame["cumulative_gain"] = frame["buyers"].cumsum() / max(y.sum(), 1)
    return frame.reset_index()


def propensity_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Every propensity metric of the report for one model on one period."""
    y, p = np.asarray(y), np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    gains = gains_by_decile(y, p)
    return {
        "roc_auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "brier": float(brier_score_loss(y, p)),
        "ece": expected_calibration_error(y, p),
        "positive_rate": float(np.mean(y)),
        "mean_prediction": float(np.mean(p)),
        "lift_top_decile": float(gains["lift"].iloc[0]),
        "gain_top_3_deciles": float(gains["cumulative_gain"].iloc[min(2, len(gains) - 1)]),
        **{f"{k}_at_threshold" if k != "threshold" else k: v for k, v in threshold_metrics(y, p, threshold).items()},
        "rows": int(len(y)),
    }


def ranking_metrics_per_user(ranked: Sequence[Sequence], relevant: Sequence[set], k: int = 10) -> pd.DataFrame:
    """Per user: recall@k, NDCG@k, hit@k and reciprocal rank of a ranked item list against the set of items bought.

    Only users with at least one bought item belong here; a bought item missing from the ranked list
    never counts as a hit (this is how candidate recall bounds the ranker's recall).
    """
    hits = [np.fromiter((i in bought for i in items), dtype=bool, count=len(items)) for items, bought in zip(ranked, relevant)]
    return ranking_from_hits(hits, [len(b) for b in relevant], k)


def ranking_from_hits(hits: list[np.ndarray], n_relevant: Sequence[int], k: int = 10) -> pd.DataFrame:
    """The same metrics from each user's hit flags in rank order and number of relevant items."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    rows = []
    for flags, n in zip(hits, n_relevant):
        flags = np.asarray(flags, dtype=bool)
        top = flags[:k]
        ideal = discounts[: min(n, k)].sum()
        first = np.flatnonzero(top)  # MRR@k: lists of different lengths stay comparable
        rows.append(
            (
                top.sum() / n,
                float((top * discounts[: len(top)]).sum() / ideal) if ideal else 0.0,
                float(top.any()),
                1.0 / (first[0] + 1) if len(first) else 0.0,
            )
        )
    return pd.DataFrame(rows, columns=[f"recall_at_{k}", f"ndcg_at_{k}", f"hit_rate_at_{k}", f"mrr_at_{k}"])


def bootstrap_ci(values: pd.DataFrame, n_boot: int = 200, seed: int = 0, alpha: float = 0.05) -> dict[str, tuple[float, float, float]]:
    """Mean and percentile bootstrap CI of every column of a per-user table (users resampled with replacement)."""
    rng = np.random.default_rng(seed)
    data = values.to_numpy(dtype=float)
    n = len(data)
    if n == 0:
        return {c: (np.nan, np.nan, np.nan) for c in values.columns}
    idx = rng.integers(0, n, size=(n_boot, n))
    means = data[idx].mean(axis=1)  # (n_boot, columns)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=0)
    centre = data.mean(axis=0)
    return {c: (float(centre[j]), float(low[j]), float(high[j])) for j, c in enumerate(values.columns)}


def bootstrap_metric(y: np.ndarray, p: np.ndarray, metric: Callable[[np.ndarray, np.ndarray], float], n_boot: int = 200, seed: int = 0) -> tuple[float, float]:
    """Percentile 95 % CI of a row-level metric (e.g. ROC-AUC) by resampling rows."""
    rng = np.random.default_rng(seed)
    y, p = np.asarray(y), np.asarray(p)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) == 2:
            values.append(metric(y[idx], p[idx]))
    return (float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))) if values else (np.nan, np.nan)


def fast_roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC-AUC from average ranks (Mann-Whitney), equal to scikit-learn's; fast enough to call in every bootstrap resample."""
    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if not n_pos or not n_neg:
        return np.nan
    ranks = rankdata(np.asarray(p, dtype=float))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def clipped_log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary log loss with p clipped to [EPS, 1 - EPS], as propensity_metrics reports it."""
    y, p = np.asarray(y, dtype=float), np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def pr_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision (the PR-AUC of the report)."""
    return float(average_precision_score(y, p))


# Row-level propensity metrics compared between models, with whether higher is better.
ROW_METRICS: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], bool]] = {
    "roc_auc": (fast_roc_auc, True),
    "pr_auc": (pr_auc, True),
    "log_loss": (clipped_log_loss, False),
}


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    if not len(values):
        return np.nan, np.nan
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def paired_bootstrap_means(a: pd.DataFrame, b: pd.DataFrame, n_boot: int = 200, seed: int = 0, alpha: float = 0.05) -> dict[str, tuple[float, float, float]]:
    """Per column: mean(a) - mean(b) and its percentile CI, each resample drawing the same users (row indices) for both arms.

    a and b are per-user tables of the same users in the same order (e.g. ranking_from_hits of two models).
    """
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        raise ValueError(f"paired tables differ: {a.shape} {list(a.columns)} vs {b.shape} {list(b.columns)}")
    diff = a.to_numpy(dtype=float) - b.to_numpy(dtype=float)
    n = len(diff)
    if n == 0:
        return {c: (np.nan, np.nan, np.nan) for c in a.columns}
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    result = {}
    for j, column in enumerate(a.columns):
        # A mean of differences is the difference of means, so one array per column is enough.
        result[column] = (float(diff[:, j].mean()), *_percentile_ci(diff[idx, j].mean(axis=1), alpha))
    return result


def paired_bootstrap_rows(
    y: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    metrics: Mapping[str, Callable[[np.ndarray, np.ndarray], float]],
    n_boot: int = 200,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float, float]]:
    """Per metric: metric(y, a) - metric(y, b) and its percentile CI, each resample drawing the same rows for both arms.

    Resamples holding only one class are skipped for both arms alike (no AUC is defined there).
    """
    y, a, b = np.asarray(y), np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in metrics}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) < 2:
            continue
        for name, metric in metrics.items():
            draws[name].append(metric(y[idx], a[idx]) - metric(y[idx], b[idx]))
    return {name: (float(metric(y, a) - metric(y, b)), *_percentile_ci(np.asarray(draws[name]), alpha)) for name, metric in metrics.items()}
