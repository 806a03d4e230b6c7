"""Publish features: `feast apply` the repository, then materialize the offline tables into the online store."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pandas as pd

from propensity.feature_store import feast_apply, offline_table, open_store


def publish_features(repo: Path, as_of: datetime, progress: Callable[[str], None] = print, yaml_file: Path | None = None) -> dict[str, int]:
    """Apply definitions and materialize up to as_of; return online entities per feature view."""
    started = time.perf_counter()
    feast_apply(repo, yaml_file)
    store = open_store(repo, yaml_file)
    views = sorted(store.list_feature_views(), key=lambda v: v.name)
    progress(f"feast apply: {len(views)} feature views, services {', '.join(s.name for s in store.list_feature_services())}")
    entities: dict[str, int] = {}
    for view in views:
        t0 = time.perf_counter()
        # end is exclusive in Feast's window, and the as-of snapshots sit exactly at as_of.
        entities[view.name], oldest_latest = _latest_rows(offline_table(store, view), [c.name for c in view.entity_columns], as_of)
        # Only rows from the oldest "latest row" on: older ones are superseded for every entity. Snapshot
        # tables hold an as-of row per entity, so this loads one row each instead of the whole history.
        if entities[view.name]:
            store.materialize(start_date=oldest_latest - timedelta(seconds=1), end_date=as_of + timedelta(seconds=1), feature_views=[view.name])
        progress(f"  materialized {view.name}: {entities[view.name]:,} entities in {time.perf_counter() - t0:.1f}s")
    progress(f"online store ready in {time.perf_counter() - started:.1f}s")
    return entities


def materialize_incremental(repo: Path, progress: Callable[[str], None] = print, yaml_file: Path | None = None, end: datetime | None = None) -> dict[str, tuple[int, float]]:
    """`feast materialize-incremental` up to `end` (default now); per view: (rows loaded, freshness in seconds).

    Rows are the offline rows newer than the view's previous materialization (each view starts where
    its last run ended); freshness is the age of the newest value now in the online store.
    """
    store = open_store(repo, yaml_file)
    end = end or datetime.now(timezone.utc)
    report: dict[str, tuple[int, float]] = {}
    for view in sorted(store.list_feature_views(), key=lambda v: v.name):
        previous = max((i[1] for i in view.materialization_intervals), default=None)
        t0 = time.perf_counter()
        store.materialize_incremental(end_date=end, feature_views=[view.name])
        stamps = pd.read_parquet(offline_table(store, view), columns=["event_timestamp"])["event_timestamp"]
        stamps = stamps[stamps <= _utc(end)]
        new = stamps[stamps > _utc(previous)] if previous is not None else stamps
        newest = stamps.max() if len(stamps) else None
        freshness = (end - newest.to_pydatetime()).total_seconds() if newest is not None else float("inf")
        report[view.name] = (int(len(new)), freshness)
        progress(f"  {view.name}: {len(new):,} new rows, newest value {freshness / 3600:.1f} h old ({time.perf_counter() - t0:.1f}s)")
    return report


def _utc(moment: datetime) -> pd.Timestamp:
    stamp = pd.Timestamp(moment)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _latest_rows(table: Path, keys: list[str], as_of: datetime) -> tuple[int, datetime]:
    """Entities in the offline table up to as_of, and the oldest of their latest snapshot times."""
    con = duckdb.connect()
    try:
        count, oldest = con.execute(
            f"""
            SELECT count(*), min(latest) FROM (
                SELECT max(event_timestamp) AS latest FROM read_parquet('{table}')
                WHERE event_timestamp <= ?::TIMESTAMPTZ GROUP BY {', '.join(keys)}
            )
            """,
            [as_of],
        ).fetchone()
    finally:
        con.close()
    return int(count), pd.Timestamp(oldest).to_pydatetime() if count else as_of
