"""Tests for time-ordered periods, LightGBM query groups, data fingerprints and the continue_from refusal."""

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from propensity.model_registry import ContinuationError, check_continuation
from training.datasets import TrainingSet
from training.boosters import group_sizes
from training.periods import Periods

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def test_periods_put_test_after_validation_after_train() -> None:
    cutoffs = [T0 + timedelta(days=7 * i) for i in range(5)]
    periods = Periods.split(cutoffs)
    assert periods.train == cutoffs[:3] and periods.validation == [cutoffs[3]] and periods.test == [cutoffs[4]]
    assert max(periods.train) < min(periods.validation) < min(periods.test)


def test_two_cutoffs_have_no_test_period() -> None:
    periods = Periods.split([T0, T0 + timedelta(days=7)])
    assert periods.test == [] and len(periods.train) == 1 and len(periods.validation) == 1


def test_period_masks_select_rows_by_cutoff() -> None:
    cutoffs = [T0 + timedelta(days=7 * i) for i in range(4)]
    rows = np.array([cutoffs[i] for i in (0, 1, 1, 2, 3, 3)], dtype=object)
    data = TrainingSet(np.zeros((6, 1)), np.zeros(6), rows, np.arange(6))
    train, valid, test = Periods.split(cutoffs).masks(data)
    assert train.tolist() == [True, True, True, False, False, False]
    assert valid.tolist() == [False, False, False, True, False, False]
    assert test.tolist() == [False, False, False, False, True, True]


def test_group_sizes_of_consecutive_runs() -> None:
    assert group_sizes(np.array([4, 4, 4, 7, 9, 9])).tolist() == [3, 1, 2]
    assert group_sizes(np.array([], dtype=int)).tolist() == []


SERVICES = {"user": {"name": "propensity_user_v1", "fingerprint": "aaaa"}, "item": {"name": "propensity_item_v1", "fingerprint": "bbbb"}}


def _version(root: Path, version: str, services: dict) -> None:
    directory = root / "versions" / version
    directory.mkdir(parents=True)
    (directory / "metadata.json").write_text(json.dumps({"version": version, "feature_services": services}))


def test_continue_from_accepts_unchanged_services(tmp_path: Path) -> None:
    _version(tmp_path, "v1", SERVICES)
    assert check_continuation(tmp_path, "v1", SERVICES)["version"] == "v1"


@pytest.mark.parametrize(
    "changed",
    [
        {**SERVICES, "user": {"name": "propensity_user_v1", "fingerprint": "cccc"}},
        {**SERVICES, "item": {"name": "propensity_item_v2", "fingerprint": "bbbb"}},
    ],
)
def test_continue_from_refuses_changed_feature_services(tmp_path: Path, changed: dict) -> None:
    _version(tmp_path, "v1", SERVICES)
    with pytest.raises(ContinuationError, match="features changed"):
        check_continuation(tmp_path, "v1", changed)


def test_continue_from_an_unknown_version_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ContinuationError, match="not found"):
        check_continuation(tmp_path, "v404", SERVICES)


@pytest.mark.slow
def test_training_refuses_to_continue_a_model_whose_features_changed(pipeline, tmp_path: Path) -> None:
    from propensity.model_registry import current_version
    from propensity.settings import Settings
    from training.prepare import load_prepared
    from training.train import train

    work = tmp_path / "var"
    shutil.copytree(pipeline.work_dir / "prepared", work / "prepared")
    shutil.copytree(pipeline.work_dir / "models", work / "models")
    settings = Settings(work_dir=work, feature_repo=pipeline.feature_repo, data_dir=pipeline.data_dir)
    version = current_version(settings.model_dir)
    path = settings.model_dir / "versions" / version / "metadata.json"
    metadata = json.loads(path.read_text())
    assert metadata["data_fingerprint"]["n_events"] > 0 and metadata["data_fingerprint"]["fingerprint"]
    assert metadata["test_window"] is not None
    metadata["feature_services"]["user"]["fingerprint"] = "0" * 16
    path.write_text(json.dumps(metadata))
    with pytest.raises(ContinuationError, match=version):
        train(settings, load_prepared(settings.prepared_dir), promote_to_current=False, progress=lambda _: None, continue_from=version)
