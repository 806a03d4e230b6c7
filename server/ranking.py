"""The ranking stage: which scored candidates are returned, in which order, with which scores.

Order is the ranker's raw score (ties: earlier candidate first, so answers are deterministic). The returned
score is the calibrated probability, which is non-decreasing in the raw score, so it falls with rank.
"""

from __future__ import annotations

import numpy as np

from propensity.top_k import top_k

__all__ = ["best_positions", "non_increasing", "top_k"]


def best_positions(raw: np.ndarray, categories: np.ndarray, k: int, per_category: int = 0) -> np.ndarray:
    """Positions of the k best items by raw score, at most per_category items of one category (0: no cap)."""
    if per_category <= 0:
        return top_k(raw, k)
    chosen: list[int] = []
    taken: dict[object, int] = {}
    for i in np.argsort(-raw, kind="stable"):
        category = categories[i]
        if category is not None and taken.get(category, 0) >= per_category:
            continue
        taken[category] = taken.get(category, 0) + 1
        chosen.append(int(i))
        if len(chosen) == k:
            break
    return np.asarray(chosen, dtype=np.int64)


def non_increasing(scores: np.ndarray) -> np.ndarray:
    """Calibrated scores of items in rank order, made exactly non-increasing.

    Calibration is non-decreasing in the raw score (checked at model load), so this changes nothing but
    a last-bit rounding step of np.interp at an isotonic breakpoint.
    """
    return np.minimum.accumulate(scores) if len(scores) else scores
