"""Fit both models on time-ordered periods: train < validation < test, early stopping and calibration on validation only.

Shared by `propensity train` (training/train.py) and `propensity evaluate` (training/evaluation/),
so the evaluated models are fitted exactly as the served ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import lightgbm as lgb
import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

from propensity.model_registry import apply_calibration
from propensity.settings import TrainingSettings
from training.boosters import base_params, train_booster
from training.calibration import choose_calibration
from training.datasets import TrainingSet
from training.periods import Periods
from training.tuning import TuningBudget, tune

RANKER_OBJECTIVES = ("binary", "lambdarank")


@dataclass
class FittedModel:
    """A booster, its calibration map, and what was chosen on the way."""

    booster: lgb.Booster
    calibration: dict
    params: dict
    metrics: dict[str, float]
    objective: str = "binary"
    alternatives: dict[str, dict[str, float]] = field(default_factory=dict)  # validation ranking metrics per objective tried
    boosters: dict[str, lgb.Booster] = field(default_factory=dict)  # every objective's booster (evaluation compares them)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Calibrated probabilities, exactly as ModelBundle serves them."""
        return apply_calibration(self.calibration, self.raw(features))

    def raw(self, features: np.ndarray) -> np.ndarray:
        return self.booster.predict(features, num_iteration=self.booster.best_iteration)


def classification_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    p = np.clip(p, 1e-15, 1 - 1e-15)
    return {
        "auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "logloss": float(log_loss(y, p, labels=[0, 1])),
        "brier": float(np.mean((p - y) ** 2)),
        "positive_rate": float(np.mean(y)),
    }


def candidate_ranking(scores: np.ndarray, data: TrainingSet, mask: np.ndarray, k: int = 10) -> dict[str, float]:
    """NDCG@k / recall@k / hit rate@k within candidates over users with a bought candidate (model selection only)."""
    frame = pd.DataFrame({"group": data.groups[mask], "label": data.labels[mask], "score": scores})
    frame = frame[frame.groupby("group")["label"].transform("sum") > 0]
    if frame.empty:
        return {}
    frame = frame.sort_values(["group", "score"], ascending=[True, False], kind="stable")
    frame["rank"] = frame.groupby("group").cumcount()
    top = frame[frame["rank"] < k]
    gain = (top["label"] / np.log2(top["rank"] + 2)).groupby(top["group"]).sum()
    totals = frame.groupby("group")["label"].sum()
    ideal = totals.clip(upper=k).map(lambda n: float((1 / np.log2(np.arange(2, n + 2))).sum()))
    hits = top.groupby("group")["label"].sum().reindex(totals.index, fill_value=0)
    return {
        f"ndcg_at_{k}": float((gain.reindex(totals.index, fill_value=0) / ideal).mean()),
        f"recall_at_{k}": float((hits / totals).mean()),
        f"hit_rate_at_{k}": float((hits > 0).mean()),
        "ranking_users": int(len(totals)),
    }


def period_masks(name: str, data: TrainingSet, periods: Periods) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The train / validation / test masks, refusing a training or validation period with only one label class."""
    train, valid, test = periods.masks(data)
    for part, mask in (("training", train), ("validation", valid)):
        require_both_classes(name, part, int(mask.sum()), int(data.labels[mask].sum()))
    return train, valid, test


def require_both_classes(name: str, part: str, rows: int, positives: int) -> None:
    """Refuse a period whose rows are all one label class (counts only: the Dask engine checks per-cut-off summaries)."""
    if not 0 < positives < rows:
        raise ValueError(f"{name}: the {part} period has only one label class ({rows} rows); use a longer log or other cut-offs")


def fit_model(
    name: str,
    data: TrainingSet,
    features: tuple[str, ...],
    periods: Periods,
    training: TrainingSettings,
    budget: TuningBudget | None = None,
    objectives: tuple[str, ...] = ("binary",),
    progress: Callable[[str], None] = print,
) -> FittedModel:
    """Tune (optional, train+validation folds), fit per objective, keep the best on validation, calibrate on validation."""
    train, valid, test = period_masks(name, data, periods)
    candidates: dict[str, tuple[lgb.Booster, dict, dict]] = {}
    for objective in objectives:
        params = base_params(training, objective, int(train.sum()))
        tuned = {}
        if budget and budget.n_trials > 0:
            tuned = tune(name, data, features, periods, params, training, budget, progress)
            params = {**params, **tuned}
        booster = train_booster(params, data, train, valid, features, training)
        raw_valid = booster.predict(data.features[valid], num_iteration=booster.best_iteration)
        selection = candidate_ranking(raw_valid, data, valid) if len(objectives) > 1 else {}
        candidates[objective] = (booster, params, selection)
        if len(objectives) > 1:
            progress(f"  {name} [{objective}]: validation NDCG@10 {selection.get('ndcg_at_10', float('nan')):.3f} within candidates ({booster.best_iteration} trees)")
    return finish_model(name, data, (train, valid, test), candidates, objectives, training, progress)


def finish_model(
    name: str,
    data: TrainingSet,
    masks: tuple[np.ndarray, np.ndarray, np.ndarray],
    candidates: dict[str, tuple[lgb.Booster, dict, dict]],
    objectives: tuple[str, ...],
    training: TrainingSettings,
    progress: Callable[[str], None] = print,
) -> FittedModel:
    """finish_scored on in-memory rows: each booster scores the validation and test rows here."""
    train, valid, test = masks

    def scores(mask: np.ndarray) -> Callable[[lgb.Booster], np.ndarray]:
        return lambda booster: booster.predict(data.features[mask], num_iteration=booster.best_iteration)

    return finish_scored(
        name, int(train.sum()), (data.labels[valid], scores(valid)), (data.labels[test], scores(test)), candidates, objectives, training, progress
    )


PeriodScores = tuple[np.ndarray, Callable[[lgb.Booster], np.ndarray]]  # a period's labels, and its raw scores by a booster (best iteration)


def finish_scored(
    name: str,
    train_rows: int,
    valid: PeriodScores,
    test: PeriodScores,
    candidates: dict[str, tuple[lgb.Booster, dict, dict]],
    objectives: tuple[str, ...],
    training: TrainingSettings,
    progress: Callable[[str], None] = print,
    engine: str = "",
) -> FittedModel:
    """The best objective's booster on validation, calibrated on validation, with its validation (and test) metrics.

    Shared by every training engine (in process through finish_model, lightgbm.dask in training.dask_training, which
    scores the periods on its cluster, so no model inputs need to be on this machine): `candidates` holds
    (booster, params, within-candidates ranking metrics) per objective. `engine` is recorded in the params.
    """
    (valid_labels, valid_scores), (test_labels, test_scores) = valid, test
    objective = max(candidates, key=lambda o: candidates[o][2].get("ndcg_at_10", 0.0)) if len(candidates) > 1 else objectives[0]
    booster, params, _ = candidates[objective]
    raw_valid = valid_scores(booster)
    calibration, _ = choose_calibration(valid_labels, raw_valid, raw=objective == "lambdarank", seed=training.seed)
    params = {**params, "engine": engine} if engine else params
    model = FittedModel(booster, calibration, params, {}, objective, {o: c[2] for o, c in candidates.items()}, {o: c[0] for o, c in candidates.items()})
    p_valid = apply_calibration(calibration, raw_valid)  # = model.predict on the validation rows
    metrics = {
        **classification_metrics(valid_labels, p_valid),
        "train_rows": train_rows,
        "validation_rows": len(valid_labels),
        "best_iteration": int(booster.best_iteration),
    }
    if objective == "binary":
        metrics["uncalibrated_logloss"] = classification_metrics(valid_labels, raw_valid)["logloss"]
    if len(test_labels) and len(np.unique(test_labels)) == 2:
        metrics.update({f"test_{k}": v for k, v in classification_metrics(test_labels, apply_calibration(calibration, test_scores(booster))).items()})
        metrics["test_rows"] = len(test_labels)
    model.metrics = metrics
    progress(
        f"  {name}{f' ({engine})' if engine else ''}: validation AUC {metrics['auc']:.3f}, PR-AUC {metrics['pr_auc']:.3f}"
        + (f"; test AUC {metrics['test_auc']:.3f}" if "test_auc" in metrics else "")
        + f" ({metrics['validation_rows']:,} rows, {metrics['best_iteration']} trees, {objective}, calibration {calibration['method']})"
    )
    return model
