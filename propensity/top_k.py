"""The k best of a score array, deterministically: used by candidate generation and by the server's ranking stage."""

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
