"""A raw directory as a validated dataset: in memory (load_raw_dataset) or with events staged to Parquet (stage_raw_dataset)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from propensity.raw_data.errors import RawDataError
from propensity.raw_data import events as _events
from propensity.raw_data.events import EventValidation
from propensity.raw_data.items import load_items
from propensity.raw_data.quarantine import DUPLICATES, Quarantine
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
    directory: Path, *, strict: bool = False, max_rejected_fraction: float = 0.05,
    quarantine_dir: Path | None = None, now: pd.Timestamp | None = None,
) -> RawDataset:
    """Load and validate the raw tables in `directory` into memory (events de-duplicated and sorted by time).

    quarantine_dir: where rejected and duplicate rows and the summary go (None: counted in the report only).
    """
    paths = TablePaths.find(Path(directory))
    quarantine = Quarantine(quarantine_dir)
    validation = EventValidation(paths.events, strict, quarantine=quarantine, now=now)
    try:
        events = pd.concat(list(validation.chunks()))  # at least one chunk, maybe empty
        duplicated = events["event_id"].duplicated(keep="first")
        if duplicated.any() and quarantine_dir is not None:
            _duplicates_frame(events, duplicated, paths.events.name).to_parquet(_dir(quarantine_dir) / DUPLICATES, index=False)
        events = events[~duplicated].sort_values("event_time", kind="stable").reset_index(drop=True)
        n_duplicates = int(duplicated.sum())
        _checked(validation, quarantine, n_duplicates, max_rejected_fraction)
        items, users, report = _finish(paths, validation, quarantine, events["item_id"], len(events), n_duplicates, strict)
    finally:
        quarantine.close()
    return RawDataset(events, items, users, report)


@dataclass(frozen=True)
class StagedDataset:
    """Validated events in a Parquet file (source order, duplicates kept, with each row's position), items and users."""

    events_path: Path
    items: pd.DataFrame
    users: pd.DataFrame
    last_event_time: pd.Timestamp | None  # None when no row survived validation
    report: LoadReport = field(repr=False)
    duplicates_path: Path | None = None  # Parquet of the repeated event_id rows (line_or_row = source_row), if any


def stage_raw_dataset(
    directory: Path,
    staged_events: Path,
    *,
    strict: bool = False,
    max_rejected_fraction: float = 0.05,
    progress: Callable[[str], None] = print,
    quarantine_dir: Path | None = None,
    memory_limit_gb: float | None = None,
    now: pd.Timestamp | None = None,
) -> StagedDataset:
    """Validate the raw tables like load_raw_dataset, but stream the events chunk by chunk into staged_events.

    Only one chunk of events is ever in memory. De-duplication by event_id (first kept, by the
    `source_row` column: the line or row in the file) and sorting are left to the caller, who does
    them out of core. Rejected and duplicate rows go to quarantine_dir (default: `quarantine/`
    next to staged_events) with a summary.json; DuckDB keeps under memory_limit_gb, spilling to disk.
    """
    paths = TablePaths.find(Path(directory))
    quarantine_dir = quarantine_dir or staged_events.parent / "quarantine"
    quarantine = Quarantine(quarantine_dir)
    validation = EventValidation(paths.events, strict, chunk_rows=chunk_rows_for(memory_limit_gb), quarantine=quarantine, now=now)
    schema = SCHEMAS["events"].append(pa.field("source_row", pa.int64()))
    tmp = staged_events.with_suffix(".tmp")
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for events in validation.chunks():
                table = pa.Table.from_pandas(events.assign(source_row=events.index.to_numpy(np.int64)), schema=schema, preserve_index=False)
                writer.write_table(table)
                progress(f"  validated {validation.rows_read:,} event rows")
        tmp.replace(staged_events)
        spill = staged_events.parent / "duckdb-spill-staging"
        con = _connect(memory_limit_gb, spill)
        try:
            staged = f"read_parquet('{staged_events}')"
            rows, last = con.execute(f"SELECT count(*), max(event_time) FROM {staged}").fetchone()
            duplicates = _repeated_ids(con, staged)
            unique = rows - duplicates
            duplicates_path = None
            if duplicates:
                duplicates_path = _dir(quarantine_dir) / DUPLICATES
                _quarantine_duplicates(con, staged, paths.events.name, duplicates_path)
            _checked(validation, quarantine, duplicates, max_rejected_fraction)
            item_ids = con.execute(f"SELECT DISTINCT item_id FROM {staged}").df()["item_id"]
        finally:
            con.close()
            shutil.rmtree(spill, ignore_errors=True)
        items, users, report = _finish(paths, validation, quarantine, item_ids, unique, rows - unique, strict)
    finally:
        quarantine.close()
        tmp.unlink(missing_ok=True)
    return StagedDataset(staged_events, items, users, pd.Timestamp(last) if last is not None else None, report, duplicates_path)


def chunk_rows_for(memory_limit_gb: float | None) -> int | None:
    """Rows validated at a time: 1 M by default, fewer under a small memory cap (about 4 KB of budget per row)."""
    if memory_limit_gb is None:
        return None
    return int(min(_events.CHUNK_ROWS, max(10_000, memory_limit_gb * 250_000)))


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _connect(memory_limit_gb: float | None, spill: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET preserve_insertion_order = false")
    if memory_limit_gb is not None:
        spill.mkdir(parents=True, exist_ok=True)
        con.execute(f"SET memory_limit = '{memory_limit_gb:g}GB'")
        con.execute(f"SET temp_directory = '{spill}'")
    return con


def _duplicates_frame(events: pd.DataFrame, duplicated: pd.Series, file: str) -> pd.DataFrame:
    """Quarantine records of the rows dropped as repeated event_ids (in memory)."""
    lines = pd.Series(events.index.to_numpy(np.int64), index=events.index)
    first = lines.groupby(events["event_id"].to_numpy()).transform("min")
    dup = events[duplicated.to_numpy()]
    return pd.DataFrame({
        "table": "events", "file": file, "line_or_row": lines[duplicated.to_numpy()].to_numpy(),
        "column": "event_id", "reason": "duplicate event_id (first kept)",
        "value": dup["event_id"].to_numpy(), "first_line_or_row": first[duplicated.to_numpy()].to_numpy(),
        "raw": dup.to_json(orient="records", lines=True, date_format="iso").splitlines(),
    })


def _repeated_ids(con: duckdb.DuckDBPyConnection, staged: str) -> int:
    """Rows whose event_id an earlier row has; the repeated ids go to the temp table `firsts` (id, first row)."""
    # GROUP BY rather than count(DISTINCT): DuckDB's hash aggregate spills to disk, a distinct aggregate does not.
    con.execute(f"""
        CREATE TEMP TABLE firsts AS
        SELECT event_id, min(source_row) AS first, count(*) - 1 AS repeats FROM {staged} GROUP BY event_id HAVING count(*) > 1
    """)
    return int(con.execute("SELECT coalesce(sum(repeats), 0) FROM firsts").fetchone()[0])


def _quarantine_duplicates(con: duckdb.DuckDBPyConnection, staged: str, file: str, out: Path) -> None:
    """Quarantine records of the rows dropped as repeated event_ids, out of core (the join's hashed side is the few repeated ids)."""
    file = file.replace("'", "''")
    con.execute(f"""
        COPY (
            SELECT 'events' AS "table", '{file}' AS file, s.source_row AS line_or_row, 'event_id' AS "column",
                   'duplicate event_id (first kept)' AS reason, s.event_id AS value, f.first AS first_line_or_row,
                   to_json(struct_pack(s.event_time, s.user_id, s.item_id, s.event_type, s.event_id, s.session_id, s.price, s.quantity))::VARCHAR AS raw
            FROM {staged} s JOIN firsts f ON s.event_id = f.event_id AND s.source_row > f.first
            ORDER BY s.source_row
        ) TO '{out}' (FORMAT PARQUET)
    """)


def _checked(validation: EventValidation, quarantine: Quarantine, duplicates: int, max_rejected_fraction: float) -> None:
    """validation.check, with the quarantine summary written first when it refuses the file."""
    try:
        validation.check(duplicates, max_rejected_fraction)
    except RawDataError:
        report = LoadReport({"events": validation.path.name}, {"events": validation.rows_read},
                            {"events": 0}, validation.rejected, duplicates, 0,
                            dict(quarantine.blank_lines), dict(quarantine.ignored_columns), _where(quarantine))
        quarantine.close()
        quarantine.write_summary({**report.to_json(), "refused": True})
        raise


def _where(quarantine: Quarantine) -> str | None:
    return str(quarantine.directory) if quarantine.directory is not None else None


def _finish(
    paths: TablePaths, validation: EventValidation, quarantine: Quarantine, event_items: pd.Series,
    n_events: int, duplicates: int, strict: bool,
) -> tuple[pd.DataFrame, pd.DataFrame, LoadReport]:
    """Items (with every item the events mention) and users, and the load report (also the quarantine's summary.json)."""
    items, read_items, item_rejects, added = load_items(paths.items, event_items, strict, quarantine)
    users, read_users, user_rejects = load_users(paths.users, strict, quarantine)
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
        blank_lines={t: n for t, n in quarantine.blank_lines.items() if n},
        ignored_columns={t: c for t, c in quarantine.ignored_columns.items() if c},
        quarantine=_where(quarantine),
    )
    quarantine.close()
    quarantine.write_summary({**report.to_json(), "refused": False, "quarantined_rows": quarantine.rows})
    return items, users, report
