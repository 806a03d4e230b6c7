"""Event ingestion: validate, log durably, then update the user's real-time features through Feast's push API.

The log is the source of truth: an event is acknowledged once it is committed there, whether or not the
online store took its feature update. A push that fails (store down) is left unpushed in the log, and a
background task retries it once the store answers again, so the online features catch up with every
acknowledged event. When the log itself cannot store events, the call fails (EventLogUnavailable) and
nothing of the failing message is acknowledged; a retry with the same event_ids is safe (idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from feast import FeatureStore, FeatureView
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import DoubleList, FloatList, Int32List, Int64List, StringList
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import python_values_to_proto_values

from propensity.event_log import EventLog, EventLogError, StreamEvent
from propensity.realtime import MAINTAINED_VIEWS, InvalidEvent, apply_events, parse_event
from server.errors import IngestionUnavailable, RecommendationError
from server.store_reads import DEFAULT_RETRY_SECONDS, DEFAULT_TIMEOUT_SECONDS, StoreBreaker, ViewPlan, harden_redis, reader_for

log = logging.getLogger(__name__)
MAX_REPORTED_REJECTIONS = 1000
PUSH_SOURCES = {view: f"{view}_push" for view in MAINTAINED_VIEWS}
# A push claimed by a process that then died is taken over after this long (pushes take milliseconds).
PUSH_LEASE_SECONDS = 5.0
RETRY_BATCH = 500


class EventLogUnavailable(RecommendationError):
    """The durable event log cannot store events now; nothing of the failing message was acknowledged."""


class PushObserver(Protocol):
    """Where push failures and the retry backlog are reported (server.metrics.Metrics implements it)."""

    def count_store_error(self, operation: str) -> None: ...

    def set_store_up(self, operation: str, up: bool) -> None: ...

    def set_pushes_pending(self, events: int) -> None: ...


@dataclass(frozen=True)
class Rejection:
    index: int
    event_id: str
    field: str
    reason: str


@dataclass
class IngestReport:
    """Running totals over one stream."""

    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    pushes_pending: int = 0  # accepted, but the feature update waits for the online store (retried from the log)
    rejections: list[Rejection] = field(default_factory=list)

    def reject(self, index: int, event_id: str, error: InvalidEvent) -> None:
        self.rejected += 1
        if len(self.rejections) < MAX_REPORTED_REJECTIONS:
            self.rejections.append(Rejection(index, event_id, error.field, error.reason))


class EventIngestor:
    """Applies batches of raw events: log first (durable, idempotent), then push real-time features."""

    def __init__(
        self,
        store: FeatureStore,
        event_log: EventLog,
        recent_items: int,
        bought_items: int,
        recorded_types: frozenset[str],
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
        observer: PushObserver | None = None,
    ) -> None:
        self._store = store
        self._log = event_log
        self._observer = observer
        self.breaker = StoreBreaker("push", retry_seconds, observer)
        self._retries: asyncio.Task | None = None
        self._recent_items = recent_items
        self._bought_items = bought_items
        self._recorded_types = recorded_types
        self.last_push: dict[str, float] = {}  # feature view -> epoch seconds of its latest real-time push
        registered = {source.name for source in store.list_data_sources()}
        missing = [name for name in PUSH_SOURCES.values() if name not in registered]
        if missing:
            raise IngestionUnavailable(
                f"IngestEvents: the Feast registry has no push source {', '.join(map(repr, missing))}; "
                f"run `feast apply` in the feature repository (or `propensity publish`) with the current definitions"
            )
        # The written rows must carry every feature of their view: read the schemas from the registry, once.
        views = {view: store.get_feature_view(view) for view in MAINTAINED_VIEWS}
        self._names = {view: [f.name for f in fv.features] for view, fv in views.items()}
        plans = [ViewPlan(fv, tuple(self._names[view]), fv.ttl.total_seconds() if fv.ttl else float("inf")) for view, fv in views.items()]
        # Reads and writes resolved once, on Feast's own layout and keys (server/store_reads.py does the same for reads).
        self._reader = reader_for(store, plans, timeout_seconds)
        self._writer = writer_for(store, views, timeout_seconds)
        online = store.config.online_store
        if str(online.type).lower() == "redis" or str(online.type).lower().endswith("redisonlinestore"):
            harden_redis(store._get_provider().online_store._get_client(online), timeout_seconds)  # no 10 s retry backoff

    def ingest(self, raw_events: Iterable[dict], report: IngestReport, first_index: int) -> None:
        """Validate, log and push one message's events; bad events are reported and skipped, the rest proceed.

        Raises EventLogUnavailable when the log cannot store them (the message's events are then not in the log).
        """
        valid: list[StreamEvent] = []
        for offset, raw in enumerate(raw_events):
            try:
                valid.append(parse_event(**raw))
            except InvalidEvent as error:
                report.reject(first_index + offset, raw.get("event_id", ""), error)
        try:
            accepted, duplicates = self._log.append(valid)
        except EventLogError as error:
            log.error("IngestEvents refused: %s", error)
            raise EventLogUnavailable(
                f"IngestEvents: the event log cannot store events ({error}); events of this message were not accepted, "
                f"retry them with the same event_ids"
            ) from error
        report.duplicates += len(duplicates)
        report.accepted += len(accepted)
        if accepted and not self._push(accepted):
            report.pushes_pending += len(accepted)

    def retry_pending(self, limit: int = RETRY_BATCH) -> int:
        """Push up to `limit` logged events whose push failed or was abandoned; returns how many reached the store."""
        if not self.breaker.allows() or not self._log.has_claimable(PUSH_LEASE_SECONDS):
            return 0
        events = self._log.claim_unpushed(limit, PUSH_LEASE_SECONDS)
        if events and self._push(events):
            log.info("pushed %d events from the log that the online store missed", len(events))
            return len(events)
        return 0

    def start(self, every_seconds: float = DEFAULT_RETRY_SECONDS) -> None:
        """Retry failed pushes from the log in the background, on the running loop."""
        self._retries = asyncio.create_task(self._retry_forever(every_seconds), name="push retries")

    async def stop(self) -> None:
        if self._retries is not None:
            self._retries.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retries
            self._retries = None

    async def _retry_forever(self, every_seconds: float) -> None:
        while True:
            await asyncio.sleep(every_seconds)
            try:
                while self.retry_pending():  # a backlog drains in batches, the loop serving calls in between
                    await asyncio.sleep(0)
                if self._observer is not None:
                    self._observer.set_pushes_pending(self._log.unpushed())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retrying pushes from the event log failed")

    def _push(self, events: Sequence[StreamEvent]) -> bool:
        """Update the online features for logged events; on failure leave them unpushed for a retry. True when pushed."""
        ids = [event.event_id for event in events]
        if not self.breaker.allows():
            self._release(ids)
            return False
        try:
            self._update_features(events)
        except Exception as error:  # whatever the store raised: the events are safe in the log
            self.breaker.failed(error)
            self._release(ids)
            return False
        self.breaker.succeeded()
        try:
            self._log.mark_pushed(ids)
        except EventLogError as error:  # pushed, but not recorded: the lease expires and they are pushed again
            log.error("pushed %d events but could not record it (%s): they will be pushed again", len(ids), error)
        return True

    def _release(self, ids: list[str]) -> None:
        """Hand unpushed events to the retry task at once (if even that fails, it takes them when their lease ends)."""
        with contextlib.suppress(EventLogError):
            self._log.release(ids)

    def _update_features(self, events: Sequence[StreamEvent]) -> None:
        """One read of every user's current rows, the events applied per user, one write per user and view.

        Same result as applying the events one by one (apply_events orders a user's events by time), with one
        store round trip each way per message instead of Feast's push (DataFrame -> Arrow -> protos) per view.
        """
        started = time.perf_counter()
        by_user: dict[str, list[StreamEvent]] = {}
        for event in events:
            user_events = by_user.get(event.user_id)
            if user_events is None:
                by_user[event.user_id] = [event]
            else:
                user_events.append(event)
        users = sorted(by_user)
        now = time.time()
        columns: dict[str, list[object]] = {name: [None] * len(users) for names in self._names.values() for name in names}
        self._reader.read(users, columns, now)
        written: Rows = {view: [] for view in MAINTAINED_VIEWS}
        for i, user in enumerate(users):
            user_events = by_user[user]
            current = {view: {name: columns[name][i] for name in names} for view, names in self._names.items()}
            updated = apply_events(current, user_events, self._recent_items, self._bought_items, self._recorded_types)
            # Never older than the row it replaces: Redis ignores a write not newer than the stored row, and a retried
            # push can carry older events than a row written since. The row holds every event so far, so "now" is right.
            moment = max(max(e.event_time_ms for e in user_events) / 1000, now)
            for view, row in updated.items():
                written[view].append((user, moment, row, current[view]))
        self._writer.write({view: rows for view, rows in written.items() if rows})
        done = time.time()
        self.last_push.update({view: done for view, rows in written.items() if rows})
        log.debug("ingested %d events for %d users in %.1f ms", len(events), len(users), (time.perf_counter() - started) * 1000)


# -- online writes on Feast's layout ---------------------------------------------------------------

# view -> per user: (user_id, epoch seconds, new row {feature: value}, the row as read before the events)
Rows = dict[str, list[tuple[str, float, dict, dict]]]


class OnlineWrite(Protocol):
    def write(self, rows: Rows) -> None:
        """Replace each user's row of each view (every feature of the view), stamped with its time."""


def writer_for(store: FeatureStore, views: dict[str, FeatureView], timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> OnlineWrite:
    """A direct writer for Feast's SQLite online store (the default profile); Feast's online_write_batch otherwise."""
    config = store.config
    online_type = str(config.online_store.type).lower()
    plain_sqlite = (online_type == "sqlite" or online_type.endswith("sqliteonlinestore")) and not (
        getattr(config.online_store, "vector_enabled", False) or getattr(config.online_store, "enable_openai_compatible_store", False)
    )
    if plain_sqlite:
        return SqliteWrite(store, views, timeout_seconds)
    return FeastOnlineWrite(store, views)


_SCALARS: dict[str, Callable[[object], ValueProto]] = {
    "Int64": lambda v: ValueProto(int64_val=int(v)),
    "Int32": lambda v: ValueProto(int32_val=int(v)),
    "Float64": lambda v: ValueProto() if math.isnan(v) else ValueProto(double_val=float(v)),
    "Float32": lambda v: ValueProto() if math.isnan(v) else ValueProto(float_val=float(v)),
    "String": lambda v: ValueProto(string_val=str(v)),
    "Array(String)": lambda v: ValueProto(string_list_val=StringList(val=v)),
    "Array(Int64)": lambda v: ValueProto(int64_list_val=Int64List(val=v)),
    "Array(Int32)": lambda v: ValueProto(int32_list_val=Int32List(val=v)),
    "Array(Float64)": lambda v: ValueProto(double_list_val=DoubleList(val=v)),
    "Array(Float32)": lambda v: ValueProto(float_list_val=FloatList(val=v)),
}
_NULL = ValueProto()


def value_encoders(view: FeatureView) -> dict[str, Callable[[object], ValueProto]]:
    """Per feature, Python value -> the ValueProto Feast's push would store (None -> an empty Value)."""
    encoders = {}
    for feature in view.features:
        encode = _SCALARS.get(str(feature.dtype))
        if encode is None:  # any other type: Feast's own conversion
            value_type = feature.dtype.to_value_type()
            encode = lambda v, t=value_type: python_values_to_proto_values([v], t)[0]  # noqa: E731
        encoders[feature.name] = (lambda v, e=encode: _NULL if v is None else e(v))
    return encoders


def _entity_key(view: FeatureView, user_id: str) -> EntityKeyProto:
    return EntityKeyProto(join_keys=[view.entity_columns[0].name], entity_values=[ValueProto(string_val=user_id)])


class SqliteWrite:
    """Feast's SQLite online store written directly: the same table, columns, upsert and value bytes as its
    online_write_batch, but one transaction for all views of a message and executemany instead of one statement
    per feature. A failed write rolls back and drops the connection; the next write opens the file again.

    Feast stores one row per (entity, feature): a user's view row is re-stamped with one UPDATE over its entity
    key, then only the features whose value changed, or is null, are upserted. A null is always written, so a
    feature that was past its TTL when read (read as null) is not brought back by the new stamp. What a read
    returns afterwards is what Feast's push of the whole row would have left.
    """

    def __init__(self, store: FeatureStore, views: dict[str, FeatureView], timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        from feast.infra.online_stores.sqlite import SqliteOnlineStore, _table_id

        config = store.config
        self._path = Path(SqliteOnlineStore._get_db_path(config))
        self._timeout = timeout_seconds
        self._version = config.entity_key_serialization_version
        versioning = config.registry.enable_online_feature_view_versioning
        self._views = views
        self._encoders = {name: value_encoders(fv) for name, fv in views.items()}
        self._stamp_sql = {
            name: f'UPDATE "{_table_id(config.project, fv, versioning)}" SET event_ts = ? WHERE entity_key = ?' for name, fv in views.items()
        }
        self._sql = {
            name: f'INSERT INTO "{_table_id(config.project, fv, versioning)}" (entity_key, feature_name, value, value_text, event_ts, created_ts) '
            f"VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
            f"value = excluded.value, value_text = excluded.value_text, event_ts = excluded.event_ts, created_ts = excluded.created_ts"
            for name, fv in views.items()
        }
        self._conn: sqlite3.Connection | None = None
        self._keys: dict[str, bytes] = {}  # user_id -> Feast's serialised entity key (bounded below)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, timeout=self._timeout, check_same_thread=False, isolation_level=None)
        # A rollback journal truncated at commit instead of deleted: the same crash safety (synchronous stays FULL),
        # without creating and deleting a file per transaction (3.2 -> 0.8 ms a commit measured). This setting belongs
        # to this connection only: the file stays in Feast's mode for every other reader and writer.
        if conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete":  # never touch a WAL file's mode (that one persists)
            conn.execute("PRAGMA journal_mode=TRUNCATE")
        return conn

    def _key(self, fv: FeatureView, user: str) -> bytes:
        key = self._keys.get(user)
        if key is None:
            if len(self._keys) >= _KEY_CACHE:
                self._keys.clear()
            key = self._keys[user] = serialize_entity_key(_entity_key(fv, user), entity_key_serialization_version=self._version)
        return key

    def write(self, rows: Rows) -> None:
        params: dict[str, list[tuple]] = {}
        stamps: dict[str, list[tuple]] = {}
        last_moment, last_stamp = None, 0
        for view, view_rows in rows.items():
            fv, encoders, out, restamp = self._views[view], self._encoders[view], [], []
            for user, moment, row, before in view_rows:
                key = self._key(fv, user)
                stamp = last_stamp if moment == last_moment else _feast_sqlite_epoch(moment)
                last_moment, last_stamp = moment, stamp
                restamp.append((stamp, key))
                for name, encode in encoders.items():
                    new = row.get(name)
                    if new is not None and name in before and before[name] == new:
                        continue  # unchanged: the UPDATE above re-stamps it
                    value = encode(new)
                    kind = value.WhichOneof("val")
                    text = value.string_val if kind == "string_val" else str(getattr(value, kind)) if kind in _NUMERIC else None
                    out.append((key, name, value.SerializeToString(), text, stamp))
            params[view] = out
            stamps[view] = restamp
        conn = self._conn or self._connect()
        self._conn = conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for view, out in params.items():
                    conn.executemany(self._stamp_sql[view], stamps[view])
                    conn.executemany(self._sql[view], out)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error:
            self._conn = None
            conn.close()
            raise


_KEY_CACHE = 200_000  # the views share one entity (user_id), so one key per user serves every view
_NUMERIC = frozenset({"int64_val", "int32_val", "double_val", "float_val", "bool_val"})


def _feast_sqlite_epoch(moment: float) -> int:
    """What Feast's SQLite store writes for a timestamp: int(naive UTC datetime.timestamp()) (a local-time reading)."""
    return int(datetime.fromtimestamp(moment, timezone.utc).replace(tzinfo=None).timestamp())


class FeastOnlineWrite:
    """Any other online store (Redis, ...): Feast's own OnlineStore.online_write_batch, once per view per message."""

    def __init__(self, store: FeatureStore, views: dict[str, FeatureView]) -> None:
        self._config = store.config
        self._online = store._get_provider().online_store
        self._views = views
        self._encoders = {name: value_encoders(fv) for name, fv in views.items()}

    def write(self, rows: Rows) -> None:
        for view, view_rows in rows.items():
            fv, encoders = self._views[view], self._encoders[view]
            data = [
                (_entity_key(fv, user), {name: encode(row.get(name)) for name, encode in encoders.items()},
                 datetime.fromtimestamp(moment, timezone.utc), None)
                for user, moment, row, _ in view_rows
            ]
            self._online.online_write_batch(self._config, fv, data, None)
