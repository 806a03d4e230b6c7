"""Raw events -> point-in-time feature tables (Parquet with event_timestamp) for Feast's offline store.

Every table is a set of snapshots: a row at time t describes the entity using only events
strictly before t. Snapshots are taken at day boundaries exactly when a window value can
change (an active day entering or leaving the 1/7/30-day windows) and at the as-of time, so
a point-in-time join at any midnight sees exact window values without a row per entity and day.

Item tables are built once; user tables one bucket of users at a time (by a hash of the user id),
so DuckDB's working set follows the bucket, not the log, and stays under its memory cap.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from propensity.settings import FeatureSettings
from training import item_features, item_retrieval, user_features
from training.duck import Connection, connect
from training.feature_sql import DAY_SECONDS


@dataclass(frozen=True)
class FeatureBuildSummary:
    """Rows written per feature table and the wall time of the build."""

    rows: dict[str, int]
    files: dict[str, Path]
    seconds: float
    as_of: datetime


def day_index(moment: datetime) -> int:
    """Whole days since the epoch (UTC) of a day boundary."""
    seconds = int(moment.timestamp())
    if seconds % DAY_SECONDS:
        raise ValueError(f"as-of time {moment.isoformat()} is not a UTC day boundary")
    return seconds // DAY_SECONDS


Builder = Callable[[Connection, frozenset[str], FeatureSettings], None]
# Item tables need every user's events; user tables need only their own user's (so they can go in buckets).
ITEM_BUILDERS: list[tuple[str, Builder]] = [
    ("item_stats", item_features.item_stats),
    ("item_neighbors", item_features.item_neighbors),
    ("item_factors", item_retrieval.item_factors),
    ("item_copurchase", item_retrieval.item_copurchase),
    ("item_content", item_retrieval.item_content),
]
USER_BUILDERS: list[tuple[str, Builder]] = [
    ("user_activity", user_features.user_activity),
    ("user_profile", user_features.user_profile),
    ("user_interests", user_features.user_interests),
    ("user_purchase_history", user_features.user_purchase_history),
]


def build_features(
    prepared_dir: Path,
    offline_dir: Path,
    as_of: datetime,
    event_types: frozenset[str],
    settings: FeatureSettings,
    progress: Callable[[str], None] = print,
) -> FeatureBuildSummary:
    """Compute every feature table from the prepared raw events and write them under offline_dir."""
    started = time.perf_counter()
    offline_dir.mkdir(parents=True, exist_ok=True)
    spill_dir = offline_dir.parent / ("spark-scratch" if settings.engine == "spark" else "duckdb-spill")
    con = _connect(settings, spill_dir)
    n_events = _load_inputs(con, prepared_dir, day_index(as_of), settings)
    rows: dict[str, int] = {}
    seconds: dict[str, float] = {}
    files: dict[str, Path] = {}
    step = 0

    def build_and_write(name: str, build: Builder, bucket: int, n_buckets: int) -> None:
        nonlocal step
        t0 = time.perf_counter()
        build(con, event_types, settings)
        part = offline_dir / f"{name}.part{bucket}.parquet"
        con.execute(f"COPY (SELECT * FROM {name} ORDER BY event_timestamp) TO '{part}' (FORMAT PARQUET)")
        rows[name] = rows.get(name, 0) + con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
        if bucket == n_buckets - 1:
            files[name] = _concatenate([offline_dir / f"{name}.part{k}.parquet" for k in range(n_buckets)], offline_dir / f"{name}.parquet")
            step += 1
            progress(f"  features [{step}/{len(ITEM_BUILDERS) + len(USER_BUILDERS)}] {name}: {rows[name]:,} rows"
                     + (f" ({n_buckets} user buckets)" if n_buckets > 1 else "") + f" in {seconds[name]:.1f}s")

    for name, build in ITEM_BUILDERS:  # every user's events at once
        build_and_write(name, build, 0, 1)
    # User tables one bucket of users at a time: memory follows the bucket, not the log.
    # Spark spreads one pass over its executors instead (and its hash() is not DuckDB's anyway).
    n_buckets = 1 if settings.engine == "spark" else max(1, -(-n_events // settings.events_per_user_bucket))
    if n_buckets > 1:
        con.execute("ALTER TABLE ev RENAME TO ev_all")
        con.execute("ALTER TABLE user_item_day RENAME TO user_item_day_all")
        con.execute("ALTER VIEW users RENAME TO users_all")
    for bucket in range(n_buckets):
        if n_buckets > 1:
            mine = f"hash(user_id) % {n_buckets} = {bucket}"
            con.execute(f"CREATE OR REPLACE TEMP TABLE ev AS SELECT * FROM ev_all WHERE {mine}")
            con.execute(f"CREATE OR REPLACE TEMP TABLE user_item_day AS SELECT * FROM user_item_day_all WHERE {mine}")
            con.execute(f"CREATE OR REPLACE TEMP VIEW users AS SELECT * FROM users_all WHERE {mine}")
        for name, build in USER_BUILDERS:
            build_and_write(name, build, bucket, n_buckets)
        if n_buckets > 1:
            progress(f"  user bucket {bucket + 1}/{n_buckets} done ({time.perf_counter() - started:.0f}s)")
    con.close()
    shutil.rmtree(spill_dir, ignore_errors=True)
    return FeatureBuildSummary(rows=rows, files=files, seconds=time.perf_counter() - started, as_of=as_of)


def _connect(settings: FeatureSettings, scratch_dir: Path) -> Connection:
    """The engine of settings.engine behind DuckDB's connection surface (the builders' SQL is DuckDB's dialect)."""
    if settings.engine == "spark":
        from training.spark_engine import SparkConnection, spark_session

        return SparkConnection(spark_session(settings.spark_master, settings.spark_conf), scratch_dir)
    return connect(settings.memory_limit_gb, scratch_dir)


def _concatenate(parts: list[Path], path: Path) -> Path:
    """One Parquet file from the parts, row group by row group; readers never see a half-written table."""
    tmp = path.with_suffix(".parquet.tmp")
    if len(parts) == 1:
        parts[0].replace(tmp)
    else:
        # DuckDB marks a column NOT NULL when a part happens to have no nulls: the table's schema may not.
        schema = pq.read_schema(parts[0])
        schema = pa.schema([field.with_nullable(True) for field in schema], metadata=schema.metadata)
        with pq.ParquetWriter(tmp, schema) as writer:
            for part in parts:
                source = pq.ParquetFile(part)
                for group in range(source.num_row_groups):
                    writer.write_table(source.read_row_group(group).cast(schema))
                part.unlink()
    tmp.replace(path)
    return path


def _load_inputs(con: Connection, prepared_dir: Path, as_of_day: int, settings: FeatureSettings) -> int:
    gap = settings.session_gap_minutes * 60
    con.execute(f"CREATE TEMP VIEW raw_events AS SELECT * FROM read_parquet('{prepared_dir / 'events.parquet'}')")
    con.execute(f"CREATE TEMP VIEW items AS SELECT * FROM read_parquet('{prepared_dir / 'items.parquet'}')")
    con.execute(f"CREATE TEMP VIEW users AS SELECT * FROM read_parquet('{prepared_dir / 'users.parquet'}')")
    # Sessions: the shop's session_id where given, else a new session after an inactivity gap.
    con.execute(
        f"""
        CREATE TEMP TABLE ev AS
        WITH base AS (
            SELECT user_id, item_id, event_type, session_id,
                   epoch(event_time)::BIGINT AS ts,
                   (epoch(event_time)::BIGINT // {DAY_SECONDS}) AS day,
                   coalesce(price, 0) * coalesce(quantity, 1) AS amount,
                   CASE WHEN price IS NULL THEN 0 ELSE coalesce(quantity, 1) END AS priced_units
            FROM raw_events
            WHERE epoch(event_time)::BIGINT < {as_of_day} * {DAY_SECONDS}
        ), gaps AS (
            SELECT *, CASE WHEN ts - lag(ts) OVER (PARTITION BY user_id ORDER BY ts) <= {gap} THEN 0 ELSE 1 END AS new_session
            FROM base
        )
        SELECT user_id, item_id, event_type, ts, day, amount, priced_units,
               coalesce(user_id || '#' || session_id,
                        user_id || '~' || sum(new_session) OVER (PARTITION BY user_id ORDER BY ts ROWS UNBOUNDED PRECEDING)) AS session_key
        FROM gaps
        """
    )
    con.execute(
        """
        CREATE TEMP TABLE user_item_day AS
        SELECT user_id, item_id, day,
               count(*) FILTER (WHERE event_type = 'view') AS views,
               count(*) FILTER (WHERE event_type = 'add_to_cart') AS carts,
               count(*) FILTER (WHERE event_type = 'purchase') AS purchases,
               count(*) FILTER (WHERE event_type = 'return') AS returns,
               count(*) AS events,
               sum(amount) FILTER (WHERE event_type = 'purchase') AS spend,
               sum(priced_units) FILTER (WHERE event_type = 'purchase') AS units,
               max(ts) AS last_ts,
               min(ts) AS first_ts,
               max(ts) FILTER (WHERE event_type = 'add_to_cart') AS last_cart_ts,
               max(ts) FILTER (WHERE event_type = 'purchase') AS last_purchase_ts
        FROM ev GROUP BY ALL
        """
    )
    con.execute(f"CREATE TEMP TABLE params AS SELECT {as_of_day}::BIGINT AS as_of_day, (SELECT min(day) FROM user_item_day) AS first_day")
    return con.execute("SELECT count(*) FROM ev").fetchone()[0]
