"""Batch scoring on the small real pipeline: every active user, top-N distinct items, offline features at a timestamp."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from propensity.model_registry import load_version
from propensity.settings import Settings
from training.batch_scoring import active_users, score_batch
from training.prepare import load_prepared

pytestmark = pytest.mark.slow


def test_score_batch_writes_top_items_for_every_active_user(pipeline, tmp_path: Path) -> None:
    settings = Settings(work_dir=pipeline.work_dir, feature_repo=pipeline.feature_repo, data_dir=pipeline.data_dir)
    at = load_prepared(settings.prepared_dir).as_of
    out = tmp_path / "scores.parquet"
    summary = score_batch(settings, at, out, top_n=5, chunk_size=200, progress=lambda _: None)
    frame = pd.read_parquet(out)
    expected = set(active_users(settings.prepared_dir, at))
    assert set(frame["user_id"]) == expected and summary.users == len(expected)
    assert frame.groupby("user_id")["rank"].max().le(5).all()
    assert not frame.duplicated(["user_id", "item_id"]).any()
    assert frame["propensity"].between(0, 1).all() and frame["item_score"].between(0, 1).all()
    # Items are in descending score order within each user.
    assert frame.groupby("user_id")["item_score"].apply(lambda s: bool(np.all(np.diff(s.to_numpy()) <= 1e-12))).all()
    bundle = load_version(settings.model_dir)
    assert frame["propensity"].mean() == pytest.approx(bundle.base_rate, abs=0.15)
