"""The ranking stage: which scored candidates are returned, in which order, with which scores.

Order is the ranker's raw score (ties: earlier candidate first, so answers are deterministic). The returned
score is the calibrated probability, which is non-decreasing in the raw score, so it falls with rank.
"""

from __future__ import annotations

import numpy as np


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first, equal scores in index order (partial sort: O(n) + O(k log k))."""
    if len(scores) <= k:
        return np.argsort(-scores, kind="stable")
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    kth = np.partition(scores, len(scores) - k)[len(scores) - k]  # the k-th highest score
    above = np.flatnonzero(scores > kth)
    part = np.concatenate([above, np.flatnonzero(scores == kth)[: k - len(above)]])  # ties at the cut: the earliest
    return part[np.argsort(-scores[part], kind="stable")]


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
