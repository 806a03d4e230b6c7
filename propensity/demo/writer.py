"""Appends time-sorted numeric event chunks to one events file in the raw schema."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from propensity.demo.batch import EVENT_TYPES, Batch, concat
from propensity.demo.ids import ids, width

_UTC_US = pa.timestamp("us", tz="UTC")
EVENTS_SCHEMA = pa.schema([
    ("event_time", _UTC_US), ("user_id", pa.string()), ("item_id", pa.string()),
    ("event_type", pa.string()), ("event_id", pa.string()), ("session_id", pa.string()),
    ("price", pa.float64()), ("quantity", pa.int64()),
])
_WRITE_ROWS = 262_144  # buffer this many rows per Parquet row group / CSV batch


class EventWriter:
    """Turns sorted numeric event chunks into the string schema and appends them to one file."""

    def __init__(self, path: Path, n_users: int, item_price: np.ndarray, start_s: int, csv: bool) -> None:
        self._csv = csv
        self._user_ids = ids("u", np.arange(n_users), width(n_users, 6))
        self._item_ids = ids("i", np.arange(item_price.size), width(item_price.size, 5))
        self._types = pa.array(EVENT_TYPES, pa.string())
        self._price = item_price
        self._start_us = start_s * 1_000_000
        self._buffer: list[Batch] = []
        self._buffered = 0
        self.n_written = 0
        self.counts = np.zeros(len(EVENT_TYPES), np.int64)
        schema = EVENTS_SCHEMA
        if csv:  # CSV carries ISO-8601 text so any reader gets the UTC offset
            schema = schema.set(0, pa.field("event_time", pa.string()))
        self._sink = pacsv.CSVWriter(path, schema) if csv else pq.ParquetWriter(path, schema)

    def write(self, batch: Batch) -> None:
        """Append events already sorted by time (and later than everything written before)."""
        self._buffer.append(batch)
        self._buffered += batch["time"].size
        self.counts += np.bincount(batch["etype"], minlength=len(EVENT_TYPES))
        self.n_written += batch["time"].size
        if self._buffered >= _WRITE_ROWS:
            self._flush()

    def close(self) -> None:
        """Write what is buffered and close the file."""
        self._flush()
        self._sink.close()

    def _flush(self) -> None:
        if not self._buffered:
            return
        b = concat(*self._buffer)
        first_id = self.n_written - self._buffered
        self._buffer, self._buffered = [], 0
        event_time = pa.array(self._start_us + b["time"] * 1_000_000, _UTC_US)
        if self._csv:
            event_time = pc.strftime(event_time.cast(pa.timestamp("s", tz="UTC")),
                                     format="%Y-%m-%dT%H:%M:%SZ")
        table = pa.table({
            "event_time": event_time,
            "user_id": self._user_ids.take(pa.array(b["user"])),
            "item_id": self._item_ids.take(pa.array(b["item"])),
            "event_type": self._types.take(pa.array(b["etype"])),
            "event_id": ids("e", first_id + np.arange(b["time"].size), 10),
            "session_id": ids("s", b["sess"], 8),
            "price": pa.array(self._price[b["item"]], pa.float64()),
            "quantity": pa.array(b["qty"], pa.int64()),
        })
        self._sink.write_table(table)
