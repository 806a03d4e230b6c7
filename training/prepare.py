"""Validate a raw event log and rebase its clock, so that every later stage sees one consistent time.

Feast materializes relative to the wall clock (`materialize-incremental` starts at now - TTL),
so a log that ended in 2011 would materialize nothing. Instead of bending TTLs, the whole log is
shifted by whole days so that its as-of time becomes today's midnight (UTC). Gaps, times of
day, windows and labels are unchanged; only the calendar moves. The shift
is recorded in the manifest so reports can map dates back.

The log is never held in memory: it is validated chunk by chunk into a staging file, and
DuckDB de-duplicates, shifts and sorts it out of core into the prepared events.parquet.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa

from propensity.erasure import scrub_parquet
from propensity.raw_data import RawDataError, StagedDataset, raw_schema, stage_raw_dataset, write_table
from propensity.settings import FeatureSettings
from propensity.tombstones import Tombstones
from training.duck import connect

DAY = timedelta(days=1)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PreparedData:
    """What the prepare stage produced: where, the (rebased) as-of time and the shift applied."""

    directory: Path
    source: str
    as_of: datetime
    original_as_of: datetime
    shift_days: int
    event_types: frozenset[str]
    n_events: int
    n_users: int
    n_items: int

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(
            directory=str(self.directory),
            as_of=self.as_of.isoformat(),
            original_as_of=self.original_as_of.isoformat(),
            event_types=sorted(self.event_types),
        )
        return data


def default_as_of(last_event: pd.Timestamp) -> datetime:
    """The first UTC midnight strictly after the last event, so the last day is complete and included."""
    moment = last_event.to_pydatetime().astimezone(timezone.utc)
    midnight = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight + DAY


def floor_day(moment: datetime) -> datetime:
    """Midnight UTC at or before moment."""
    moment = moment.astimezone(timezone.utc)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def prepare(
    source_dir: Path,
    prepared_dir: Path,
    *,
    as_of: datetime | None = None,
    rebase_to: datetime | None = None,
    extra_events: pd.DataFrame | None = None,
    memory_limit_gb: float | None = None,
    progress: Callable[[str], None] = print,
    forgotten: Tombstones | None = None,
) -> PreparedData:
    """Load and validate source_dir, shift it so as_of lands on rebase_to's day, write prepared_dir.

    extra_events are events ingested by the server (already on the serving clock, so never shifted);
    they join the log after the shift, duplicates by event_id dropped.
    forgotten: erased shoppers (docs/privacy.md); their events dated up to their forgetting (each on its own clock,
    before any shift) and their profile rows are left out, and their quarantined rows are removed.
    """
    prepared_dir.mkdir(parents=True, exist_ok=True)
    staged_path = prepared_dir / "events.staged.parquet"
    memory_limit_gb = memory_limit_gb or FeatureSettings().memory_limit_gb
    try:
        # Rejected and duplicate rows go to prepared_dir/quarantine/ (see docs/reliability/data_files.md).
        dataset = stage_raw_dataset(source_dir, staged_path, progress=progress, memory_limit_gb=memory_limit_gb)
        progress(dataset.report.summary())
        if dataset.last_event_time is None:
            raise RawDataError(f"{source_dir}: no usable events")
        original_as_of = floor_day(as_of) if as_of is not None else default_as_of(dataset.last_event_time)
        shift_days = 0
        if rebase_to is not None:
            today = floor_day(rebase_to)
            if as_of is None and original_as_of > today:
                original_as_of = today  # a current log: build up to today's midnight, later events wait for the next build
            shift_days = max(0, (today - original_as_of).days)  # only historical logs move
        con = connect(memory_limit_gb, prepared_dir / "duckdb-spill")
        try:
            erased = _forgotten_users(con, dataset, extra_events, forgotten)
            stats = _write_events(con, dataset, extra_events, shift_days, prepared_dir / "events.parquet", erased)
        finally:
            con.close()
    finally:
        staged_path.unlink(missing_ok=True)
        shutil.rmtree(prepared_dir / "duckdb-spill", ignore_errors=True)
    if stats.n_extra:
        progress(f"added {stats.n_extra:,} ingested events from the event log")
    users = dataset.users
    if erased:
        users = users[~users["user_id"].astype(str).isin(erased)]
        for quarantined in sorted((prepared_dir / "quarantine").glob("*.parquet")):
            scrub_parquet(quarantined, sorted(erased))
        progress(f"left out {len(erased):,} forgotten user(s) (tombstones)")
    write_table("items", dataset.items, prepared_dir)
    write_table("users", _shift_users(users, timedelta(days=shift_days)), prepared_dir)
    prepared = PreparedData(
        directory=prepared_dir,
        source=str(source_dir),
        as_of=original_as_of + timedelta(days=shift_days),
        original_as_of=original_as_of,
        shift_days=shift_days,
        event_types=stats.event_types,
        n_events=stats.n_events,
        n_users=stats.n_users,
        n_items=len(dataset.items),
    )
    (prepared_dir / MANIFEST).write_text(json.dumps(prepared.to_json(), indent=2))
    progress(
        f"prepared {prepared.n_events:,} events, {prepared.n_users:,} users, {prepared.n_items:,} items; "
        f"as-of {original_as_of:%Y-%m-%d} shifted by {shift_days:+d} days to {prepared.as_of:%Y-%m-%d}"
    )
    return prepared


def load_prepared(prepared_dir: Path) -> PreparedData:
    """Read the manifest the prepare stage wrote."""
    path = prepared_dir / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no prepared data; run `propensity prepare` first")
    data = json.loads(path.read_text())
    return PreparedData(
        directory=Path(data["directory"]),
        source=data["source"],
        as_of=datetime.fromisoformat(data["as_of"]),
        original_as_of=datetime.fromisoformat(data["original_as_of"]),
        shift_days=int(data["shift_days"]),
        event_types=frozenset(data["event_types"]),
        n_events=int(data["n_events"]),
        n_users=int(data["n_users"]),
        n_items=int(data["n_items"]),
    )


@dataclass(frozen=True)
class _EventStats:
    n_events: int
    n_users: int
    n_extra: int
    event_types: frozenset[str]


def _forgotten_users(con: duckdb.DuckDBPyConnection, dataset: StagedDataset, extra_events: pd.DataFrame | None,
                     forgotten: Tombstones | None) -> dict[str, datetime]:
    """The users of this log that have a tombstone, with its time; registered as the `forgotten` table."""
    erased: dict[str, datetime] = {}
    if forgotten is not None and forgotten.hashes():
        # Hashing every distinct id once is cheap next to the log itself (about a microsecond an id).
        users = [row[0] for row in con.execute(f"SELECT DISTINCT user_id FROM read_parquet('{dataset.events_path}')").fetchall()]
        users += [str(u) for u in dataset.users["user_id"]] if "user_id" in dataset.users else []
        users += [str(u) for u in extra_events["user_id"].unique()] if extra_events is not None and len(extra_events) else []
        erased = forgotten.forgotten(dict.fromkeys(users))
    con.register("forgotten", pa.table(
        {"user_id": pa.array(list(erased), pa.string()), "forgotten_at": pa.array(list(erased.values()), pa.timestamp("us", tz="UTC"))}
    ))
    return erased


def _write_events(con: duckdb.DuckDBPyConnection, dataset: StagedDataset, extra_events: pd.DataFrame | None,
                  shift_days: int, out: Path, erased: dict[str, datetime]) -> _EventStats:
    """Shift, add the ingested events, drop repeated event_ids (first kept) and forgotten users' events, sort by time, out of core."""
    columns = raw_schema("events").names
    # A tombstone covers events up to its time, on the event's own clock (the raw log's before the shift).
    not_forgotten = "NOT EXISTS (SELECT 1 FROM forgotten f WHERE f.user_id = e.user_id AND e.event_time <= f.forgotten_at)"
    con.execute(f"CREATE TEMP VIEW staged AS SELECT * FROM read_parquet('{dataset.events_path}') e WHERE {not_forgotten}")
    extra = extra_events[columns] if extra_events is not None and len(extra_events) else pd.DataFrame(columns=columns)
    con.register("extra_all", pa.Table.from_pandas(extra, schema=raw_schema("events"), preserve_index=False))
    con.execute(f"CREATE TEMP VIEW extra_events AS SELECT * FROM extra_all e WHERE {not_forgotten}")
    # Repeated event_ids of the raw log were found while staging (and quarantined): those rows are left out.
    dropped = f"read_parquet('{dataset.duplicates_path}')" if dataset.duplicates_path else "(SELECT NULL::BIGINT AS line_or_row WHERE false)"
    con.execute(f"CREATE TEMP VIEW dropped AS SELECT line_or_row AS source_row FROM {dropped}")
    select = ", ".join(columns[1:])
    tmp = out.with_suffix(".parquet.tmp")
    # No window or join over the whole log: only the small sides (dropped rows, ingested events) are
    # hashed, so the sort is the one big operator, and it spills under DuckDB's memory cap (a window
    # partitioned by event_id ran out of memory on a log 10x the cap: tests/test_hostile_files.py).
    con.execute(
        f"""
        COPY (
            WITH extra AS (
                SELECT *, row_number() OVER () AS position FROM extra_events
            ),
            extra_first AS (  -- ingested events: first of each event_id, and none the raw log already has
                SELECT * FROM extra
                QUALIFY row_number() OVER (PARTITION BY event_id ORDER BY position) = 1
            ),
            known AS (SELECT DISTINCT event_id FROM staged WHERE event_id IN (SELECT event_id FROM extra_events)),
            combined AS (
                SELECT event_time + INTERVAL ({shift_days}) DAY AS event_time, {select}, 0 AS origin, source_row AS position
                FROM staged WHERE source_row NOT IN (SELECT source_row FROM dropped)
                UNION ALL
                -- Ingested events are on the serving clock already: never shifted.
                SELECT event_time, {select}, 1 AS origin, position FROM extra_first
                WHERE event_id NOT IN (SELECT event_id FROM known)
            )
            SELECT event_time, {select} FROM combined
            ORDER BY event_time, origin, position
        ) TO '{tmp}' (FORMAT PARQUET)
        """
    )
    tmp.replace(out)
    n_events, types = con.execute(f"SELECT count(*), list(DISTINCT event_type) FROM read_parquet('{out}')").fetchone()
    n_users = con.execute(f"SELECT count(*) FROM (SELECT user_id FROM read_parquet('{out}') GROUP BY user_id)").fetchone()[0]
    n_raw = con.execute("SELECT count(*) FROM staged WHERE source_row NOT IN (SELECT source_row FROM dropped)").fetchone()[0]
    return _EventStats(n_events, n_users, n_events - n_raw, frozenset(types))


def _shift_users(users: pd.DataFrame, offset: timedelta) -> pd.DataFrame:
    if not offset or "signup_time" not in users:
        return users
    return users.assign(signup_time=users["signup_time"] + offset)
