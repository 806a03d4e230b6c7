"""The events table, validated chunk by chunk: valid rows in the raw schema, rejected rows counted and described."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from propensity.raw_data.errors import RawDataError
from propensity.raw_data.parsing import checked_number, epoch_seconds, nones, out_of_range, parse_time, to_text
from propensity.raw_data.quarantine import Quarantine
from propensity.raw_data.readers import Chunk, SkippedLines, TableReader, require_columns
from propensity.raw_data.rejections import Problems, RejectedRows, merge_rejections, skipped_as_rejections
from propensity.raw_data.report import LoadReport
from propensity.raw_data.schema import EVENT_COLUMNS, EVENT_TYPES, FUTURE_SLACK_DAYS

EPOCH = pd.Timestamp("1970-01-01", tz="UTC")

# Events are validated this many rows at a time: memory stays flat however long the log is.
CHUNK_ROWS = 1_000_000


class EventValidation:
    """Validates an events file chunk by chunk; rows read and rejections accumulate as the chunks go by.

    Every rejected row (and every CSV line that is not a row) also goes to the quarantine, with
    its line or row, column, reason and raw values.
    """

    def __init__(self, path: Path, strict: bool, chunk_rows: int | None = None,
                 quarantine: Quarantine | None = None, now: pd.Timestamp | None = None) -> None:
        self.path = path
        self.strict = strict
        self.chunk_rows = chunk_rows or CHUNK_ROWS
        self.quarantine = quarantine or Quarantine(None)
        self.latest = (now if now is not None else pd.Timestamp.now(tz="UTC")) + pd.Timedelta(days=FUTURE_SLACK_DAYS)
        self.rows_read = 0
        self.rows_valid = 0
        self.rejected: list[RejectedRows] = []

    def chunks(self) -> Iterator[pd.DataFrame]:
        """Valid events per chunk, indexed by their line (CSV) or row (Parquet); duplicates not yet dropped."""
        reader = TableReader(self.path)
        for chunk in reader.chunks(self.chunk_rows):
            require_columns(chunk.frame, self.path, EVENT_COLUMNS)
            if not self.rows_read:
                self.quarantine.note_columns("events", list(chunk.frame.columns))
            events, problems = _validate_events(chunk, self.path, self.strict, self.latest)
            self.rows_read += len(chunk.frame)
            self.rows_valid += len(events)
            self.rejected = merge_rejections(self.rejected + problems.found)
            self.quarantine.add(problems.quarantined("events", chunk.frame))
            yield events
        self._skipped_lines(reader.skipped)

    def _skipped_lines(self, skipped: SkippedLines) -> None:
        """Lines with too many fields are rejected rows; blank lines are counted and set aside."""
        found = skipped_as_rejections(self.path, skipped, self.strict)
        self.rejected = merge_rejections(self.rejected + found)
        self.rows_read += len(skipped.bad)
        self.quarantine.add_skipped("events", self.path.name, skipped)

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


def _validate_events(chunk: Chunk, path: Path, strict: bool, latest: pd.Timestamp) -> tuple[pd.DataFrame, Problems]:
    """Valid rows of one chunk in the raw schema, indexed by their line or row in the file."""
    n = len(chunk.frame)
    raw = chunk.frame.set_axis(pd.Index(chunk.lines))
    problems = Problems(path, n, lines=chunk.lines)

    times, bad_time, missing_time = parse_time(raw["event_time"])
    problems.flag(missing_time, "event_time", "missing time", raw["event_time"])
    too_early, too_late = out_of_range(raw["event_time"], bad_time)
    problems.flag(bad_time & ~too_early & ~too_late, "event_time", "unparsable time", raw["event_time"])
    usable = ~missing_time & ~bad_time
    problems.flag(too_early | (usable & (times < EPOCH).to_numpy()), "event_time", "before 1970-01-01", raw["event_time"])
    problems.flag(too_late | (usable & (times > latest).to_numpy()), "event_time", "in the future", raw["event_time"])
    problems.flag(usable & epoch_seconds(raw["event_time"], times), "event_time", "epoch seconds, not milliseconds", raw["event_time"])
    ids = {}
    for column in ("user_id", "item_id"):
        ids[column] = to_text(raw[column])
        problems.flag(ids[column].isna(), column, "empty id", raw[column])
    event_type = to_text(raw["event_type"])
    problems.flag(event_type.isna(), "event_type", "missing event type", raw["event_type"])
    problems.flag(~event_type.isin(EVENT_TYPES) & event_type.notna(), "event_type", "unknown event type", raw["event_type"])

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
    return events, problems
