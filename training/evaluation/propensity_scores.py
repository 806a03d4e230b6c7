"""The user model and its baselines scored on the test rows (one row per user and test cut-off, pooled)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

from training import baselines, metrics
from training.models import FittedModel

if TYPE_CHECKING:
    from training.training_data import TrainingData

MODEL = "lightgbm"  # the calibrated probability, as served


@dataclass(frozen=True)
class ScoredRows:
    """Labels, identities and every model's scores on the test rows, in entity-row order."""

    y: np.ndarray
    user_ids: np.ndarray
    cutoffs: pd.DatetimeIndex  # UTC, per row
    scores: dict[str, np.ndarray]
    threshold: float  # best F1 on validation

    @property
    def baselines(self) -> list[str]:
        return [name for name in self.scores if name.endswith("_baseline")]

    def at(self, cutoff: pd.Timestamp) -> np.ndarray:
        """Mask of the rows at one test cut-off."""
        return np.asarray(self.cutoffs == cutoff)


def score_test_rows(built: TrainingData, user_model: FittedModel, seed: int, progress: Callable[[str], None] = print) -> ScoredRows:
    """Scores of the user model (calibrated and raw), the MLP and the base rate on built's test rows."""
    users = built.data.users
    train, valid, test = built.periods.masks(users)
    x_test = users.features[test]
    scores = {MODEL: user_model.predict(x_test), "lightgbm_uncalibrated": user_model.raw(x_test)}
    progress("  fitting the MLP baseline")
    mlp = baselines.fit_mlp(users.features[train], users.labels[train], seed=seed)
    scores["mlp_baseline"] = baselines.predict_mlp(mlp, x_test)
    scores["base_rate_baseline"] = np.full(int(test.sum()), users.labels[train].mean())
    rows = built.rows
    return ScoredRows(
        y=users.labels[test],
        user_ids=rows["user_id"].astype(str).to_numpy()[test],
        cutoffs=pd.DatetimeIndex(pd.to_datetime(rows["event_timestamp"], utc=True)[test]),
        scores=scores,
        threshold=best_f1_threshold(users.labels[valid], user_model.predict(users.features[valid])),
    )


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold that maximises F1 on the validation period (stated in the report, applied to test)."""
    grid = np.unique(np.quantile(p, np.linspace(0.5, 0.995, 100)))
    return float(max(grid, key=lambda t: f1_score(y, p >= t, zero_division=0))) if len(grid) else 0.5


def propensity_table(rows: ScoredRows, n_boot: int, seed: int) -> dict[str, dict[str, float]]:
    """Every propensity metric per model, with a bootstrap ROC-AUC CI for the models that rank users."""
    table = {}
    for name, p in rows.scores.items():
        values = metrics.propensity_metrics(rows.y, p, rows.threshold)
        if name != "base_rate_baseline":
            values["roc_auc_ci_low"], values["roc_auc_ci_high"] = metrics.bootstrap_metric(rows.y, p, metrics.fast_roc_auc, n_boot=n_boot, seed=seed)
        table[name] = values
    return table
