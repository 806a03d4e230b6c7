"""Finding a raw table's file in a directory and reading it (CSV as text, Parquet as typed) whole or in chunks.

Every chunk comes with the line (CSV, header = line 1) or 1-based row (Parquet) of each of its
rows, so that every later message can point at the place in the file. A file that cannot be
read at all (empty, truncated, unterminated quote, not gzip, not UTF-8) raises RawDataError
naming the file and, where the reader knows it, the line or row and column.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from propensity.raw_data.chunk import Chunk, SkippedLines
from propensity.raw_data.csv_reader import CsvReader
from propensity.raw_data.errors import RawDataError
from propensity.raw_data.schema import KNOWN_COLUMNS, SUFFIXES

__all__ = ["Chunk", "SkippedLines", "TablePaths", "TableReader", "read_chunks", "read_table", "require_columns"]


@dataclass(frozen=True)
class TablePaths:
    """The files of the events (required), items and users tables in one directory."""

    directory: Path
    events: Path
    items: Path | None
    users: Path | None

    @classmethod
    def find(cls, directory: Path) -> TablePaths:
        events = _find_table(directory, "events")
        if events is None:
            raise RawDataError(
                f"{directory}: missing required file events ({' / '.join('events' + s for s in SUFFIXES)})"
            )
        return cls(directory, events, _find_table(directory, "items"), _find_table(directory, "users"))


def _find_table(directory: Path, table: str) -> Path | None:
    found = [directory / f"{table}{s}" for s in SUFFIXES if (directory / f"{table}{s}").is_file()]
    if len(found) > 1:
        raise RawDataError(f"{directory}: several files for table {table}: {[p.name for p in found]}")
    return found[0] if found else None


def is_parquet(path: Path) -> bool:
    return path.name.endswith(".parquet")


def read_table(path: Path, sep: str = ",") -> tuple[Chunk, SkippedLines]:
    """The whole file as one chunk, and the lines that were not rows."""
    reader = TableReader(path, sep)
    chunks = list(reader.chunks(None))
    if len(chunks) == 1:
        return chunks[0], reader.skipped
    return Chunk(pd.concat([c.frame for c in chunks], ignore_index=True), np.concatenate([c.lines for c in chunks])), reader.skipped


def read_chunks(path: Path, chunk_rows: int | None) -> Iterator[Chunk]:
    """The file as chunks of at most chunk_rows rows (None: one chunk); at least one, maybe empty."""
    yield from TableReader(path).chunks(chunk_rows)


class TableReader:
    """Reads one file chunk by chunk; after (or during) reading, `skipped` holds the CSV lines that were not rows."""

    def __init__(self, path: Path, sep: str = ",") -> None:
        self.path = path
        self.sep = sep
        self.skipped = SkippedLines()

    def chunks(self, chunk_rows: int | None) -> Iterator[Chunk]:
        if self.path.stat().st_size == 0:
            raise RawDataError(f"{self.path.name}: empty file (0 bytes): no header and no rows")
        if is_parquet(self.path):
            source = self._parquet(chunk_rows)
        else:
            source = CsvReader(self.path, self.sep, self.skipped).chunks(chunk_rows)
        for chunk in source:
            chunk.frame.columns = [str(c).strip() for c in chunk.frame.columns]
            yield chunk

    def _parquet(self, chunk_rows: int | None) -> Iterator[Chunk]:
        name = self.path.name
        try:
            source = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as error:
            raise RawDataError(f"{name}: not a readable Parquet file (truncated or corrupt; nothing loaded): {error}") from error
        _check_parquet_types(source.schema_arrow, name)
        done = 0
        batches = source.iter_batches(batch_size=chunk_rows or max(source.metadata.num_rows, 1))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (pa.ArrowException, OSError) as error:
                raise RawDataError(f"{name} {_corrupt_part(source)}: unreadable (corrupt data; nothing loaded): {error}") from error
            frame = batch.to_pandas()
            yield Chunk(frame.reset_index(drop=True), np.arange(done + 1, done + 1 + len(frame), dtype=np.int64))
            done += len(frame)
        if done == 0:  # no rows: the columns still have to be checked
            yield Chunk(source.schema_arrow.empty_table().to_pandas(), np.zeros(0, np.int64))

def _corrupt_part(source: pq.ParquetFile) -> str:
    """`rows a..b column c`: the first row group and column that cannot be decoded (error path only)."""
    first = 1
    for group in range(source.metadata.num_row_groups):
        rows = source.metadata.row_group(group).num_rows
        for column in source.schema_arrow.names:
            try:
                source.read_row_group(group, columns=[column])
            except (pa.ArrowException, OSError):
                return f"rows {first}..{first + rows - 1} column {column}"
        first += rows
    return "rows ?"


# Arrow types a raw column may have in Parquet; anything else (lists, structs, binary, ...) is refused.
def _usable(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        return _usable(kind.value_type)
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)
            or pa.types.is_floating(kind) or pa.types.is_boolean(kind) or pa.types.is_timestamp(kind)
            or pa.types.is_date(kind) or pa.types.is_null(kind) or pa.types.is_decimal(kind))


def _check_parquet_types(schema: pa.Schema, name: str) -> None:
    for column in schema:
        if column.name.strip() in KNOWN_COLUMNS and not _usable(column.type):
            raise RawDataError(
                f"{name} column {column.name}: Parquet type {column.type} cannot hold this column "
                "(expected text, a number, a boolean or a timestamp); nothing loaded"
            )


def require_columns(frame: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    """Raise RawDataError naming the file and the first required column it lacks."""
    for column in columns:
        if column not in frame.columns:
            raise RawDataError(
                f"{path.name}: missing required column '{column}' (found: {', '.join(frame.columns)})"
            )
