"""Raw events -> point-in-time feature tables (Parquet with event_timestamp) for Feast's offline store.

Every table is a set of snapshots: a row at time t describes the entity using only events
strictly before t. Snapshots are taken at day boundaries exactly when a window value can
change (an active day entering or leaving the 1/7/30-day windows) and at the as-of time, so
a point-in-time join at any midnight sees exact window values without a row per entity and day.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import duckdb

from propensity.settings import FeatureSettings
from training import item_features, user_features
from training.duck import connect
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
    spill_dir = offline_dir.parent / "duckdb-spill"
    con = connect(settings.memory_limit_gb, spill_dir)
    _load_inputs(con, prepared_dir, day_index(as_of), settings)
    builders: list[tuple[str, Callable[[duckdb.DuckDBPyConnection, frozenset[str], FeatureSettings], None]]] = [
        ("user_activity", user_features.user_activity),
        ("user_profile", user_features.user_profile),
        ("user_interests", user_features.user_interests),
        ("user_purchase_history", user_features.user_purchase_history),
        ("item_stats", item_features.item_stats),
        ("item_neighbors", item_features.item_neighbors),
    ]
    rows: dict[str, int] = {}
    files: dict[str, Path] = {}
    for step, (name, build) in enumerate(builders, start=1):
        t0 = time.perf_counter()
        build(con, event_types, settings)
        path = offline_dir / f"{name}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        con.execute(f"COPY (SELECT * FROM {name} ORDER BY event_timestamp) TO '{tmp}' (FORMAT PARQUET)")
        tmp.replace(path)  # readers never see a half-written table
        rows[name] = con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
        files[name] = path
        progress(f"  features [{step}/{len(builders)}] {name}: {rows[name]:,} rows in {time.perf_counter() - t0:.1f}s")
    con.close()
    shutil.rmtree(spill_dir, ignore_errors=True)
    return FeatureBuildSummary(rows=rows, files=files, seconds=time.perf_counter() - started, as_of=as_of)


def _load_inputs(con: duckdb.DuckDBPyConnection, prepared_dir: Path, as_of_day: int, settings: FeatureSettings) -> None:
    gap = settings.session_gap_minutes * 60
    con.execute(f"CREATE TEMP TABLE params AS SELECT {as_of_day}::BIGINT AS as_of_day")
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
