"""ModelBundle.score_items: raw and calibrated ranker scores from one model call, LightGBM and compiled alike."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from propensity import compiled as compiled_trees
from propensity.assembly import RANKER_FEATURES, USER_MODEL_FEATURES
from propensity.model_registry import (
    RANKER_MODEL,
    USER_MODEL,
    ModelBundle,
    ModelLoadError,
    apply_calibration,
    load_version,
    save_version,
)
from tests.tiny_models import tiny_booster

ISOTONIC = {"method": "isotonic", "x": [0.0, 0.3, 0.3000001, 0.6, 0.6000001, 1.0], "y": [0.02, 0.02, 0.1, 0.1, 0.3, 0.3], "input": "probability"}


def _booster(features: tuple[str, ...], objective: str = "binary", seed: int = 0) -> lgb.Booster:
    return tiny_booster(features, seed, rows=400, rounds=15, num_leaves=8, objective=objective, last_too=True)


def _metadata(calibration: dict | None) -> dict:
    ranker = {"feature_names": list(RANKER_FEATURES), "metrics": {}, "base_rate": 0.05}
    if calibration is not None:
        ranker["calibration"] = calibration
    return {
        "version": "v1", "trained_at": "2024-01-01T00:00:00+00:00", "horizon_days": 7,
        "train_window": {"start": "2023-12-01", "end": "2023-12-22"},
        "feature_services": {"user": {"name": "users_v1", "fingerprint": "f1"}, "item": {"name": "items_v1", "fingerprint": "f2"}},
        "models": {USER_MODEL: {"feature_names": list(USER_MODEL_FEATURES), "metrics": {}, "base_rate": 0.1}, RANKER_MODEL: ranker},
    }


class _CountingBooster:
    """A Booster that counts predict calls."""

    def __init__(self, booster: lgb.Booster) -> None:
        self._booster = booster
        self.calls: list[dict] = []

    def predict(self, data: np.ndarray, **kwargs: object) -> np.ndarray:
        self.calls.append(kwargs)
        return self._booster.predict(data, **kwargs)

    def __getattr__(self, name: str) -> object:
        return getattr(self._booster, name)


def _rows(n: int = 300) -> np.ndarray:
    return np.random.default_rng(3).normal(size=(n, len(RANKER_FEATURES)))


@pytest.mark.parametrize("calibration", [None, {"method": "platt", "a": 1.3, "b": -0.4, "input": "probability"}, ISOTONIC],
                         ids=["none", "platt", "isotonic"])
def test_lightgbm_path_gives_raw_and_calibrated_scores_in_one_call(calibration: dict | None) -> None:
    booster = _booster(RANKER_FEATURES)
    counting = _CountingBooster(booster)
    bundle = ModelBundle("v1", _metadata(calibration), booster, counting)  # type: ignore[arg-type]
    x = _rows()
    scored = bundle.score_items(x)
    assert len(counting.calls) == 1
    np.testing.assert_allclose(scored.raw, booster.predict(x, raw_score=True), rtol=0, atol=1e-12)
    np.testing.assert_allclose(scored.calibrated, apply_calibration(calibration, booster.predict(x)), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(bundle.predict_items(x), scored.calibrated)
    # The served probability never reverses the raw order.
    order = np.argsort(-scored.raw, kind="stable")
    assert np.all(np.diff(scored.calibrated[order]) <= 1e-15)


def test_isotonic_calibration_ties_items_the_raw_score_still_orders() -> None:
    booster = _booster(RANKER_FEATURES)
    scored = ModelBundle("v1", _metadata(ISOTONIC), booster, booster).score_items(_rows())
    assert len(np.unique(scored.calibrated)) <= 3 < len(np.unique(scored.raw))


def test_lambdarank_raw_scores_are_the_model_output() -> None:
    booster = _booster(RANKER_FEATURES, objective="lambdarank")
    platt = {"method": "platt", "a": 0.8, "b": -2.0, "input": "raw"}
    x = _rows()
    scored = ModelBundle("v1", _metadata(platt), booster, booster).score_items(x)
    np.testing.assert_allclose(scored.raw, booster.predict(x), rtol=0, atol=1e-12)
    np.testing.assert_allclose(scored.calibrated, apply_calibration(platt, booster.predict(x)), rtol=0, atol=1e-12)


def test_empty_batches() -> None:
    booster = _booster(RANKER_FEATURES)
    scored = ModelBundle("v1", _metadata(None), booster, booster).score_items(np.empty((0, len(RANKER_FEATURES))))
    assert scored.raw.shape == scored.calibrated.shape == (0,)


@pytest.mark.skipif(not compiled_trees.available(), reason="lleaves is not installed")
def test_compiled_path_gives_the_same_raw_and_calibrated_scores_without_lightgbm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    booster = _booster(RANKER_FEATURES)
    save_version(tmp_path, "v1", {USER_MODEL: _booster(USER_MODEL_FEATURES, seed=1), RANKER_MODEL: booster}, _metadata(ISOTONIC))
    bundle = load_version(tmp_path, "v1")
    x = _rows()
    reference = bundle.score_items(x)
    assert bundle.compile() and bundle.backend == "compiled"
    assert (tmp_path / "versions" / "v1" / "compiled" / f"{RANKER_MODEL}.raw.so").exists() and bundle.has_compiled_cache()

    def no_lightgbm(*args: object, **kwargs: object) -> None:
        raise AssertionError("LightGBM called although a compiled ranker is attached")

    monkeypatch.setattr(lgb.Booster, "predict", no_lightgbm)
    fast = bundle.score_items(x)
    np.testing.assert_allclose(fast.raw, reference.raw, rtol=0, atol=1e-9)
    np.testing.assert_allclose(fast.calibrated, reference.calibrated, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "calibration",
    [{"method": "platt", "a": -0.5, "b": 0.0, "input": "probability"}, {**ISOTONIC, "y": [0.3, 0.3, 0.1, 0.1, 0.02, 0.02]}],
    ids=["platt-negative-slope", "isotonic-decreasing"],
)
def test_a_ranker_calibration_that_would_reverse_the_ranking_is_refused(tmp_path: Path, calibration: dict) -> None:
    save_version(tmp_path, "v1", {USER_MODEL: _booster(USER_MODEL_FEATURES, seed=1), RANKER_MODEL: _booster(RANKER_FEATURES)}, _metadata(calibration))
    with pytest.raises(ModelLoadError, match="reverse the ranking"):
        load_version(tmp_path, "v1")
