"""A raw directory as a validated dataset: in memory (load_raw_dataset) or with events staged to Parquet (stage_raw_dataset)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from propensity.raw_data.events import EventValidation
from propensity.raw_data.items import load_items
from propensity.raw_data.readers import TablePaths
from propensity.raw_data.report import LoadReport
from propensity.raw_data.schema import SCHEMAS
from propensity.raw_data.users import load_users


@dataclass
class RawDataset:
    """Validated events, items and users in the raw schema, plus the load report."""

    events: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    report: LoadReport = field(repr=False)

    @property
    def event_types_present(self) -> frozenset[str]:
        """Event types that occur at least once."""
        return frozenset(self.events["event_type"].unique())

    @property
    def as_of(self) -> pd.Timestamp:
        """Time of the last event."""
        return self.events["event_time"].iloc[-1]


def load_raw_dataset(
    directory: Path, *, strict: bool = False, max_rejected_fraction: float = 0.05
) -> RawDataset:
    """Load and validate the raw tables in `directory` into memory (events de-duplicated and sorted by time)."""
    paths = TablePaths.find(Path(directory))
    validation = EventValidation(paths.events, strict)
    events = pd.concat(list(validation.chunks()))  # at least one chunk, maybe empty
    duplicated = events["event_id"].duplicated(keep="first")
    events = events[~duplicated].sort_values("event_time", kind="stable").reset_index(drop=True)
    validation.check(int(duplicated.sum()), max_rejected_fraction)
    items, users, report = _finish(paths, validation, events["item_id"], len(events), int(duplicated.sum()), strict)
    return RawDataset(events, items, users, report)


@dataclass(frozen=True)
class StagedDataset:
    """Validated events in a Parquet file (source order, duplicates kept, with each row's position), items and users."""

    events_path: Path
    items: pd.DataFrame
    users: pd.DataFrame
    last_event_time: pd.Timestamp | None  # None when no row survived validation
    report: LoadReport = field(repr=False)


def stage_raw_dataset(
    directory: Path,
    staged_events: Path,
    *,
    strict: bool = False,
    max_rejected_fraction: float = 0.05,
    progress: Callable[[str], None] = print,
) -> StagedDataset:
    """Validate the raw tables like load_raw_dataset, but stream the events chunk by chunk into staged_events.

    Only one chunk of events is ever in memory. De-duplication by event_id (first kept, by the
    `source_row` column) and sorting are left to the caller, who does them out of core.
    """
    paths = TablePaths.find(Path(directory))
    validation = EventValidation(paths.events, strict)
    schema = SCHEMAS["events"].append(pa.field("source_row", pa.int64()))
    tmp = staged_events.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for events in validation.chunks():
            table = pa.Table.from_pandas(events.assign(source_row=events.index.to_numpy(np.int64)), schema=schema, preserve_index=False)
            writer.write_table(table)
            progress(f"  validated {validation.rows_read:,} event rows")
    tmp.replace(staged_events)
    con = duckdb.connect()
    try:
        rows, unique, last = con.execute(
            f"SELECT count(*), count(DISTINCT event_id), max(event_time) FROM read_parquet('{staged_events}')"
        ).fetchone()
        validation.check(rows - unique, max_rejected_fraction)
        item_ids = con.execute(f"SELECT DISTINCT item_id FROM read_parquet('{staged_events}')").df()["item_id"]
    finally:
        con.close()
    items, users, report = _finish(paths, validation, item_ids, unique, rows - unique, strict)
    return StagedDataset(staged_events, items, users, pd.Timestamp(last) if last is not None else None, report)


def _finish(
    paths: TablePaths, validation: EventValidation, event_items: pd.Series, n_events: int, duplicates: int, strict: bool
) -> tuple[pd.DataFrame, pd.DataFrame, LoadReport]:
    """Items (with every item the events mention) and users, and the load report."""
    items, read_items, item_rejects, added = load_items(paths.items, event_items, strict)
    users, read_users, user_rejects = load_users(paths.users, strict)
    files = {"events": paths.events.name}
    rows_read = {"events": validation.rows_read}
    if paths.items is not None:
        files["items"] = paths.items.name
        rows_read["items"] = read_items
    if paths.users is not None:
        files["users"] = paths.users.name
        rows_read["users"] = read_users
    report = LoadReport(
        files=files,
        rows_read=rows_read,
        rows_loaded={"events": n_events, "items": len(items), "users": len(users)},
        rejected=validation.rejected + item_rejects + user_rejects,
        duplicates_dropped=duplicates,
        items_added_from_events=added,
    )
    return items, users, report
