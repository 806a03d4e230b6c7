"""Rejected rows: collected per file, column and reason while validating, merged across chunks, described by line or row."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from propensity.raw_data.errors import RawDataError
from propensity.raw_data.readers import SkippedLines
from propensity.raw_data.schema import EVENT_TYPES, FUTURE_SLACK_DAYS

MAX_EXAMPLES = 5
# Extra context shown after the offending value in messages, keyed by reason.
_HINTS = {
    "unknown event type": f"(expected one of {', '.join(EVENT_TYPES)})",
    "in the future": f"(more than {FUTURE_SLACK_DAYS} day after the time of the run)",
    "unparsable time": "(expected ISO-8601 or epoch milliseconds)",
    "epoch seconds, not milliseconds": "(as milliseconds this is before 1973-03-03; multiply by 1000)",
}


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
    """What a person looks up when every row is one line: the CSV line (header is line 1) or the 1-based Parquet row."""
    return np.arange(first, first + n) + (1 if path.name.endswith(".parquet") else 2)


class Problems:
    """Collects rejected rows of one file (or chunk), per column and reason, and the first reason of each row."""

    def __init__(self, path: Path, n: int, first: int = 0, lines: np.ndarray | None = None) -> None:
        self.file = path.name
        self.rows = row_numbers(path, n, first) if lines is None else np.asarray(lines, dtype=np.int64)
        self.mask = np.zeros(n, dtype=bool)
        self.found: list[RejectedRows] = []
        self._column = np.full(n, None, dtype=object)
        self._reason = np.full(n, None, dtype=object)

    def flag(self, mask: pd.Series | np.ndarray, column: str, reason: str, raw: pd.Series) -> None:
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            return
        positions = np.flatnonzero(mask)
        examples = [(int(self.rows[i]), str(raw.iloc[i])) for i in positions[:MAX_EXAMPLES]]
        self.found.append(RejectedRows(self.file, column, reason, len(positions), examples))
        first = mask & ~self.mask
        self._column[first] = column
        self._reason[first] = reason
        self.mask |= mask

    def raise_first(self) -> None:
        if self.found:
            first = min(self.found, key=lambda r: r.examples[0][0])
            raise RawDataError(describe(first, *first.examples[0]))

    def quarantined(self, table: str, raw: pd.DataFrame) -> pd.DataFrame:
        """The rejected rows as quarantine records: where, the first reason, and the whole raw row as JSON."""
        rows = np.flatnonzero(self.mask)
        bad = raw.iloc[rows]
        return pd.DataFrame({
            "table": table, "file": self.file, "line_or_row": self.rows[rows],
            "column": self._column[rows], "reason": self._reason[rows],
            "value": [_text(bad[c].iloc[i]) if c in bad else None for i, c in enumerate(self._column[rows])],
            "raw": bad.to_json(orient="records", lines=True, date_format="iso", default_handler=str).splitlines() if len(bad) else [],
        })


def skipped_as_rejections(path: Path, skipped: SkippedLines, strict: bool) -> list[RejectedRows]:
    """CSV lines the reader rejected (too many fields, not UTF-8), as rejected rows (strict: the first is an error)."""
    if not skipped.bad:
        return []
    bad = sorted(skipped.bad)
    if strict:
        line, column, reason, value = bad[0]
        raise RawDataError(describe(RejectedRows(path.name, column, reason, 1, []), line, value))
    found = [RejectedRows(path.name, column, reason, 1, [(line, value)]) for line, column, reason, value in bad]
    return merge_rejections(found)


def _text(value: object) -> str | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)
