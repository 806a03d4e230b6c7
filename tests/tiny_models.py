"""Small real LightGBM boosters for tests that need a model file but not a trained pipeline.

The label follows the first feature (and the last, with `last_too`), plus noise, so a booster really splits and
its scores vary: enough for the registry, hot reload, calibration and compiled-tree tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightgbm as lgb
import numpy as np


def tiny_booster(
    features: Sequence[str], seed: int = 0, *, rows: int = 200, rounds: int = 5, num_leaves: int = 4,
    objective: str = "binary", last_too: bool = False,
) -> lgb.Booster:
    """A booster over `features` fitted on `rows` random rows (query groups of 40 rows for lambdarank)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, len(features)))
    signal = x[:, 0] + (x[:, -1] if last_too else 0.0)
    y = (signal + rng.normal(scale=0.5, size=rows) > 0).astype(int)
    params = {"objective": objective, "verbosity": -1, "num_leaves": num_leaves, "min_data_in_leaf": 5, "num_threads": 1, "seed": seed}
    group = [40] * (rows // 40) if objective == "lambdarank" else None
    return lgb.train(params, lgb.Dataset(x, y, feature_name=list(features), group=group), num_boost_round=rounds)
