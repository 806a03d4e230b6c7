"""The events table, validated chunk by chunk: valid rows in the raw schema, rejected rows counted and described."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from propensity.raw_data.errors import RawDataError
from propensity.raw_data.parsing import checked_number, nones, parse_time, to_text
from propensity.raw_data.readers import read_chunks, require_columns
from propensity.raw_data.rejections import Problems, RejectedRows, merge_rejections
from propensity.raw_data.report import LoadReport
from propensity.raw_data.schema import EVENT_COLUMNS, EVENT_TYPES

# Events are validated this many rows at a time: memory stays flat however long the log is.
CHUNK_ROWS = 1_000_000


class EventValidation:
    """Validates an events file chunk by chunk; rows read and rejections accumulate as the chunks go by."""

    def __init__(self, path: Path, strict: bool, chunk_rows: int | None = None) -> None:
        self.path = path
        self.strict = strict
        self.chunk_rows = chunk_rows or CHUNK_ROWS
        self.rows_read = 0
        self.rows_valid = 0
        self.rejected: list[RejectedRows] = []

    def chunks(self) -> Iterator[pd.DataFrame]:
        """Valid events per chunk, indexed by their 0-based position in the file; duplicates not yet dropped."""
        for raw in read_chunks(self.path, self.chunk_rows):
            require_columns(raw, self.path, EVENT_COLUMNS)
            events, found = _validate_events(raw, self.path, self.rows_read, self.strict)
            self.rows_read += len(raw)
            self.rows_valid += len(events)
            self.rejected = merge_rejections(self.rejected + found)
            yield events

    def check(self, duplicates: int, max_rejected_fraction: float) -> None:
        """Refuse a file that is mostly not in the raw schema."""
        n_rejected = self.rows_read - self.rows_valid
        if self.rows_read == 0:
            raise RawDataError(f"{self.path.name}: no event rows")
        if n_rejected / self.rows_read > max_rejected_fraction:
            report = LoadReport({"events": self.path.name}, {"events": self.rows_read},
                                {"events": self.rows_valid - duplicates}, self.rejected, duplicates)
            raise RawDataError(
                f"{self.path.name}: {n_rejected} of {self.rows_read} event rows rejected "
                f"({n_rejected / self.rows_read:.1%} > max_rejected_fraction {max_rejected_fraction:.1%}); "
                f"the input is probably not in the raw schema\n{report.summary()}"
            )


def _validate_events(raw: pd.DataFrame, path: Path, first: int, strict: bool) -> tuple[pd.DataFrame, list[RejectedRows]]:
    """Valid rows of one chunk (first: rows of the file before it) in the raw schema, indexed by file position."""
    n = len(raw)
    raw = raw.set_axis(pd.RangeIndex(first, first + n))
    problems = Problems(path, n, first)

    times, bad_time, missing_time = parse_time(raw["event_time"])
    problems.flag(missing_time, "event_time", "missing time", raw["event_time"])
    problems.flag(bad_time, "event_time", "unparsable time", raw["event_time"])
    ids = {}
    for column in ("user_id", "item_id"):
        ids[column] = to_text(raw[column])
        problems.flag(ids[column].isna(), column, "empty id", raw[column])
    event_type = to_text(raw["event_type"])
    problems.flag(~event_type.isin(EVENT_TYPES), "event_type", "unknown event type", raw["event_type"])

    price = pd.Series(np.nan, index=raw.index)
    quantity = pd.Series(1.0, index=raw.index)
    if "price" in raw:
        price, _ = checked_number(raw, "price", problems)
    if "quantity" in raw:
        quantity, missing_quantity = checked_number(raw, "quantity", problems)
        quantity = quantity.where(~missing_quantity, 1.0)
    if strict:
        problems.raise_first()

    event_id = to_text(raw["event_id"]) if "event_id" in raw else nones(raw.index)
    # One sha1 per file, not per row: deterministic, unique within the file, and vectorised.
    prefix = hashlib.sha1(path.name.encode()).hexdigest()[:12] + ":"
    generated = prefix + pd.Series(problems.rows, index=raw.index).astype(str)
    event_id = event_id.where(event_id.notna(), generated)
    session_id = to_text(raw["session_id"]) if "session_id" in raw else nones(raw.index)

    events = pd.DataFrame({
        "event_time": times, "user_id": ids["user_id"], "item_id": ids["item_id"],
        "event_type": event_type, "event_id": event_id.astype(object),
        "session_id": session_id, "price": price, "quantity": quantity,
    })[~problems.mask]
    return events, problems.found
