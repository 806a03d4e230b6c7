"""Events as dicts of equally long numpy arrays, and the few operations the generator needs on them."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

EVENT_TYPES = ("view", "add_to_cart", "purchase", "return")
VIEW, CART, PURCHASE, RETURN = range(4)
DAY = 86_400

Batch = dict[str, np.ndarray]

# Events of a day before they have a time: ordered by session, thread key, then step.
UNTIMED = {"sess": np.int64, "user": np.int64, "item": np.int64, "etype": np.int8,
           "qty": np.int64, "key": np.float64, "step": np.int64}
# Events with their final time in seconds from the window's start.
TIMED = {"time": np.int64, "sess": np.int64, "user": np.int64, "item": np.int64,
         "etype": np.int8, "qty": np.int64}


def empty(kinds: Mapping[str, type]) -> Batch:
    """A batch with no rows and the given columns."""
    return {k: np.empty(0, t) for k, t in kinds.items()}


def concat(*batches: Batch) -> Batch:
    """Rows of all batches, in order (same columns)."""
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def take(batch: Batch, index: np.ndarray) -> Batch:
    """The rows at index (integer positions or a boolean mask)."""
    if index.dtype == bool:  # one mask scan for all columns, not one per column
        index = np.flatnonzero(index)
    return {k: v[index] for k, v in batch.items()}


def group_starts(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and length of each run of equal values."""
    first = np.ones(sorted_keys.size, bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    starts = np.flatnonzero(first)
    return starts, np.diff(np.append(starts, sorted_keys.size))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function."""
    return 1.0 / (1.0 + np.exp(-x))
