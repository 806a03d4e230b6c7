"""Probability calibration fitted on the validation period: none, Platt (logistic on the logit) or isotonic.

The chosen map is a small JSON-able dict stored in the model's metadata and applied by
ModelBundle.predict_users / predict_items (propensity.model_registry.apply_calibration), so the
served number is the calibrated probability with no extra artefact to ship.
"""

from __future__ import annotations

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from propensity.model_registry import apply_calibration

METHODS = ("none", "platt", "isotonic")
_MAX_BREAKPOINTS = 200  # keeps metadata small; isotonic maps rarely need more


def fit_calibration(y: np.ndarray, scores: np.ndarray, method: str, raw: bool = False) -> dict:
    """Fit one calibration map of scores to P(y=1); raw=True when scores are not probabilities (lambdarank)."""
    y = np.asarray(y, dtype=float)
    scores = np.asarray(scores, dtype=float)
    if method == "none":
        return {"method": "none"}
    if method == "platt":
        z = scores if raw else _logit(scores)
        model = LogisticRegression(C=1e6, max_iter=1000).fit(z[:, None], y)
        return {"method": "platt", "a": float(model.coef_[0, 0]), "b": float(model.intercept_[0]), "input": "raw" if raw else "probability"}
    if method == "isotonic":
        iso = IsotonicRegression(out_of_bounds="clip", y_min=1e-6, y_max=1 - 1e-6).fit(scores, y)
        x, fitted = iso.X_thresholds_, iso.y_thresholds_
        if len(x) > _MAX_BREAKPOINTS:
            keep = np.unique(np.linspace(0, len(x) - 1, _MAX_BREAKPOINTS).round().astype(int))
            x, fitted = x[keep], fitted[keep]
        return {"method": "isotonic", "x": x.tolist(), "y": fitted.tolist(), "input": "raw" if raw else "probability"}
    raise ValueError(f"unknown calibration method {method!r}; choose one of {METHODS}")


def choose_calibration(y: np.ndarray, scores: np.ndarray, raw: bool = False, seed: int = 0) -> tuple[dict, dict[str, float]]:
    """Pick the method with the lowest two-fold cross-fitted log loss on (y, scores), refit it on all rows.

    Raw scores always get a map (they are not probabilities): the choice is then between Platt and isotonic.
    Returns the fitted map and the cross-fitted log loss of every method tried.
    """
    y = np.asarray(y, dtype=float)
    scores = np.asarray(scores, dtype=float)
    rng = np.random.default_rng(seed)
    fold = rng.integers(0, 2, len(y))
    losses: dict[str, float] = {}
    for method in METHODS[1:] if raw else METHODS:
        predicted = np.empty(len(y))
        ok = True
        for f in (0, 1):
            fit, held = fold != f, fold == f
            if len(np.unique(y[fit])) < 2:
                ok = False
                break
            predicted[held] = apply_calibration(fit_calibration(y[fit], scores[fit], method, raw), scores[held])
        if ok:
            losses[method] = float(log_loss(y, np.clip(predicted, 1e-15, 1 - 1e-15), labels=[0, 1]))
    if not losses:
        return ({"method": "platt", "a": 1.0, "b": 0.0, "input": "raw"} if raw else {"method": "none"}), {}
    # Prefer the simpler map unless the more flexible one is clearly better (0.2 % of log loss).
    best = min(losses, key=lambda m: (losses[m] * (1.0 if m == "none" else 1.001 if m == "platt" else 1.002)))
    calibration = fit_calibration(y, scores, best, raw)
    calibration["cv_log_loss"] = losses
    return calibration, losses


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-15, 1 - 1e-15)
    return np.log(p / (1 - p))
