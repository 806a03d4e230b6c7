"""Compiled tree predictors (lleaves): built once per model version, cached on disk, used only when identical.

LightGBM's own predictor stays the reference and the fallback: a compiled model is attached to
a bundle only after its outputs match LightGBM's to within MAX_ABS_DIFFERENCE on a probe set.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np

log = logging.getLogger(__name__)
MAX_ABS_DIFFERENCE = 1e-9
_PROBE_ROWS = 2000


@dataclass(frozen=True)
class CompiledModel:
    """A compiled predictor and how far it was measured from LightGBM."""

    model: object  # lleaves.Model
    max_abs_difference: float
    path: Path

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.model.predict(np.ascontiguousarray(features, dtype=np.float64), n_jobs=1)


def available() -> bool:
    try:
        import lleaves  # noqa: F401
    except ImportError:
        return False
    return True


def cache_path(model_file: Path, cache_dir: Path, raw_score: bool = False) -> Path:
    """Where the compiled build of model_file is cached (raw-score builds under their own name)."""
    return cache_dir / f"{model_file.stem}{'.raw' if raw_score else ''}.so"


def compile_model(model_file: Path, booster: lgb.Booster, cache_dir: Path, raw_score: bool = False) -> CompiledModel | None:
    """Compile (or load the cached build of) model_file; None when lleaves is missing or outputs differ.

    raw_score=True builds a predictor of raw scores (LightGBM's predict(raw_score=True)), without the objective's transform.
    """
    if not available():
        return None
    import lleaves

    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_path(model_file, cache_dir, raw_score)
    started = time.perf_counter()
    if not target.exists():
        # Build under a private name and rename: concurrent workers never load a half-written library.
        partial = cache_dir / f".{target.stem}.{os.getpid()}.so"
        lleaves.Model(model_file=str(model_file)).compile(cache=str(partial), raw_score=raw_score)
        os.replace(partial, target)
    model = lleaves.Model(model_file=str(model_file))
    model.compile(cache=str(target), raw_score=raw_score)
    difference = _max_difference(booster, model, raw_score)
    if not difference <= MAX_ABS_DIFFERENCE:
        log.warning("compiled %s differs from LightGBM by %.3g; keeping LightGBM", model_file, difference)
        return None
    log.info("compiled %s in %.1fs (max abs difference %.2g)", model_file.name, time.perf_counter() - started, difference)
    return CompiledModel(model, difference, target)


def _max_difference(booster: lgb.Booster, model: object, raw_score: bool = False) -> float:
    rng = np.random.default_rng(0)
    probe = rng.lognormal(sigma=2.0, size=(_PROBE_ROWS, booster.num_feature())) * rng.choice([-1.0, 1.0], size=(_PROBE_ROWS, booster.num_feature()))
    probe[rng.random(probe.shape) < 0.2] = np.nan
    expected = booster.predict(probe, raw_score=raw_score, num_threads=1)
    actual = model.predict(probe, n_jobs=1)
    return float(np.max(np.abs(expected - actual)))
