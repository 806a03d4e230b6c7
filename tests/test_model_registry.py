"""Tests for the model registry: save, promote, list and load versions with the feature-layout check."""

import json
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from propensity.assembly import RANKER_FEATURES, USER_MODEL_FEATURES
from propensity.model_registry import (
    CURRENT,
    METADATA,
    RANKER_MODEL,
    USER_MODEL,
    ModelBundle,
    ModelLoadError,
    current_version,
    list_versions,
    load_version,
    promote,
    save_version,
)
from tests.tiny_models import tiny_booster

@pytest.fixture(scope="module")
def boosters() -> dict[str, lgb.Booster]:
    return {USER_MODEL: tiny_booster(USER_MODEL_FEATURES), RANKER_MODEL: tiny_booster(RANKER_FEATURES, seed=1)}


def _metadata(version: str, user_features: tuple[str, ...] | list[str] = USER_MODEL_FEATURES) -> dict:
    """Shaped like training/train.py writes it (only the keys the registry and server read)."""
    return {
        "version": version,
        "trained_at": "2024-01-01T00:00:00+00:00",
        "horizon_days": 7,
        "train_window": {"start": "2023-12-01T00:00:00+00:00", "end": "2023-12-22T00:00:00+00:00"},
        "feature_services": {
            "user": {"name": "propensity_user_v1", "fingerprint": "0123456789abcdef"},
            "item": {"name": "propensity_item_v1", "fingerprint": "fedcba9876543210"},
        },
        "models": {
            USER_MODEL: {"feature_names": list(user_features), "metrics": {"auc": 0.7}, "base_rate": 0.125},
            RANKER_MODEL: {"feature_names": list(RANKER_FEATURES), "metrics": {"auc": 0.8}, "base_rate": 0.05},
        },
    }


def test_save_writes_models_and_metadata(tmp_path: Path, boosters: dict[str, lgb.Booster]) -> None:
    directory = save_version(tmp_path, "v1", boosters, _metadata("v1"))
    assert directory == tmp_path / "versions" / "v1"
    assert sorted(p.name for p in directory.iterdir()) == [f"{RANKER_MODEL}.txt", METADATA, f"{USER_MODEL}.txt"]
    metadata = json.loads((directory / METADATA).read_text())
    assert metadata["models"][USER_MODEL]["file"] == f"{USER_MODEL}.txt"
    assert metadata["models"][RANKER_MODEL]["file"] == f"{RANKER_MODEL}.txt"
    assert [p.name for p in (tmp_path / "versions").iterdir()] == ["v1"]  # no staging directory left


def test_save_refuses_an_existing_version(tmp_path: Path, boosters: dict[str, lgb.Booster]) -> None:
    save_version(tmp_path, "v1", boosters, _metadata("v1"))
    before = (tmp_path / "versions" / "v1" / METADATA).read_text()
    with pytest.raises(FileExistsError, match="v1 already exists"):
        save_version(tmp_path, "v1", boosters, _metadata("v1") | {"trained_at": "later"})
    assert (tmp_path / "versions" / "v1" / METADATA).read_text() == before


def test_promote_and_load_round_trip(tmp_path: Path, boosters: dict[str, lgb.Booster]) -> None:
    save_version(tmp_path, "v1", boosters, _metadata("v1"))
    promote(tmp_path, "v1")
    assert current_version(tmp_path) == "v1"
    bundle = load_version(tmp_path)
    assert isinstance(bundle, ModelBundle)
    assert bundle.version == "v1"
    assert bundle.base_rate == 0.125
    assert bundle.user_feature_service == "propensity_user_v1"
    assert bundle.item_feature_service == "propensity_item_v1"
    assert bundle.user_model.feature_name() == list(USER_MODEL_FEATURES)
    assert bundle.ranker.feature_name() == list(RANKER_FEATURES)
    x_user = np.random.default_rng(5).normal(size=(3, len(USER_MODEL_FEATURES)))
    x_pair = np.random.default_rng(6).normal(size=(4, len(RANKER_FEATURES)))
    np.testing.assert_allclose(bundle.predict_users(x_user), boosters[USER_MODEL].predict(x_user))
    np.testing.assert_allclose(bundle.predict_items(x_pair), boosters[RANKER_MODEL].predict(x_pair))
    assert ((bundle.predict_users(x_user) > 0) & (bundle.predict_users(x_user) < 1)).all()
    assert bundle.predict_users(np.empty((0, len(USER_MODEL_FEATURES)))).shape == (0,)
    assert bundle.predict_items(np.empty((0, len(RANKER_FEATURES)))).shape == (0,)


def test_promote_replaces_current_and_leaves_no_temp_file(tmp_path: Path, boosters: dict[str, lgb.Booster]) -> None:
    for version in ("v1", "v2"):
        save_version(tmp_path, version, boosters, _metadata(version))
    promote(tmp_path, "v1")
    promote(tmp_path, "v2")
    assert (tmp_path / CURRENT).read_text() == "v2\n"
    assert current_version(tmp_path) == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [CURRENT, "versions"]
    assert load_version(tmp_path).version == "v2"
    assert load_version(tmp_path, "v1").version == "v1"


def test_promote_of_a_missing_version_keeps_the_current_one(tmp_path: Path, boosters: dict[str, lgb.Booster]) -> None:
    save_version(tmp_path, "v1", boosters, _metadata("v1"))
    promote(tmp_path, "v1")
    with pytest.raises(ModelLoadError, match="no model version v9"):
        promote(tmp_path, "v9")
    assert current_version(tmp_path) == "v1"


def test_list_versions_sorted_and_without_staging(tmp_path: Path, boosters: dict[str, lgb.Booster]) -> None:
    assert list_versions(tmp_path) == []
    for version in ("v20240102T000000", "v20240101T000000"):
        save_version(tmp_path, version, boosters, _metadata(version))
    (tmp_path / "versions" / ".v20240103T000000.tmp").mkdir()  # an interrupted save
    assert list_versions(tmp_path) == ["v20240101T000000", "v20240102T000000"]


def test_no_current_version(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no current model"):
        current_version(tmp_path)
    with pytest.raises(ModelLoadError, match="no current model"):
        load_version(tmp_path)


def test_load_of_a_missing_version(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model version v7 not found"):
        load_version(tmp_path, "v7")


def test_load_with_a_missing_model_file(tmp_path: Path, boosters: dict[str, lgb.Booster]) -> None:
    directory = save_version(tmp_path, "v1", boosters, _metadata("v1"))
    (directory / f"{RANKER_MODEL}.txt").unlink()
    with pytest.raises(ModelLoadError, match="cannot load LightGBM model"):
        load_version(tmp_path, "v1")


def test_load_with_a_corrupt_model_file(tmp_path: Path, boosters: dict[str, lgb.Booster]) -> None:
    directory = save_version(tmp_path, "v1", boosters, _metadata("v1"))
    (directory / f"{USER_MODEL}.txt").write_text("not a model\n")
    with pytest.raises(ModelLoadError, match="cannot load LightGBM model"):
        load_version(tmp_path, "v1")


def test_load_with_metadata_missing_a_model(tmp_path: Path, boosters: dict[str, lgb.Booster]) -> None:
    metadata = _metadata("v1")
    del metadata["models"][RANKER_MODEL]
    save_version(tmp_path, "v1", {USER_MODEL: boosters[USER_MODEL]}, metadata)
    with pytest.raises(ModelLoadError, match="metadata has no model 'item_ranker'"):
        load_version(tmp_path, "v1")


def test_booster_with_a_different_feature_layout_is_refused(tmp_path: Path, boosters: dict[str, lgb.Booster]) -> None:
    old_layout = [name for name in USER_MODEL_FEATURES if name != "sessions_7d"] + ["legacy_score"]
    save_version(tmp_path, "v1", {USER_MODEL: tiny_booster(old_layout), RANKER_MODEL: boosters[RANKER_MODEL]}, _metadata("v1", old_layout))
    with pytest.raises(ModelLoadError) as error:
        load_version(tmp_path, "v1")
    message = str(error.value)
    assert "user_propensity" in message
    assert "missing ['sessions_7d']" in message
    assert "unexpected ['legacy_score']" in message


def test_metadata_feature_names_disagreeing_with_the_code_are_refused(tmp_path: Path, boosters: dict[str, lgb.Booster]) -> None:
    reordered = list(reversed(USER_MODEL_FEATURES))
    save_version(tmp_path, "v1", boosters, _metadata("v1", reordered))
    with pytest.raises(ModelLoadError, match="different feature layout"):
        load_version(tmp_path, "v1")


def test_booster_with_reordered_features_is_refused(tmp_path: Path, boosters: dict[str, lgb.Booster]) -> None:
    reordered = list(reversed(USER_MODEL_FEATURES))
    save_version(tmp_path, "v1", {USER_MODEL: tiny_booster(reordered), RANKER_MODEL: boosters[RANKER_MODEL]}, _metadata("v1"))
    with pytest.raises(ModelLoadError, match="different feature layout"):
        load_version(tmp_path, "v1")


def test_unreadable_metadata_is_a_model_load_error(tmp_path: Path, boosters: dict[str, lgb.Booster]) -> None:
    directory = save_version(tmp_path, "v1", boosters, _metadata("v1"))
    (directory / METADATA).write_text('{"models": ')  # truncated write, e.g. disk full
    with pytest.raises(ModelLoadError):
        load_version(tmp_path, "v1")
