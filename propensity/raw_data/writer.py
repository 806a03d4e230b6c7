"""Raw tables written as Parquet in the raw schema."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from propensity.raw_data.dataset import RawDataset
from propensity.raw_data.errors import RawDataError
from propensity.raw_data.schema import SCHEMAS, SUFFIXES


def write_raw_dataset(dataset: RawDataset, directory: Path) -> None:
    """Write events, items and users as Parquet files in the raw schema."""
    for table in SCHEMAS:
        write_table(table, getattr(dataset, table), directory)


def write_table(table: str, frame: pd.DataFrame, directory: Path) -> None:
    """Write one raw table as <directory>/<table>.parquet in the raw schema."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # A leftover events.csv next to the new events.parquet would make the directory ambiguous.
    clashes = [directory / f"{table}{s}" for s in SUFFIXES if s != ".parquet"]
    existing = [p.name for p in clashes if p.exists()]
    if existing:
        raise RawDataError(f"{directory}: {', '.join(existing)} would clash with {table}.parquet")
    schema = SCHEMAS[table]
    pq.write_table(pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False), directory / f"{table}.parquet")
