"""Time-boxed hyper-parameter search (Optuna TPE) on time-series folds inside the train + validation periods.

Fold f trains on every cut-off before cut-off c_f and early-stops / scores on c_f, for the last
`folds` cut-offs of train + validation; the test period is never seen. The chosen parameters
are returned and stored with the model's metadata.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from propensity.settings import TrainingSettings
from training.boosters import train_booster
from training.datasets import TrainingSet
from training.periods import Periods, naive_utc


@dataclass(frozen=True)
class TuningBudget:
    """How much search: at most n_trials trials and about `seconds` of wall time; folds = time-series folds."""

    n_trials: int = 15
    seconds: float = 60.0
    folds: int = 2
    seed: int = 0


def time_series_folds(data: TrainingSet, periods: Periods, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train mask, validation mask) per fold: expanding window, each fold validated on one later cut-off."""
    usable = list(periods.train) + list(periods.validation)
    cut = naive_utc(data.cutoffs)
    stamps = naive_utc(np.asarray(usable))
    result = []
    for c in stamps[-folds:]:
        train, valid = cut < c, cut == c
        if train.any() and valid.any() and len(np.unique(data.labels[train])) == 2 and len(np.unique(data.labels[valid])) == 2:
            result.append((train, valid))
    return result


def tune(
    name: str,
    data: TrainingSet,
    features: tuple[str, ...],
    periods: Periods,
    params: dict,
    training: TrainingSettings,
    budget: TuningBudget,
    progress: Callable[[str], None] = print,
) -> dict:
    """Search learning rate, leaves, leaf size, feature/bagging fractions and L2; return the best overrides ({} if no folds)."""
    import optuna


    folds = time_series_folds(data, periods, budget.folds)
    if not folds:
        progress(f"  {name}: no usable time-series folds, keeping default parameters")
        return {}
    ranking = params["objective"] == "lambdarank"

    def objective(trial: optuna.Trial) -> float:
        overrides = {
            "learning_rate": trial.suggest_float("learning_rate", 0.02, 0.2, log=True),
            "num_leaves": trial.suggest_int("num_leaves", 7, 127, log=True),
            "min_data_in_leaf": trial.suggest_int("min_data_in_leaf", 10, 400, log=True),
            "feature_fraction": trial.suggest_float("feature_fraction", 0.5, 1.0),
            "bagging_fraction": trial.suggest_float("bagging_fraction", 0.5, 1.0),
            "lambda_l2": trial.suggest_float("lambda_l2", 1e-3, 10.0, log=True),
        }
        losses = []
        for train, valid in folds:
            booster = train_booster({**params, **overrides}, data, train, valid, features, training)
            # Minimised: validation log loss, or 1 - NDCG@10 for the ranking objective.
            score = booster.best_score["validation"]
            losses.append(1.0 - score["ndcg@10"] if ranking else score["binary_logloss"])
        return float(np.mean(losses))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=budget.seed))
    study.enqueue_trial({"learning_rate": params["learning_rate"], "num_leaves": params["num_leaves"], "min_data_in_leaf": params["min_data_in_leaf"],
                         "feature_fraction": params["feature_fraction"], "bagging_fraction": params["bagging_fraction"], "lambda_l2": 1e-3})
    started = time.perf_counter()
    study.optimize(objective, n_trials=budget.n_trials, timeout=budget.seconds)
    progress(
        f"  {name}: tuned {len(study.trials)} trials on {len(folds)} time-series folds in {time.perf_counter() - started:.0f}s "
        f"(fold loss {study.trials[0].value:.4f} default -> {study.best_value:.4f})"
    )
    return dict(study.best_params)
