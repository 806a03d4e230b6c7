"""The demo shop's string identifiers: a letter and a zero-padded number."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def ids(prefix: str, index: np.ndarray, width: int) -> pa.Array:
    """prefix + index zero-padded to width digits, e.g. u000042."""
    digits = pc.cast(pa.array(index, type=pa.int64()), pa.string())
    return pc.binary_join_element_wise(prefix, pc.utf8_lpad(digits, width=width, padding="0"), "")


def width(n: int, minimum: int) -> int:
    """Digits needed for indices below n, at least minimum."""
    return max(minimum, len(str(max(n - 1, 0))))
