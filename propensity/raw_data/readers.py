"""Finding a raw table's file in a directory and reading it (CSV as text, Parquet as typed) whole or in chunks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from propensity.raw_data.errors import RawDataError
from propensity.raw_data.schema import SUFFIXES


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


def read_table(path: Path) -> pd.DataFrame:
    """The whole file as one DataFrame."""
    frames = list(read_chunks(path, None))
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def read_chunks(path: Path, chunk_rows: int | None) -> Iterator[pd.DataFrame]:
    """The file as DataFrames of at most chunk_rows rows (None: one frame); at least one, maybe empty."""
    if path.name.endswith(".parquet"):
        source = pq.ParquetFile(path)
        batches = source.iter_batches(batch_size=chunk_rows) if chunk_rows else iter([source.read()])
        frames = (batch.to_pandas() for batch in batches)
        empty = source.schema_arrow.empty_table().to_pandas()
    else:
        # Everything as text, nothing turned into NaN: ids keep leading zeros, "NA" stays an id,
        # and every conversion below can point at the line it failed on.
        options = dict(dtype=str, keep_default_na=False, na_filter=False)
        frames = pd.read_csv(path, chunksize=chunk_rows, **options) if chunk_rows else iter([pd.read_csv(path, **options)])
        empty = None
    any_rows = False
    for frame in frames:
        any_rows = True
        frame.columns = [str(c).strip() for c in frame.columns]
        yield frame.reset_index(drop=True)
    if not any_rows:  # a header-only file still has columns to check
        frame = empty if empty is not None else pd.read_csv(path, nrows=0, dtype=str)
        frame.columns = [str(c).strip() for c in frame.columns]
        yield frame


def require_columns(frame: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    """Raise RawDataError naming the file and the first required column it lacks."""
    for column in columns:
        if column not in frame.columns:
            raise RawDataError(
                f"{path.name}: missing required column '{column}' (found: {', '.join(frame.columns)})"
            )
