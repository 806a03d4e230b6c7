"""Quarantine: every row that prepare did not load, written where an operator can look at it.

`<dir>/rejected.parquet` holds one record per rejected row or skipped line (table, file,
line_or_row, column, reason, value, raw = the whole row as JSON); `<dir>/duplicates.parquet` the
events dropped because an earlier row had the same event_id; `<dir>/summary.json` the counts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from propensity.raw_data.readers import SkippedLines
from propensity.raw_data.schema import SCHEMAS

REJECTED = "rejected.parquet"
DUPLICATES = "duplicates.parquet"
SUMMARY = "summary.json"

SCHEMA = pa.schema([
    ("table", pa.string()), ("file", pa.string()), ("line_or_row", pa.int64()), ("column", pa.string()),
    ("reason", pa.string()), ("value", pa.string()), ("raw", pa.string()),
])


class Quarantine:
    """Appends quarantine records to <directory>/rejected.parquet, one chunk at a time; directory None keeps only counts."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.rows = 0
        self.blank_lines: dict[str, int] = {}
        self.ignored_columns: dict[str, list[str]] = {}
        self._writer: pq.ParquetWriter | None = None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)  # a previous run's quarantine is not this run's

    def add(self, records: pd.DataFrame) -> None:
        if not len(records):
            return
        self.rows += len(records)
        if self.directory is None:
            return
        if self._writer is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.directory / REJECTED, SCHEMA)
        self._writer.write_table(pa.Table.from_pandas(records[SCHEMA.names], schema=SCHEMA, preserve_index=False))

    def note_columns(self, table: str, columns: list[str]) -> None:
        """Remember the columns of a table's file that the raw schema does not know (they are not loaded)."""
        known = SCHEMAS[table].names
        self.ignored_columns[table] = [c for c in columns if c not in known]

    def add_skipped(self, table: str, file: str, skipped: SkippedLines) -> None:
        self.blank_lines[table] = len(skipped.blank)
        records = [(line, column, reason, value, skipped.texts.get(line)) for line, column, reason, value in skipped.bad]
        records += [(line, "(line)", "blank line", "", "") for line in skipped.blank]
        if records:
            frame = pd.DataFrame(records, columns=["line_or_row", "column", "reason", "value", "raw"])
            self.add(frame.assign(table=table, file=file))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def write_summary(self, summary: dict) -> Path | None:
        if self.directory is None:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / SUMMARY
        path.write_text(json.dumps(summary, indent=2, default=str))
        return path
