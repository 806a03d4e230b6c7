"""Tests for calibration: reliability improves on a miscalibrated score, and ModelBundle serves the calibrated number."""

from pathlib import Path

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from propensity.model_registry import RANKER_MODEL, USER_MODEL, apply_calibration, load_version, save_version
from training.calibration import choose_calibration, fit_calibration
from training.metrics import expected_calibration_error


def _miscalibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.beta(1, 6, size=n)
    y = (rng.uniform(size=n) < truth).astype(int)
    score = np.sqrt(truth)  # over-confident: every probability too high
    return y, score


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_calibration_improves_reliability_on_held_out_rows(method: str) -> None:
    y_fit, s_fit = _miscalibrated(20_000, 0)
    y_test, s_test = _miscalibrated(20_000, 1)
    calibration = fit_calibration(y_fit, s_fit, method)
    before = expected_calibration_error(y_test, s_test)
    after = expected_calibration_error(y_test, apply_calibration(calibration, s_test))
    assert after < before / 4


def test_choose_calibration_picks_a_map_for_a_miscalibrated_score_and_none_for_a_calibrated_one() -> None:
    y, score = _miscalibrated(20_000, 2)
    calibration, losses = choose_calibration(y, score)
    assert calibration["method"] in ("platt", "isotonic")
    assert losses[calibration["method"]] < losses["none"]
    rng = np.random.default_rng(4)
    p = rng.uniform(size=20_000)
    calibrated, _ = choose_calibration((rng.uniform(size=20_000) < p).astype(int), p)
    assert calibrated["method"] == "none"


def test_raw_scores_always_get_a_probability_map() -> None:
    rng = np.random.default_rng(5)
    raw = rng.normal(size=5000) * 3  # e.g. lambdarank scores
    y = (rng.uniform(size=5000) < 1 / (1 + np.exp(-(raw - 2)))).astype(int)
    calibration, _ = choose_calibration(y, raw, raw=True)
    p = apply_calibration(calibration, raw)
    assert calibration["method"] in ("platt", "isotonic")
    assert ((p >= 0) & (p <= 1)).all()
    assert abs(p.mean() - y.mean()) < 0.02


def test_isotonic_map_matches_sklearn() -> None:
    y, score = _miscalibrated(3000, 6)
    calibration = fit_calibration(y, score, "isotonic")
    reference = IsotonicRegression(out_of_bounds="clip", y_min=1e-6, y_max=1 - 1e-6).fit(score, y)
    probe = np.linspace(-0.1, 1.1, 500)
    if len(calibration["x"]) < 200:  # not thinned
        assert apply_calibration(calibration, probe) == pytest.approx(reference.predict(probe))


def test_model_bundle_applies_stored_calibration(tmp_path: Path) -> None:
    from tests.test_model_registry import _metadata
    from tests.tiny_models import tiny_booster
    from propensity.assembly import RANKER_FEATURES, USER_MODEL_FEATURES

    boosters = {USER_MODEL: tiny_booster(USER_MODEL_FEATURES), RANKER_MODEL: tiny_booster(RANKER_FEATURES, seed=1)}
    plain = _metadata("v1")
    save_version(tmp_path, "v1", boosters, plain)
    calibrated = _metadata("v2")
    platt = {"method": "platt", "a": 0.5, "b": -1.0, "input": "probability"}
    calibrated["models"][USER_MODEL]["calibration"] = platt
    save_version(tmp_path, "v2", boosters, calibrated)
    x = np.random.default_rng(0).normal(size=(20, len(USER_MODEL_FEATURES)))
    raw = load_version(tmp_path, "v1").predict_users(x)
    served = load_version(tmp_path, "v2").predict_users(x)
    assert served == pytest.approx(1 / (1 + np.exp(-(0.5 * np.log(raw / (1 - raw)) - 1.0))))
    assert load_version(tmp_path, "v2").predict_items(np.zeros((3, len(RANKER_FEATURES)))) == pytest.approx(
        load_version(tmp_path, "v1").predict_items(np.zeros((3, len(RANKER_FEATURES))))
    )
