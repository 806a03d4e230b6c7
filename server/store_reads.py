"""Plan-once reads of Feast online-store rows: one round trip per call, values decoded to plain Python.

Each reader works on Feast's own storage layout and keys (the same tables, hashes and entity-key
serialisation Feast's online stores write), so `feast materialize`, pushes and the `feast` CLI stay
the source of truth. What Feast's generic path does per call and these do once: resolving the
service's feature views and feature references, building entity-key protos, and assembling a
response proto that is then converted back to Python.

- SQLite (default profile): one SELECT over the service's view tables, on a read-only connection. For many
  users at once (ScoreUsers), read_arrays: per view, one query that hands back each feature's stored values
  concatenated, decoded a column at a time (server/value_columns.py) instead of a Python step per row.
- Redis: Feast keeps every view of an entity in one hash, so one HMGET per entity fetches all the
  service's fields (pipelined for many entities), instead of one round trip per feature view.
- Any other online store: Feast's `OnlineStore.online_read`, once per feature view.

A store that fails never hangs a request: Redis calls have socket and connect timeouts and no retries
(redis-py 7 retries a refused connection 3 times with 1-10 s backoff by default: 10.5 s measured), the
SQLite reader's busy timeout is the same bound, and `StoreBreaker` fails fast for a while after a failure
(docs/reliability/stores.md).
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

import numpy as np
import pyarrow as pa
from feast import FeatureStore, FeatureView
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import python_values_to_proto_values
from feast.value_type import ValueType
from google.protobuf.timestamp_pb2 import Timestamp

from propensity.feature_store import is_sqlite_online_store, sqlite_online_path, sqlite_online_table
from server.errors import RecommendationError
from server.value_columns import decode_column, python_value

log = logging.getLogger(__name__)
# SQLite's default limit on bound parameters is 32,766; stay well below it per statement.
_SQLITE_KEYS_PER_QUERY = 1000
_LOCAL_ZONE_IS_UTC = time.timezone == 0 and time.altzone == 0 and not time.daylight
# A user row is ~0.1-0.2 ms when the store is healthy: a call 1,000x slower is a store that is not answering.
DEFAULT_TIMEOUT_SECONDS = 0.25
DEFAULT_RETRY_SECONDS = 1.0


class StoreUnavailable(RecommendationError):
    """The online store did not answer: down, unreachable, too slow or unreadable."""


class StoreObserver(Protocol):
    """Where store failures are reported (server.metrics.Metrics implements it)."""

    def count_store_error(self, operation: str) -> None: ...

    def set_store_up(self, operation: str, up: bool) -> None: ...


class StoreBreaker:
    """A circuit breaker for one kind of store call (operation "read" or "push").

    After a failed call it stays open for retry_seconds: callers fail fast without touching the store, so a
    dead store costs nothing per request. Then the next call probes the store; its success closes the breaker,
    so full service resumes by itself, without a restart. The event loop runs one call at a time, so exactly
    one call probes. On the healthy path it costs one attribute check before and after the call.
    """

    def __init__(self, operation: str, retry_seconds: float = DEFAULT_RETRY_SECONDS, observer: StoreObserver | None = None) -> None:
        self.operation = operation
        self.retry_seconds = retry_seconds
        self._observer = observer
        self._open_until = 0.0
        self.down_since: float | None = None  # monotonic time of the first failure of the current outage
        self.failures = 0  # failed calls in the current outage

    def allows(self) -> bool:
        """True when the store may be called: the breaker is closed, or open long enough for a probe."""
        return not self._open_until or time.monotonic() >= self._open_until

    def failed(self, error: BaseException) -> None:
        now = time.monotonic()
        self._open_until = now + self.retry_seconds
        self.failures += 1
        if self._observer is not None:
            self._observer.count_store_error(self.operation)
        if self.down_since is None:
            self.down_since = now
            log.error("online store %s failed (%s: %s); degraded until it answers, probing every %.1fs",
                      self.operation, type(error).__name__, error, self.retry_seconds)
            if self._observer is not None:
                self._observer.set_store_up(self.operation, False)
        else:
            log.debug("online store %s still failing: %s", self.operation, error)

    def succeeded(self) -> None:
        if not self._open_until:
            return
        down = time.monotonic() - (self.down_since or time.monotonic())
        log.warning("online store %s answers again after %.1fs down (%d failed calls); full service resumed", self.operation, down, self.failures)
        self._open_until, self.down_since, self.failures = 0.0, None, 0
        if self._observer is not None:
            self._observer.set_store_up(self.operation, True)

    def unavailable(self, error: BaseException | None = None) -> StoreUnavailable:
        """The error a caller raises while the store is down (with the cause when a call just failed)."""
        down = time.monotonic() - self.down_since if self.down_since is not None else 0.0
        cause = f": {type(error).__name__}: {error}" if error is not None else ""
        return StoreUnavailable(f"online feature store unavailable for {down:.1f}s{cause}")


def harden_redis(client: object, timeout_seconds: float) -> None:
    """Give a redis-py client (Feast's, shared by reads and pushes) timeouts and no retry backoff.

    A timeout set in the connection string (socket_timeout=..., socket_connect_timeout=...) is kept.
    """
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    set_retry = getattr(client, "set_retry", None)
    if set_retry is not None:
        set_retry(Retry(NoBackoff(), 0))
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        for name in ("socket_timeout", "socket_connect_timeout"):
            if pool.connection_kwargs.get(name) is None:
                pool.connection_kwargs[name] = timeout_seconds
        pool.reset()  # connections made before this point would keep the old settings


@dataclass(frozen=True)
class ViewPlan:
    """One feature view of a service: the features the service takes from it and its TTL in seconds."""

    view: FeatureView
    features: tuple[str, ...]
    ttl_seconds: float


class StoreRead(Protocol):
    errors: tuple[type[BaseException], ...]  # what a failing store raises (the caller degrades on these, not on bugs)

    def read(self, entity_ids: list[str], columns: dict[str, list[object]], now: float) -> None:
        """Fill columns[feature][i] for entity_ids[i]; values past their view's TTL stay None."""

    def read_arrays(self, entity_ids: list[str], now: float) -> Mapping[str, Column]:
        """Feature name -> one value per entity id, as an Arrow array where the reader decodes in bulk, else a list."""


# A feature column of a bulk read: an Arrow array (nulls where missing) or a list of Python values (None where missing).
Column = pa.Array | list[object]


def read_as_lists(reader: StoreRead, plans: Sequence[ViewPlan], entity_ids: list[str], now: float) -> dict[str, Column]:
    """A bulk read through the reader's per-row path: what readers without a bulk decoder return."""
    columns: dict[str, Column] = {name: [None] * len(entity_ids) for plan in plans for name in plan.features}
    reader.read(entity_ids, columns, now)  # type: ignore[arg-type]
    return columns


def reader_for(store: FeatureStore, plans: Sequence[ViewPlan], timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> StoreRead:
    """The fastest reader that understands the store's online store type; store calls time out after timeout_seconds."""
    if is_sqlite_online_store(store.config):
        return SqliteRead(store, plans, timeout_seconds)
    online_type = str(store.config.online_store.type).lower()
    if online_type == "redis" or online_type.endswith("redisonlinestore"):
        return RedisRead(store, plans, timeout_seconds)
    return FeastOnlineRead(store, plans)


def decode(value_bytes: bytes | None) -> object:
    return python_value(ValueProto.FromString(value_bytes)) if value_bytes else None


def fresh(stamp: float | None, ttl_seconds: float, now: float) -> bool:
    """A row without a timestamp is judged by its values alone (they are None); otherwise by the TTL."""
    return not stamp or now - stamp <= ttl_seconds


def _entity_keys(plans: Sequence[ViewPlan], entity_ids: list[str], version: int) -> list[bytes]:
    """Feast's serialised entity keys (the same bytes its online stores write) for single-key entities."""
    view = plans[0].view
    join_key = view.entity_columns[0].name
    value_type = view.entity_columns[0].dtype.to_value_type() if view.entity_columns else ValueType.STRING
    if value_type == ValueType.STRING:
        prefix = _string_key_prefix(join_key, version)
        if prefix is not None:  # the bytes serialize_entity_key writes, without building two protos per id
            return [prefix + len(b).to_bytes(4, "little") + b for b in (str(e).encode("utf8") for e in entity_ids)]
        protos = [ValueProto(string_val=str(e)) for e in entity_ids]
    else:
        protos = python_values_to_proto_values(entity_ids, value_type)
    return [
        serialize_entity_key(EntityKeyProto(join_keys=[join_key], entity_values=[p]), entity_key_serialization_version=version)
        for p in protos
    ]


@functools.cache
def _string_key_prefix(join_key: str, version: int) -> bytes | None:
    """What serialize_entity_key writes before a string id's length and bytes; None unless that layout is confirmed.

    The layout (version 3: key count, key type and length, the key, value type; then the value's length and bytes)
    is checked against Feast's own function on sample ids, so a Feast release that changes it falls back to Feast.
    """
    if version < 3:
        return None
    prefix = b"".join(struct.pack("<I", v) for v in (1, ValueType.STRING.value, len(join_key.encode("utf8"))))
    prefix += join_key.encode("utf8") + struct.pack("<I", ValueType.STRING.value)
    for sample in ("u000123", "", "é-\u00fc-\u4e2d"):
        expected = serialize_entity_key(
            EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(string_val=sample)]), entity_key_serialization_version=version
        )
        encoded = sample.encode("utf8")
        if prefix + len(encoded).to_bytes(4, "little") + encoded != expected:
            return None
    return prefix


def _check_one_entity(plans: Sequence[ViewPlan]) -> None:
    keys = {tuple(c.name for c in plan.view.entity_columns) for plan in plans}
    if len(keys) != 1 or len(next(iter(keys))) != 1:
        raise ValueError(f"feature views {[p.view.name for p in plans]} must share one single-column entity key, got {sorted(keys)}")


class SqliteRead:
    """Feast's SQLite online store: a (entity_key, feature_name, value, event_ts) table per feature view.

    After a failed read the connection is dropped and the next read opens the file again, so a file that
    was moved away or replaced and then restored is read afresh.
    """

    errors = (sqlite3.Error,)

    def __init__(self, store: FeatureStore, plans: Sequence[ViewPlan], timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        _check_one_entity(plans)
        config = store.config
        self._plans = tuple(plans)
        self._version = config.entity_key_serialization_version
        self._path = sqlite_online_path(config)
        self._timeout = timeout_seconds
        self._conn: sqlite3.Connection | None = self._connect()
        self._tables = [sqlite_online_table(config, plan.view) for plan in plans]
        self._wanted = [set(plan.features) for plan in plans]
        # Filter in SQL only when a view's table holds features the plan does not want (a subset read).
        self._names_sql = [
            "" if set(plan.features) == {f.name for f in plan.view.features} else ",".join(f"'{_sql_text(n)}'" for n in plan.features)
            for plan in plans
        ]
        self._sql: dict[int, str] = {}

    def _query(self, n_keys: int) -> str:
        sql = self._sql.get(n_keys)
        if sql is None:
            marks = ",".join("?" * n_keys)
            sql = self._sql[n_keys] = " UNION ALL ".join(
                f'SELECT {i}, entity_key, feature_name, value, event_ts + 0 FROM "{table}" WHERE entity_key IN ({marks})'
                + (f" AND feature_name IN ({names})" if names else "")
                for i, (table, names) in enumerate(zip(self._tables, self._names_sql))
            )
        return sql

    def _connect(self) -> sqlite3.Connection:
        # Read-only, own connection: no type converters (event_ts stays an int), no contention with Feast's writer.
        # The busy timeout bounds the wait for a writer's lock.
        return sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, check_same_thread=False, timeout=self._timeout)

    def read(self, entity_ids: list[str], columns: dict[str, list[object]], now: float) -> None:
        conn = self._conn or self._connect()
        self._conn = conn
        try:
            self._read(conn, entity_ids, columns, now)
        except sqlite3.Error:
            self._conn = None
            conn.close()
            raise

    def _read(self, conn: sqlite3.Connection, entity_ids: list[str], columns: dict[str, list[object]], now: float) -> None:
        keys = _entity_keys(self._plans, entity_ids, self._version)
        position = {key: i for i, key in enumerate(keys)}
        unique = list(position)  # a repeated id is read once, then copied to its other positions
        for start in range(0, len(unique), _SQLITE_KEYS_PER_QUERY):
            part = unique[start : start + _SQLITE_KEYS_PER_QUERY]
            rows = conn.execute(self._query(len(part)), part * len(self._tables)).fetchall()
            oldest = [now - plan.ttl_seconds for plan in self._plans]
            wanted = self._wanted
            for view_index, key, name, value, stamp in rows:
                if name not in wanted[view_index] or not value:
                    continue
                if stamp and _stored_epoch(stamp) < oldest[view_index]:
                    continue  # past the view's TTL: missing, never stale-as-fresh
                columns[name][position[key]] = python_value(ValueProto.FromString(value))
        if len(unique) < len(keys):
            for i, key in enumerate(keys):
                if (j := position[key]) != i:
                    for values in columns.values():
                        values[i] = values[j]


    def read_arrays(self, entity_ids: list[str], now: float) -> Mapping[str, Column]:
        """Every feature of every view as one Arrow array per feature: one query per view and chunk, decoded per column.

        Per view, SQLite joins the ids (with their positions) to the view's table and hands back, per feature, the
        positions, lengths and bytes of the stored values concatenated (group_concat): three values per feature
        instead of a row per entity and feature. The TTL is applied in the query, with the same rule as read():
        a row with a timestamp older than now - TTL is missing. server.value_columns decodes each column in bulk, when it is first used.
        """
        if not _LOCAL_ZONE_IS_UTC:  # stored stamps need a per-stamp local-time conversion (_stored_epoch): read row by row
            return read_as_lists(self, self._plans, entity_ids, now)
        conn = self._conn or self._connect()
        self._conn = conn
        try:
            return self._read_arrays(conn, entity_ids, now)
        except sqlite3.Error:
            self._conn = None
            conn.close()
            raise

    def _read_arrays(self, conn: sqlite3.Connection, entity_ids: list[str], now: float) -> Mapping[str, Column]:
        keys = _entity_keys(self._plans, entity_ids, self._version)
        parts: dict[str, tuple[list[np.ndarray], list[np.ndarray], list[bytes]]] = {
            name: ([], [], []) for plan in self._plans for name in plan.features
        }
        for start in range(0, len(keys), _SQLITE_KEYS_PER_QUERY):
            chunk = keys[start : start + _SQLITE_KEYS_PER_QUERY]
            for view_index, plan in enumerate(self._plans):
                oldest = now - plan.ttl_seconds
                params = [*chunk, oldest] if oldest > float("-inf") else chunk
                for name, positions, lengths, blobs in conn.execute(self._bulk_query(view_index, len(chunk), oldest > float("-inf")), params):
                    if name not in parts:
                        continue
                    found = parts[name]
                    found[0].append(np.fromstring(positions, dtype=np.int64, sep=",") + start)
                    found[1].append(np.fromstring(lengths, dtype=np.int64, sep=","))
                    found[2].append(blobs)
        return ColumnsDecodedOnUse(parts, len(keys))

    def _bulk_query(self, view_index: int, n_keys: int, with_ttl: bool) -> str:
        cache = self.__dict__.setdefault("_bulk_sql", {})
        sql = cache.get((view_index, n_keys, with_ttl))
        if sql is None:
            plan = self._plans[view_index]
            ids = ",".join(f"({i},?)" for i in range(n_keys))
            names = ",".join(f"'{_sql_text(n)}'" for n in plan.features)
            # A value's three parts are concatenated in one pass over the group's rows, so they stay aligned.
            # Empty values (Feast's nulls) are left out, as read() skips them; so are rows past the TTL.
            sql = cache[(view_index, n_keys, with_ttl)] = (
                f"WITH ids(pos, key) AS (VALUES {ids}) "
                "SELECT t.feature_name, group_concat(ids.pos), group_concat(length(t.value)), CAST(group_concat(t.value, '') AS BLOB) "
                f'FROM ids JOIN "{self._tables[view_index]}" t ON t.entity_key = ids.key '
                f"WHERE +t.feature_name IN ({names}) AND length(t.value) > 0"  # unary +: filter the key's rows, not seek each name
                + (" AND NOT (ifnull(t.event_ts + 0, 0) != 0 AND t.event_ts + 0 < ?)" if with_ttl else "")
                + " GROUP BY t.feature_name"
            )
        return sql


class ColumnsDecodedOnUse(Mapping[str, Column]):
    """A bulk read's columns, each decoded when first looked up: scoring users never pays for the item lists it does not use."""

    def __init__(self, parts: dict[str, tuple[list[np.ndarray], list[np.ndarray], list[bytes]]], n: int) -> None:
        self._parts = parts
        self._n = n
        self._decoded: dict[str, Column] = {}

    def __getitem__(self, name: str) -> Column:
        column = self._decoded.get(name)
        if column is None:
            positions, lengths, blobs = self._parts[name]  # KeyError for a feature the read does not have
            column = self._decoded[name] = (
                decode_column(b"".join(blobs), np.concatenate(lengths), np.concatenate(positions), self._n) if blobs else pa.nulls(self._n)
            )
        return column

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)


def _sql_text(name: str) -> str:
    return name.replace("'", "''")


def _stored_epoch(stamp: int | None) -> float | None:
    """Feast's SQLite store writes int(naive_utc.timestamp()) and reads it back with a local-time conversion."""
    if stamp is None or _LOCAL_ZONE_IS_UTC:
        return stamp
    return datetime.fromtimestamp(int(stamp)).replace(tzinfo=timezone.utc).timestamp()


class RedisRead:
    """Feast's Redis online store: one hash per entity key holding every view's fields and `_ts:<view>` stamps.

    Reads go through Feast's own client (also used for pushes), given timeouts and no retry backoff here;
    after a failure redis-py reconnects on the next call.
    """

    def __init__(self, store: FeatureStore, plans: Sequence[ViewPlan], timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        import redis
        from feast.infra.online_stores.redis import _mmh3, _versioned_fv_name

        self.errors = (redis.RedisError, OSError)

        _check_one_entity(plans)
        config = store.config
        self._config = config
        self._online = store._get_provider().online_store
        self._plans = tuple(plans)
        self._version = config.entity_key_serialization_version
        self._project = config.project.encode("utf-8")
        fields: list[bytes | str] = []
        # Per view: (first field index, number of features, index of its timestamp field).
        self._layout: list[tuple[int, int, int]] = []
        for plan in plans:
            name = _versioned_fv_name(plan.view, config)
            first = len(fields)
            fields.extend(_mmh3(f"{name}:{feature}") for feature in plan.features)
            fields.append(f"_ts:{name}")
            self._layout.append((first, len(plan.features), len(fields) - 1))
        self._fields = fields
        harden_redis(self._online._get_client(config.online_store), timeout_seconds)

    def read_arrays(self, entity_ids: list[str], now: float) -> dict[str, Column]:
        return read_as_lists(self, self._plans, entity_ids, now)

    def read(self, entity_ids: list[str], columns: dict[str, list[object]], now: float) -> None:
        client = self._online._get_client(self._config.online_store)
        keys = [key + self._project for key in _entity_keys(self._plans, entity_ids, self._version)]
        if len(keys) == 1:
            replies = [client.hmget(keys[0], self._fields)]
        else:
            with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(key, self._fields)
                replies = pipe.execute()
        for i, reply in enumerate(replies):
            for plan, (first, count, ts_index) in zip(self._plans, self._layout):
                raw_ts = reply[ts_index]
                stamp = None
                if raw_ts:
                    ts = Timestamp.FromString(raw_ts)
                    stamp = ts.seconds + ts.nanos / 1e9
                if not fresh(stamp, plan.ttl_seconds, now):
                    continue
                for name, value in zip(plan.features, reply[first : first + count]):
                    if value:
                        columns[name][i] = decode(value)


class FeastOnlineRead:
    """Any other Feast online store, through its OnlineStore.online_read (one call per feature view)."""

    errors = (Exception,)  # unknown stores raise their own types: any failure degrades the answer

    def __init__(self, store: FeatureStore, plans: Sequence[ViewPlan]) -> None:
        _check_one_entity(plans)
        self._config = store.config
        self._online = store._get_provider().online_store
        self._plans = tuple(plans)

    def read_arrays(self, entity_ids: list[str], now: float) -> dict[str, Column]:
        return read_as_lists(self, self._plans, entity_ids, now)

    def read(self, entity_ids: list[str], columns: dict[str, list[object]], now: float) -> None:
        view = self._plans[0].view
        join_key = view.entity_columns[0].name
        protos = python_values_to_proto_values(entity_ids, view.entity_columns[0].dtype.to_value_type())
        keys = [EntityKeyProto(join_keys=[join_key], entity_values=[p]) for p in protos]
        for plan in self._plans:
            rows = self._online.online_read(self._config, plan.view, keys, list(plan.features))
            for i, (stamp, values) in enumerate(rows):
                if not values or not fresh(stamp.timestamp() if stamp else None, plan.ttl_seconds, now):
                    continue
                for name in plan.features:
                    value = values.get(name)
                    if value is not None:
                        columns[name][i] = python_value(value)
