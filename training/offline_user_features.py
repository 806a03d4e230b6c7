"""User feature rows at one timestamp straight from the offline tables, streamed in Arrow record batches.

The rule is Feast's point-in-time join for entity rows that all share one timestamp `at`
(feast/infra/offline_stores/ibis.py point_in_time_join, which the DuckDB offline store runs): per feature
view of the service, the user's latest row with event_timestamp <= at and event_timestamp + ttl >= at
(ties: latest created timestamp), left-joined to the users, so a user without such a row gets nulls.
Feast's registry names the tables (propensity.feature_store.offline_table) and their TTLs.

What Feast's get_historical_features does not do: it builds the whole result in memory as a DataFrame.
Here DuckDB streams it. Each view is read twice: first only (user, timestamp) to find each user's latest
row, then the feature columns of row groups that can hold such a row (the tables are sorted by time, so
older snapshots are skipped, not decoded). Memory is bounded by DuckDB's memory_limit (it spills to disk)
plus one record batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
from feast import FeatureStore

from propensity.feature_store import offline_table

USER_KEY = "user_id"


@dataclass(frozen=True)
class ViewTable:
    """One feature view of a service as a table: where it is, its columns and its time-to-live."""

    name: str
    path: Path
    key: str  # the entity column in the table
    timestamp: str
    created: str | None
    features: tuple[tuple[str, str], ...]  # (column in the table, feature name)
    ttl: timedelta | None


def service_tables(store: FeatureStore, service_name: str) -> list[ViewTable]:
    """The offline table of every feature view of a user feature service, from Feast's registry."""
    tables = []
    for projection in store.get_feature_service(service_name).feature_view_projections:
        view = store.get_feature_view(projection.name)
        source = view.batch_source
        renamed = {feature: column for column, feature in (source.field_mapping or {}).items()}
        keys = projection.join_key_map or {column.name: column.name for column in view.entity_columns}
        table_keys = [column for column, entity in keys.items() if entity == USER_KEY]
        if len(table_keys) != 1:
            raise ValueError(f"feature view {view.name!r} is not keyed by {USER_KEY!r} alone (keys: {sorted(keys)})")
        tables.append(
            ViewTable(
                name=projection.name_to_use(),
                path=offline_table(store, view),
                key=renamed.get(table_keys[0], table_keys[0]),
                timestamp=source.timestamp_field,
                created=source.created_timestamp_column or None,
                features=tuple((renamed.get(f.name, f.name), f.name) for f in projection.features),
                ttl=view.ttl if view.ttl else None,  # Feast: no TTL (or 0) means no expiry
            )
        )
    return tables


def connect(memory_limit: str = "2GB", threads: int | None = None, temp_directory: Path | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection in UTC with bounded memory (larger intermediate results spill to temp_directory)."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"SET memory_limit = '{memory_limit}'")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if temp_directory is not None:  # DuckDB creates it when it first spills
        con.execute(f"SET temp_directory = '{temp_directory}'")
    return con


def set_users(con: duckdb.DuckDBPyConnection, users: Sequence[str] | None = None, events: Path | None = None,
              at: datetime | None = None, history_days: int = 90) -> int:
    """The entity set as table `_users`: the given ids, or users with an event in the history_days before `at`."""
    if users is not None:
        frame = pa.table({USER_KEY: pa.array([str(u) for u in users], type=pa.string())})
        con.register("_given_users", frame)
        con.execute(f"CREATE OR REPLACE TEMP TABLE _users AS SELECT DISTINCT {USER_KEY} FROM _given_users")
        con.unregister("_given_users")
    else:
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE _users AS SELECT DISTINCT CAST(user_id AS VARCHAR) AS {USER_KEY} "
            f"FROM read_parquet('{events}') WHERE event_time < $at AND event_time >= $start",
            {"at": at, "start": at - timedelta(days=history_days)},
        )
    return int(con.execute("SELECT count(*) FROM _users").fetchall()[0][0])


def user_feature_batches(con: duckdb.DuckDBPyConnection, tables: Sequence[ViewTable], at: datetime, rows_per_batch: int) -> Iterator[pa.RecordBatch]:
    """Record batches of user_id plus every feature of `tables` for the users in `_users`, ordered by user_id."""
    selects, joins = [], []
    for i, table in enumerate(tables):
        latest = _latest_rows(con, table, i, at)
        if latest is None:  # no row of this view is valid at `at`: all nulls
            selects += [f"CAST(NULL AS {_column_type(con, table, column)}) AS \"{feature}\"" for column, feature in table.features]
            continue
        alias = f"v{i}"
        columns = ", ".join(f'"{column}" AS "{feature}"' for column, feature in table.features)
        order = f'"{table.created}" DESC' if table.created else f'"{table.timestamp}" DESC'
        joins.append(
            f"LEFT JOIN (SELECT f.\"{table.key}\" AS _key, {columns} FROM read_parquet('{table.path}') f "
            f"JOIN _latest{i} l ON f.\"{table.key}\" = l._key AND f.\"{table.timestamp}\" = l._ts "
            f"WHERE f.\"{table.timestamp}\" >= TIMESTAMPTZ '{latest.isoformat()}' AND f.\"{table.timestamp}\" <= $at "
            f"QUALIFY row_number() OVER (PARTITION BY f.\"{table.key}\" ORDER BY {order}) = 1) {alias} ON {alias}._key = u.{USER_KEY}"
        )
        selects += [f'{alias}."{feature}"' for _, feature in table.features]
    sql = f"SELECT u.{USER_KEY}, {', '.join(selects)} FROM _users u {' '.join(joins)} ORDER BY u.{USER_KEY}"
    reader = con.sql(sql, params={"at": at}).to_arrow_reader(rows_per_batch)  # streamed, not materialised first
    yield from reader


def _latest_rows(con: duckdb.DuckDBPyConnection, table: ViewTable, i: int, at: datetime) -> datetime | None:
    """Table `_latest{i}`: each user's latest valid timestamp in the view; returns the oldest of them (None if none)."""
    window = f"\"{table.timestamp}\" <= $at" + (f" AND \"{table.timestamp}\" >= $expired" if table.ttl else "")
    params = {"at": at, **({"expired": at - table.ttl} if table.ttl else {})}
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _latest{i} AS SELECT \"{table.key}\" AS _key, max(\"{table.timestamp}\") AS _ts "
        f"FROM read_parquet('{table.path}') WHERE {window} AND \"{table.key}\" IN (SELECT {USER_KEY} FROM _users) GROUP BY 1",
        params,
    )
    oldest = con.execute(f"SELECT min(_ts) FROM _latest{i}").fetchall()[0][0]
    return oldest


def _column_type(con: duckdb.DuckDBPyConnection, table: ViewTable, column: str) -> str:
    described = con.execute(f"DESCRIBE SELECT \"{column}\" FROM read_parquet('{table.path}')").fetchall()[0]
    return str(described[1])
