"""One LightGBM fit: base parameters, query groups, early stopping on the validation rows."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np

from propensity.settings import TrainingSettings
from training.datasets import TrainingSet


def base_params(training: TrainingSettings, objective: str = "binary", train_rows: int | None = None) -> dict:
    """LightGBM's parameters for one fit; with train_rows, each tree is grown on at most training.max_rows_per_tree of them."""
    params = {
        "objective": objective,
        "learning_rate": training.learning_rate,
        "num_leaves": training.num_leaves,
        "min_data_in_leaf": training.min_data_in_leaf,
        "feature_fraction": 0.9,
        "bagging_fraction": 0.9,
        "bagging_freq": 1,
        "seed": training.seed,
        "deterministic": True,
        "num_threads": 2,
        "verbosity": -1,
    }
    if objective == "lambdarank":
        params.update(metric="ndcg", eval_at=[10])
    if train_rows and train_rows * params["bagging_fraction"] > training.max_rows_per_tree:
        # Histogram building, most of a fit, is linear in the rows a tree sees: past the cap a bigger shop bags a
        # smaller share instead of costing more per tree (7M ranker rows of the 20M-event shop: 3M per tree).
        params["bagging_fraction"] = round(training.max_rows_per_tree / train_rows, 4)
    return params


def group_sizes(groups: np.ndarray) -> np.ndarray:
    """Sizes of consecutive runs of equal group ids (LightGBM query groups)."""
    if not len(groups):
        return np.empty(0, dtype=int)
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1], True])
    return np.diff(starts)


def train_booster(params: dict, data: TrainingSet, train: np.ndarray, valid: np.ndarray, features: tuple[str, ...], training: TrainingSettings) -> lgb.Booster:
    """One LightGBM fit on the train rows with early stopping on the validation rows only."""
    ranking = params["objective"] == "lambdarank"
    train_set = lgb.Dataset(data.features[train], data.labels[train], feature_name=list(features), group=group_sizes(data.groups[train]) if ranking else None, free_raw_data=True)
    valid_set = lgb.Dataset(data.features[valid], data.labels[valid], reference=train_set, group=group_sizes(data.groups[valid]) if ranking else None)
    return lgb.train(
        params,
        train_set,
        num_boost_round=training.num_boost_round,
        valid_sets=[valid_set],
        valid_names=["validation"],
        callbacks=[lgb.early_stopping(training.early_stopping_rounds, first_metric_only=True, verbose=False)],
    )
