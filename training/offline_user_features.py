"""User feature rows at one timestamp straight from the offline tables, streamed in Arrow record batches.

The rule is Feast's point-in-time join for entity rows that all share one timestamp `at`
(feast/infra/offline_stores/ibis.py point_in_time_join, which the DuckDB offline store runs): per feature
view of the service, the user's latest row with event_timestamp <= at and event_timestamp + ttl >= at
(ties: latest created timestamp), left-joined to the users, so a user without such a row gets nulls.
Feast's registry names the tables (propensity.feature_store.offline_table) and their TTLs.

What Feast's get_historical_features does not do: it builds the whole result in memory as a DataFrame.
Here DuckDB streams it. Each view is read twice: first only (user, timestamp) to find the file row number
of each user's latest row (newest time window first in snapshot tables), then the feature columns of just
those rows, from the row groups whose time range can hold one (build-features writes the tables sorted by
time, so older snapshots are skipped by row-group statistics, never decoded). Memory is bounded by DuckDB's
memory_limit (beyond it, DuckDB spills to disk) plus one record batch. tests/test_offline_user_features.py
checks the rule against a hand-written one; tests/test_batch_scoring.py against Feast's own.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # Feast is imported by whoever opens the store: score-batch starts DuckDB's work before that import
    from feast import FeatureStore

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


def service_tables(store: FeatureStore, service_name: str, only: Collection[str] | None = None) -> list[ViewTable]:
    """The offline table of every feature view of a user feature service, from Feast's registry.

    only: just these features (views without any are left out): what is not read is neither decoded nor joined.
    """
    from propensity.feature_store import offline_table

    tables = []
    for projection in store.get_feature_service(service_name).feature_view_projections:
        if only is not None and not any(f.name in only for f in projection.features):
            continue
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
                features=tuple((renamed.get(f.name, f.name), f.name) for f in projection.features if only is None or f.name in only),
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
    """The entity set as table `_users` (user_id, _u = its rank by id): the given ids, or users with an event in the
    history_days before `at`."""
    if users is not None:
        frame = pa.table({USER_KEY: pa.array([str(u) for u in users], type=pa.string())})
        con.register("_given_users", frame)
        distinct = f"SELECT DISTINCT {USER_KEY} FROM _given_users"
    else:
        distinct = (f"SELECT DISTINCT CAST(user_id AS VARCHAR) AS {USER_KEY} FROM read_parquet('{events}') "
                    f"WHERE event_time < {_timestamp(at)} AND event_time >= {_timestamp(at - timedelta(days=history_days))}")
    con.execute(f"CREATE OR REPLACE TEMP TABLE _users AS SELECT {USER_KEY}, row_number() OVER (ORDER BY {USER_KEY}) AS _u FROM ({distinct})")
    if users is not None:
        con.unregister("_given_users")
    return int(con.execute("SELECT count(*) FROM _users").fetchall()[0][0])


def user_feature_batches(
    con: duckdb.DuckDBPyConnection, tables: Sequence[ViewTable], at: datetime, rows_per_batch: int, ordered: bool = True
) -> Iterator[pa.RecordBatch]:
    """Record batches of user_id plus every feature of `tables` for the users in `_users`, ordered by user_id unless not
    `ordered` (then the first batch comes before the last row is read: the join streams instead of being sorted first)."""
    selects, joins = [], []
    for i, table in enumerate(tables):
        windows = _latest_rows(con, table, i, at)
        if not windows:  # no row of this view is valid at `at`: all nulls
            selects += [f"CAST(NULL AS {_column_type(con, table, column)}) AS \"{feature}\"" for column, feature in table.features]
            continue
        alias, ts = f"v{i}", f'f."{table.timestamp}"'
        columns = ", ".join(f'f."{column}" AS "{feature}"' for column, feature in table.features)
        # Each user's latest row by its row number in the file, read only from the time windows that hold one, so
        # row groups of older snapshots are skipped by their statistics and never decoded.
        rows = " UNION ALL ".join(
            f"SELECT l._u, {columns} FROM read_parquet('{table.path}', file_row_number = true) f "
            f"JOIN _latest{i} l ON f.file_row_number = l._row WHERE {_between(ts, window)}"
            for window in windows
        )
        joins.append(f"LEFT JOIN ({rows}) {alias} ON {alias}._u = u._u")
        selects += [f'{alias}."{feature}"' for _, feature in table.features]
    sql = f"SELECT u.{USER_KEY}, {', '.join(selects)} FROM _users u {' '.join(joins)}" + (" ORDER BY u._u" if ordered else "")
    yield from con.sql(sql).to_arrow_reader(rows_per_batch)  # streamed, not materialised first


# In a table of snapshots (many rows per user), each user's latest row is searched for newest first: in
# [at - 1 day, at], then in windows 4x wider each, down to the TTL. At a snapshot time nearly every user is found in
# the first window, which only the newest row groups overlap. A table with few rows per user is read in one pass.
_FIRST_WINDOW = timedelta(days=1)
_GROWTH = 4
_MAX_WINDOWS = 6  # the last one reaches back to the TTL (or without a TTL, to the beginning)
_ROWS_PER_USER_FOR_WINDOWS = 4


def _latest_rows(con: duckdb.DuckDBPyConnection, table: ViewTable, i: int, at: datetime) -> list[tuple[datetime | None, datetime, bool]]:
    """Table `_latest{i}` (_u, _row): the file row number of each user's latest valid row in the view (Feast's order:
    latest event timestamp, then latest created timestamp). Returns the windows (lower bound or None, upper bound,
    upper bound included) in which some user's latest row lies."""
    ts = f'f."{table.timestamp}"'
    latest = f"({ts}, f.\"{table.created}\")" if table.created else ts
    earliest = at - table.ttl if table.ttl else None  # Feast: event_timestamp + ttl >= at
    con.execute(f"CREATE OR REPLACE TEMP TABLE _latest{i} (_u BIGINT, _row BIGINT)")
    con.execute("CREATE OR REPLACE TEMP TABLE _missing AS SELECT * FROM _users")
    users = con.execute("SELECT count(*) FROM _users").fetchall()[0][0]
    windows = _MAX_WINDOWS if pq.ParquetFile(table.path).metadata.num_rows > _ROWS_PER_USER_FOR_WINDOWS * users else 1
    found_in: list[tuple[datetime | None, datetime, bool]] = []
    upper, width = at, _FIRST_WINDOW
    for k in range(windows):
        lower: datetime | None = upper - width
        last = k == windows - 1 or (earliest is not None and lower <= earliest)
        if last:
            lower = earliest
        window = (lower, upper, k == 0)
        added = con.execute(
            f"INSERT INTO _latest{i} SELECT m._u, arg_max(f.file_row_number, {latest}) "
            f"FROM read_parquet('{table.path}', file_row_number = true) f JOIN _missing m ON f.\"{table.key}\" = m.{USER_KEY} "
            f"WHERE {_between(ts, window)} GROUP BY m._u"
        ).fetchall()[0][0]
        if added:
            found_in.append(window)
            con.execute(f"DELETE FROM _missing WHERE _u IN (SELECT _u FROM _latest{i})")
        if last or not con.execute("SELECT count(*) FROM _missing").fetchall()[0][0]:
            break
        upper, width = lower, width * _GROWTH
    return found_in


def _between(column: str, window: tuple[datetime | None, datetime, bool]) -> str:
    lower, upper, inclusive = window
    bound = f"{column} {'<=' if inclusive else '<'} {_timestamp(upper)}"
    return bound if lower is None else f"{bound} AND {column} >= {_timestamp(lower)}"


def _timestamp(moment: datetime) -> str:
    """A timestamp literal (a constant, so the Parquet reader can skip row groups by their statistics)."""
    return f"TIMESTAMPTZ '{moment.isoformat()}'"


def _column_type(con: duckdb.DuckDBPyConnection, table: ViewTable, column: str) -> str:
    described = con.execute(f"DESCRIBE SELECT \"{column}\" FROM read_parquet('{table.path}')").fetchall()[0]
    return str(described[1])
