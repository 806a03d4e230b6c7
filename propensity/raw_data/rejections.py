"""Rejected rows: collected per file, column and reason while validating, merged across chunks, described by line or row."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from propensity.raw_data.errors import RawDataError
from propensity.raw_data.schema import EVENT_TYPES

MAX_EXAMPLES = 5
# Extra context shown after the offending value in messages, keyed by reason.
_HINTS = {"unknown event type": f"(expected one of {', '.join(EVENT_TYPES)})"}


@dataclass(frozen=True)
class RejectedRows:
    """Rows of one file rejected for one reason; examples are (line or row number, value)."""

    file: str
    column: str
    reason: str
    count: int
    examples: list[tuple[int, str]]


def describe(rejected: RejectedRows, row: int, value: str) -> str:
    """One rejected value as `<file> line|row <n> column <column>: <reason> <value>`."""
    where = "row" if rejected.file.endswith(".parquet") else "line"
    hint = _HINTS.get(rejected.reason)
    text = f"{rejected.file} {where} {row} column {rejected.column}: {rejected.reason} {value!r}"
    return f"{text} {hint}" if hint else text


def merge_rejections(found: list[RejectedRows]) -> list[RejectedRows]:
    """One entry per (file, column, reason) across chunks: counts added, the first examples kept."""
    merged: dict[tuple[str, str, str], RejectedRows] = {}
    for r in found:
        key = (r.file, r.column, r.reason)
        if key in merged:
            old = merged[key]
            r = RejectedRows(r.file, r.column, r.reason, old.count + r.count, (old.examples + r.examples)[:MAX_EXAMPLES])
        merged[key] = r
    return list(merged.values())


def row_numbers(path: Path, n: int, first: int = 0) -> np.ndarray:
    """What a person looks up: the CSV line (header is line 1) or the 1-based Parquet row, of n rows after `first`."""
    # CSV lines assume no line breaks inside quoted values.
    return np.arange(first, first + n) + (1 if path.name.endswith(".parquet") else 2)


class Problems:
    """Collects rejected rows of one file, per column and reason."""

    def __init__(self, path: Path, n: int, first: int = 0) -> None:
        self.file = path.name
        self.rows = row_numbers(path, n, first)
        self.mask = np.zeros(n, dtype=bool)
        self.found: list[RejectedRows] = []

    def flag(self, mask: pd.Series | np.ndarray, column: str, reason: str, raw: pd.Series) -> None:
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return
        positions = np.flatnonzero(mask)
        examples = [(int(self.rows[i]), str(raw.iloc[i])) for i in positions[:MAX_EXAMPLES]]
        self.found.append(RejectedRows(self.file, column, reason, len(positions), examples))
        self.mask |= mask

    def raise_first(self) -> None:
        if self.found:
            first = min(self.found, key=lambda r: r.examples[0][0])
            raise RawDataError(describe(first, *first.examples[0]))
