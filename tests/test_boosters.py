"""LightGBM's parameters: past training.max_rows_per_tree rows, each tree is grown on a bagged share of that size."""

from __future__ import annotations

import numpy as np
import pandas as pd

from propensity.settings import TrainingSettings
from training.boosters import base_params, train_booster
from training.datasets import TrainingSet


def test_the_bagging_fraction_shrinks_only_past_the_cap() -> None:
    training = TrainingSettings(max_rows_per_tree=1_000)
    assert base_params(training)["bagging_fraction"] == 0.9  # rows unknown: the default
    assert base_params(training, "binary", 1_000)["bagging_fraction"] == 0.9  # 900 rows per tree: under the cap
    assert base_params(training, "lambdarank", 4_000)["bagging_fraction"] == 0.25
    assert base_params(TrainingSettings(), "binary", 6_000_000)["bagging_fraction"] == 0.5


def test_a_capped_fit_grows_each_tree_on_the_capped_share() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4_000, 3)).astype(np.float32)
    y = (x[:, 0] + rng.normal(scale=0.5, size=len(x)) > 0).astype(np.int8)
    data = TrainingSet(x, y, np.full(len(x), pd.Timestamp("2024-01-01").to_datetime64()), np.arange(len(x)))
    train, valid = np.arange(len(x)) < 3_000, np.arange(len(x)) >= 3_000
    training = TrainingSettings(max_rows_per_tree=600, num_boost_round=5, early_stopping_rounds=5)
    booster = train_booster(base_params(training, "binary", int(train.sum())), data, train, valid, ("a", "b", "c"), training)
    assert booster.params["bagging_fraction"] == 0.2
    # The first tree's root counts the rows it was grown on: about 600 of 3,000 (LightGBM draws each row with the
    # bagging probability), against about 2,700 without the cap.
    def root_rows(fitted) -> int:
        return fitted.dump_model()["tree_info"][0]["tree_structure"]["internal_count"]

    uncapped = train_booster(base_params(TrainingSettings(num_boost_round=5), "binary", int(train.sum())), data, train, valid, ("a", "b", "c"), training)
    assert 500 < root_rows(booster) < 700 and 2_500 < root_rows(uncapped) < 2_900, (root_rows(booster), root_rows(uncapped))
