"""The training rows built from the real pipeline's Feast store equal what the serving code computes per user.

assemble builds the user model's rows a cut-off at a time through user_matrix (the batch path), and the ranker's
rows per user through UserState and pair_matrix; this checks both against one user_vector per row, and that the
rows' cut-offs are plain datetime64 the period masks split exactly.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from propensity.assembly import USER_MODEL_FEATURES, user_vector
from propensity.settings import Settings
from propensity.user_state import UserState
from tests.conftest import Pipeline
from training.prepare import load_prepared
from training.training_data import build_training_data


def test_user_rows_equal_one_user_vector_per_row_and_the_ranker_rows_start_with_them(pipeline: Pipeline) -> None:
    settings = Settings(data_dir=pipeline.data_dir, work_dir=pipeline.work_dir, feature_repo=pipeline.feature_repo)
    built = build_training_data(settings, load_prepared(settings.prepared_dir), progress=lambda _: None)
    users, pairs = built.data.users, built.data.pairs
    records = built.user_features.to_dict("records")
    assert len(records) == len(users.labels) == len(built.rows) > 1000
    expected = np.vstack([
        user_vector(UserState.from_row(str(r["user_id"]), r, built.catalogs[pd.Timestamp(r["event_timestamp"])]), pd.Timestamp(r["event_timestamp"]).timestamp())
        for r in records
    ]).astype(np.float32)
    np.testing.assert_array_equal(users.features, expected)  # NaN where NaN, every value identical
    assert not np.isnan(users.features[:, USER_MODEL_FEATURES.index("days_since_last_event")]).all()
    np.testing.assert_array_equal(users.labels, built.rows["label"].to_numpy())

    # Each ranker row carries its user's row first, and its group is that user's row id.
    assert len(pairs.labels) > 0
    np.testing.assert_array_equal(pairs.features[:, : len(USER_MODEL_FEATURES)], users.features[pairs.groups])
    np.testing.assert_array_equal(pairs.cutoffs, users.cutoffs[pairs.groups])

    # Cut-offs are naive UTC datetime64, and the periods split every row exactly once.
    for data in (users, pairs):
        assert data.cutoffs.dtype == np.dtype("datetime64[ns]")
        masks = np.vstack(built.periods.masks(data))
        assert (masks.sum(axis=0) == 1).all()
    stamps = pd.to_datetime(built.rows["event_timestamp"], utc=True).dt.tz_convert(None).to_numpy()
    np.testing.assert_array_equal(users.cutoffs, stamps)
