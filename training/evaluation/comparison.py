"""Model versus baseline: paired differences with bootstrap CIs, and verdicts that cannot overclaim.

A difference is a win or a loss only when its 95 % CI excludes 0 and at least MIN_POSITIVES
positives stand behind it (test buyers for ranking, positive rows for propensity); anything
else is inconclusive, so a small test period cannot be read as evidence either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from training import metrics

MIN_POSITIVES = 100
WIN, LOSS, INCONCLUSIVE = "win", "loss", "inconclusive"
_LABELS = {
    "roc_auc": "ROC-AUC",
    "pr_auc": "PR-AUC",
    "log_loss": "log loss",
    "recall_at_10": "Recall@10",
    "ndcg_at_10": "NDCG@10",
    "hit_rate_at_10": "HitRate@10",
    "mrr_at_10": "MRR@10",
}


def metric_label(metric: str) -> str:
    """How reports name a metric column."""
    return _LABELS.get(metric, metric)


def signed(value: float) -> str:
    """+0.012; values that would round to 0.000 keep one significant digit, so a CI bound never reads as 0 when it is not."""
    return f"{value:+.3f}" if value == 0 or abs(value) >= 5e-4 else f"{value:+.0e}"


def verdict(low: float, high: float, n_positive: int, higher_is_better: bool = True) -> str:
    """WIN or LOSS when the CI of (model - baseline) excludes 0 with at least MIN_POSITIVES positives, else INCONCLUSIVE."""
    if n_positive < MIN_POSITIVES or not (np.isfinite(low) and np.isfinite(high)) or low <= 0 <= high:
        return INCONCLUSIVE
    return WIN if (low > 0) == higher_is_better else LOSS


def inconclusive_reason(low: float, high: float, n_positive: int) -> str:
    """Why verdict() said INCONCLUSIVE ('' when it did not)."""
    reasons = []
    if n_positive < MIN_POSITIVES:
        reasons.append(f"only {n_positive} positives (< {MIN_POSITIVES})")
    if not (np.isfinite(low) and np.isfinite(high)):
        reasons.append("no CI")
    elif low <= 0 <= high:
        reasons.append("CI crosses 0")
    return "; ".join(reasons)


@dataclass(frozen=True)
class Comparison:
    """model minus baseline on one metric of one task, with its paired-bootstrap 95 % CI."""

    task: str  # "propensity" or "ranking"
    metric: str
    model: str
    baseline: str
    model_value: float
    baseline_value: float
    difference: float
    ci_low: float
    ci_high: float
    n_positive: int
    higher_is_better: bool

    @property
    def verdict(self) -> str:
        return verdict(self.ci_low, self.ci_high, self.n_positive, self.higher_is_better)

    @property
    def reason(self) -> str:
        return inconclusive_reason(self.ci_low, self.ci_high, self.n_positive)

    def to_json(self) -> dict:
        return asdict(self) | {"verdict": self.verdict, "reason": self.reason}


def compare_rankings(
    tables: Mapping[str, pd.DataFrame], model: str, baselines: Sequence[str], n_boot: int = 200, seed: int = 0
) -> list[Comparison]:
    """The model's per-user ranking table against each baseline's, on every column (all higher-is-better)."""
    ours = tables[model]
    result = []
    for baseline in baselines:
        theirs = tables[baseline]
        for column, (difference, low, high) in metrics.paired_bootstrap_means(ours, theirs, n_boot, seed).items():
            result.append(
                Comparison("ranking", column, model, baseline, float(ours[column].mean()), float(theirs[column].mean()), difference, low, high, len(ours), True)
            )
    return result


def compare_propensity(
    y: np.ndarray, scores: Mapping[str, np.ndarray], model: str, baselines: Sequence[str], n_boot: int = 200, seed: int = 0
) -> list[Comparison]:
    """The model's scores against each baseline's on every metrics.ROW_METRICS metric, rows resampled in pairs."""
    functions = {name: fn for name, (fn, _) in metrics.ROW_METRICS.items()}
    n_positive = int(np.asarray(y).sum())
    result = []
    for baseline in baselines:
        differences = metrics.paired_bootstrap_rows(y, scores[model], scores[baseline], functions, n_boot, seed)
        for name, (difference, low, high) in differences.items():
            fn, higher = metrics.ROW_METRICS[name]
            result.append(
                Comparison("propensity", name, model, baseline, fn(y, scores[model]), fn(y, scores[baseline]), difference, low, high, n_positive, higher)
            )
    return result


def against_best_baseline(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """Per (task, metric): the comparison with the baseline whose point value is best (highest; lowest for log loss)."""
    best: dict[tuple[str, str], Comparison] = {}
    for c in comparisons:
        key = (c.task, c.metric)
        sign = 1 if c.higher_is_better else -1
        if key not in best or sign * c.baseline_value > sign * best[key].baseline_value:
            best[key] = c
    return list(best.values())
