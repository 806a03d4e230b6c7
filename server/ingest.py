"""Event ingestion: validate, log durably, then update the user's real-time features through Feast's push API.

The log is the source of truth: an event is acknowledged once it is committed there, whether or not the
online store took its feature update. A push that fails (store down) is left unpushed in the log, and a
background task retries it once the store answers again, so the online features catch up with every
acknowledged event. When the log itself cannot store events, the call fails (EventLogUnavailable) and
nothing of the failing message is acknowledged; a retry with the same event_ids is safe (idempotent).

In the server the work runs off the event loop (`ingest_message`): the log on one thread, the online store on
another, each taking the smallest waiting message first (a shopper's few events do not wait behind other streams'
1,000-event messages). sqlite3 releases the GIL while SQLite works and fsyncs, so one message's log commit
overlaps another's feature update and Python work elsewhere, and a 1,000-event message no longer holds the
event loop (Recommend) for its whole duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import queue
import sqlite3
import threading
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
from propensity.realtime import (
    ACTIVITY_VIEW, HISTORY_VIEW, INTERESTS_VIEW, MAINTAINED_ACTIVITY, MAINTAINED_HISTORY, MAINTAINED_INTERESTS, MAINTAINED_VIEWS,
    InvalidEvent, apply_events, parse_event,
)
from server.errors import IngestionUnavailable, RecommendationError
from server.store_reads import DEFAULT_RETRY_SECONDS, DEFAULT_TIMEOUT_SECONDS, StoreBreaker, ViewPlan, harden_redis, python_value, reader_for

log = logging.getLogger(__name__)
MAX_REPORTED_REJECTIONS = 1000
PUSH_SOURCES = {view: f"{view}_push" for view in MAINTAINED_VIEWS}
# A push claimed by a process that then died is taken over after this long (pushes take milliseconds).
PUSH_LEASE_SECONDS = 5.0
RETRY_BATCH = 500
# The features apply_events reads and changes: decoded on the SQLite path; every other feature is passed through.
MAINTAINED = {ACTIVITY_VIEW: MAINTAINED_ACTIVITY, INTERESTS_VIEW: MAINTAINED_INTERESTS, HISTORY_VIEW: MAINTAINED_HISTORY}


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
        # Reads and writes resolved once, on Feast's own layout and keys (server/store_reads.py does the same for reads).
        self._rows = rows_for(store, views, timeout_seconds)
        online = store.config.online_store
        if str(online.type).lower() == "redis" or str(online.type).lower().endswith("redisonlinestore"):
            harden_redis(store._get_provider().online_store._get_client(online), timeout_seconds)  # no 10 s retry backoff
        # One thread per resource: the log's connection is only ever used by one thread, and a user's read-modify-write
        # never races another message's in this process. Each takes the smallest waiting message first, so a shopper's
        # few events are not queued behind other streams' 1,000-event messages (freshness at full load).
        self._log_thread = Lane("ingest-log")
        self._store_thread = Lane("ingest-store")
        self._in_flight: set[str] = set()  # event_ids logged by ingest_message whose push is not recorded yet

    def validate(self, raw_events: Iterable[dict], report: IngestReport, first_index: int) -> list[StreamEvent]:
        """The message's usable events; bad ones are reported (with their index in the stream) and skipped."""
        valid: list[StreamEvent] = []
        for offset, raw in enumerate(raw_events):
            try:
                valid.append(parse_event(**raw))
            except InvalidEvent as error:
                report.reject(first_index + offset, raw.get("event_id", ""), error)
        return valid

    def ingest(self, raw_events: Iterable[dict], report: IngestReport, first_index: int) -> None:
        """Validate, log and push one message's events on the calling thread; bad events are reported and skipped.

        Raises EventLogUnavailable when the log cannot store them (the message's events are then not in the log).
        """
        accepted = self._append(self.validate(raw_events, report, first_index), report)
        if accepted and not self._push(accepted):
            report.pushes_pending += len(accepted)

    async def ingest_message(self, raw_events: Iterable[dict], report: IngestReport, first_index: int) -> None:
        """ingest() off the event loop: validated and logged on the log's thread, pushed on the store's thread.

        Returns once the events are logged (durable) and their features written (or left to the retry task),
        as ingest() does. Messages of concurrent streams overlap: one's push runs while the next one is logged.
        """
        raw_events = list(raw_events)
        accepted = await self._log_thread.run(len(raw_events), self._validate_and_append, raw_events, report, first_index)
        if not accepted:
            return
        ids = [event.event_id for event in accepted]
        self._in_flight.update(ids)
        try:
            pushed = await self._store_thread.run(len(accepted), self._update_online, accepted)
            await self._log_thread.run(0, self._record_push, ids, pushed)  # a cheap update: first in line
        finally:
            self._in_flight.difference_update(ids)
        if not pushed:
            report.pushes_pending += len(accepted)

    def _validate_and_append(self, raw_events: Iterable[dict], report: IngestReport, first_index: int) -> list[StreamEvent]:
        return self._append(self.validate(raw_events, report, first_index), report)

    def _append(self, valid: list[StreamEvent], report: IngestReport) -> list[StreamEvent]:
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
        return accepted

    def retry_pending(self, limit: int = RETRY_BATCH) -> int:
        """Push up to `limit` logged events whose push failed or was abandoned; returns how many reached the store."""
        events = self._claim(limit)
        if events and self._push(events):
            log.info("pushed %d events from the log that the online store missed", len(events))
            return len(events)
        return 0

    async def _retry_pending(self, limit: int = RETRY_BATCH) -> int:
        """retry_pending() on the ingestion threads (the log's connection belongs to the log's thread)."""
        events = await self._log_thread.run(limit, self._claim, limit)
        if not events:
            return 0
        pushed = await self._store_thread.run(len(events), self._update_online, events)
        await self._log_thread.run(0, self._record_push, [event.event_id for event in events], pushed)
        if pushed:
            log.info("pushed %d events from the log that the online store missed", len(events))
        return len(events) if pushed else 0

    def _claim(self, limit: int) -> list[StreamEvent]:
        if not self.breaker.allows() or not self._log.has_claimable(PUSH_LEASE_SECONDS):
            return []
        # A message queued behind others for longer than the lease is still this process's to push: not pushed twice.
        in_flight = self._in_flight
        return [event for event in self._log.claim_unpushed(limit, PUSH_LEASE_SECONDS) if event.event_id not in in_flight]

    def start(self, every_seconds: float = DEFAULT_RETRY_SECONDS) -> None:
        """Retry failed pushes from the log in the background, on the running loop."""
        self._retries = asyncio.create_task(self._retry_forever(every_seconds), name="push retries")

    async def stop(self) -> None:
        if self._retries is not None:
            self._retries.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retries
            self._retries = None
        for lane in (self._store_thread, self._log_thread):  # the work already queued finishes first
            await asyncio.get_running_loop().run_in_executor(None, lane.shutdown)

    async def _retry_forever(self, every_seconds: float) -> None:
        while True:
            await asyncio.sleep(every_seconds)
            try:
                while await self._retry_pending():  # a backlog drains in batches, new messages queued in between
                    await asyncio.sleep(0)
                if self._observer is not None:
                    pending = await self._log_thread.run(0, self._log.unpushed)
                    self._observer.set_pushes_pending(pending)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retrying pushes from the event log failed")

    def _push(self, events: Sequence[StreamEvent]) -> bool:
        """Update the online features for logged events; on failure leave them unpushed for a retry. True when pushed."""
        pushed = self._update_online(events)
        self._record_push([event.event_id for event in events], pushed)
        return pushed

    def _update_online(self, events: Sequence[StreamEvent]) -> bool:
        """The online-store half of a push, behind the breaker. True when the features were written."""
        if not self.breaker.allows():
            return False
        try:
            self._update_features(events)
        except Exception as error:  # whatever the store raised: the events are safe in the log
            self.breaker.failed(error)
            return False
        self.breaker.succeeded()
        return True

    def _record_push(self, ids: list[str], pushed: bool) -> None:
        """The log's half: pushed events are marked; unpushed ones are handed to the retry task at once (if even that
        fails, it takes them when their lease ends)."""
        if not pushed:
            with contextlib.suppress(EventLogError):
                self._log.release(ids)
            return
        try:
            self._log.mark_pushed(ids)
        except EventLogError as error:  # pushed, but not recorded: the lease expires and they are pushed again
            log.error("pushed %d events but could not record it (%s): they will be pushed again", len(ids), error)

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
        recent, bought, recorded = self._recent_items, self._bought_items, self._recorded_types

        def change(user: str, current: dict[str, dict], now: float) -> tuple[float, dict[str, dict]]:
            user_events = by_user[user]
            # Never older than the row it replaces: Redis ignores a write not newer than the stored row, and a retried
            # push can carry older events than a row written since. The row holds every event so far, so "now" is right.
            moment = max(max(e.event_time_ms for e in user_events) / 1000, now)
            return moment, apply_events(current, user_events, recent, bought, recorded)

        written = self._rows.update(sorted(by_user), change)
        done = time.time()
        self.last_push.update({view: done for view in written})
        log.debug("ingested %d events for %d users in %.1f ms", len(events), len(by_user), (time.perf_counter() - started) * 1000)


class Lane:
    """One worker thread for one resource, started on first use: jobs run one at a time, the smallest `size` first
    (then in arrival order); `run` awaits a job's result on the caller's event loop."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, size: float, job: Callable[..., object], *args: object) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
        self._jobs.put((size, next(self._order), job, args, loop, future))
        return future

    def shutdown(self) -> None:
        """Stop once every job queued before is done."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put((math.inf, next(self._order), None, (), None, None))
            thread.join()

    def _work(self) -> None:
        while True:
            _, _, job, args, loop, future = self._jobs.get()
            if job is None:
                return
            try:
                result = job(*args)
            except BaseException as error:  # noqa: BLE001 - handed to the awaiting coroutine
                loop.call_soon_threadsafe(_settle, future, None, error)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.cancelled():  # the stream went away; the job's effects (logged, pushed) stand
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


# -- online reads and writes on Feast's layout -----------------------------------------------------

# A user's new rows from the rows read: (user, {view: {feature: value}}, now) -> (epoch seconds to stamp, {view: new row}).
Change = Callable[[str, dict[str, dict], float], tuple[float, dict[str, dict]]]


class OnlineRows(Protocol):
    def update(self, users: list[str], change: Change) -> set[str]:
        """Read each user's rows of the maintained views, write back what `change` returns (every feature of each
        returned view, stamped with its time); the views written."""


def rows_for(store: FeatureStore, views: dict[str, FeatureView], timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> OnlineRows:
    """Direct SQL on Feast's SQLite online store (the default profile); Feast's own read and write otherwise."""
    config = store.config
    online_type = str(config.online_store.type).lower()
    plain_sqlite = (online_type == "sqlite" or online_type.endswith("sqliteonlinestore")) and not (
        getattr(config.online_store, "vector_enabled", False) or getattr(config.online_store, "enable_openai_compatible_store", False)
    )
    if plain_sqlite:
        return SqliteRows(store, views, timeout_seconds)
    return FeastOnlineRows(store, views, timeout_seconds)


class FeastOnlineRows:
    """Any other online store (Redis, ...): the plan-once reader of server/store_reads.py (every feature decoded), then
    Feast's own OnlineStore.online_write_batch, once per view per message."""

    def __init__(self, store: FeatureStore, views: dict[str, FeatureView], timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self._names = {view: [f.name for f in fv.features] for view, fv in views.items()}
        plans = [ViewPlan(fv, tuple(self._names[view]), fv.ttl.total_seconds() if fv.ttl else float("inf")) for view, fv in views.items()]
        self._reader = reader_for(store, plans, timeout_seconds)
        self._writer = FeastOnlineWrite(store, views)

    def update(self, users: list[str], change: Change) -> set[str]:
        now = time.time()
        columns: dict[str, list[object]] = {name: [None] * len(users) for names in self._names.values() for name in names}
        self._reader.read(users, columns, now)
        written: Rows = {}
        for i, user in enumerate(users):
            current = {view: {name: columns[name][i] for name in names} for view, names in self._names.items()}
            moment, updated = change(user, current, now)
            for view, row in updated.items():
                written.setdefault(view, []).append((user, moment, row, current[view]))
        self._writer.write(written)
        return set(written)


# -- value encoding and SQLite rows ------------------------------------------------------------------

# view -> per user: (user_id, epoch seconds, new row {feature: value}, the row as read before the events)
Rows = dict[str, list[tuple[str, float, dict, dict]]]


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


class _Kept:
    """Stands for a stored value that is not decoded: fresh, not null, and not changed by apply_events (which passes
    it through), so it is not written either; the re-stamp keeps it current."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "KEPT"


KEPT = _Kept()


class SqliteRows:
    """Feast's SQLite online store read and written directly, one transaction per message on one connection.

    The transaction (BEGIN IMMEDIATE) spans the read and the write, so another process's update of the same user
    cannot fall in between and be lost. Readers are not blocked until the commit (rollback journal: only the
    writer lock is held meanwhile).

    Read: one SELECT over the maintained views' tables for all the message's users. Only the features apply_events
    reads and changes (realtime.MAINTAINED_*) are decoded; any other fresh, non-null value is read as KEPT and is not
    written back. Values past the view's TTL read as None, as in Feast.

    Write: the same table, columns, upsert and value bytes as Feast's online_write_batch, with executemany instead
    of one statement per feature. Feast stores one row per (entity, feature): only the features whose value changed,
    or is null, are upserted, then the user's other rows of the view are re-stamped with one UPDATE over its entity key. A null is
    always written, so a feature that was past its TTL when read (read as null) is not brought back by the new
    stamp. What a read returns afterwards is what Feast's push of the whole row would have left.

    A failed read or write rolls back and drops the connection; the next message opens the file again.
    """

    def __init__(self, store: FeatureStore, views: dict[str, FeatureView], timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        from feast.infra.online_stores.sqlite import SqliteOnlineStore, _table_id

        config = store.config
        self._path = Path(SqliteOnlineStore._get_db_path(config))
        self._timeout = timeout_seconds
        self._version = config.entity_key_serialization_version
        versioning = config.registry.enable_online_feature_view_versioning
        self._views = views
        self._view_names = list(views)
        self._names = {view: [f.name for f in fv.features] for view, fv in views.items()}
        self._decoded = [frozenset(MAINTAINED.get(view, self._names[view])) for view in self._view_names]
        self._ttls = [fv.ttl.total_seconds() if fv.ttl else None for fv in views.values()]
        self._encoders = {name: value_encoders(fv) for name, fv in views.items()}
        tables = [_table_id(config.project, fv, versioning) for fv in views.values()]
        self._tables = tables
        self._select: dict[int, str] = {}  # number of keys -> the SELECT over every view's table
        # After the upserts: the rows they wrote carry the stamp already and are not written twice.
        self._stamp_sql = {name: f'UPDATE "{table}" SET event_ts = ? WHERE entity_key = ? AND event_ts IS NOT ?' for name, table in zip(views, tables)}
        self._sql = {
            name: f'INSERT INTO "{table}" (entity_key, feature_name, value, value_text, event_ts, created_ts) '
            f"VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
            f"value = excluded.value, value_text = excluded.value_text, event_ts = excluded.event_ts, created_ts = excluded.created_ts"
            for name, table in zip(views, tables)
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
        # The user views' pages stay cached between messages (SQLite's default is 2 MB; the bench shop's store is 39 MB).
        conn.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        return conn

    def _key(self, fv: FeatureView, user: str) -> bytes:
        key = self._keys.get(user)
        if key is None:
            if len(self._keys) >= _KEY_CACHE:
                self._keys.clear()
            key = self._keys[user] = serialize_entity_key(_entity_key(fv, user), entity_key_serialization_version=self._version)
        return key

    def update(self, users: list[str], change: Change) -> set[str]:
        conn = self._conn or self._connect()
        self._conn = conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                current = self._read(conn, users, now)
                written: Rows = {}
                for user, rows in zip(users, current):
                    moment, updated = change(user, rows, now)
                    for view, row in updated.items():
                        written.setdefault(view, []).append((user, moment, row, rows[view]))
                self._write(conn, written)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error:
            self._conn = None
            conn.close()
            raise
        return set(written)

    def _read(self, conn: sqlite3.Connection, users: list[str], now: float) -> list[dict[str, dict]]:
        """Per user, {view: {feature: value}}: decoded for the maintained features, KEPT for the others (None if absent)."""
        fv = self._views[self._view_names[0]]  # the views share one entity (user_id)
        keys = [self._key(fv, user) for user in users]
        position = {key: i for i, key in enumerate(keys)}
        names, view_names = self._names, self._view_names
        current = [[dict.fromkeys(names[view]) for view in view_names] for _ in users]
        # Oldest stamp still fresh, in the stored unit (Feast's naive-UTC reading); no TTL: any stamp.
        oldest = [_feast_sqlite_epoch(now - ttl) if ttl else -1 for ttl in self._ttls]
        decoded, decode, parse = self._decoded, python_value, ValueProto.FromString
        unique = list(position)  # a user is grouped once per message, so keys do not repeat
        for start in range(0, len(unique), _KEYS_PER_QUERY):
            part = unique[start : start + _KEYS_PER_QUERY]
            # Padded to a power of two with a key no row has: a few statement shapes, each prepared once.
            part += [b""] * (max(16, 1 << (len(part) - 1).bit_length()) - len(part))
            for view_index, key, name, value, stamp in conn.execute(self._query(len(part)), part * len(view_names)):
                if not value or (stamp and stamp < oldest[view_index]):
                    continue  # null, or past the view's TTL: missing, never stale-as-fresh
                current[position[key]][view_index][name] = decode(parse(value)) if name in decoded[view_index] else KEPT
        return [dict(zip(view_names, rows)) for rows in current]

    def _query(self, n_keys: int) -> str:
        sql = self._select.get(n_keys)
        if sql is None:
            marks = ",".join("?" * n_keys)
            sql = self._select[n_keys] = " UNION ALL ".join(
                f'SELECT {i}, entity_key, feature_name, value, event_ts + 0 FROM "{table}" WHERE entity_key IN ({marks})'
                for i, table in enumerate(self._tables)
            )
        return sql

    def _write(self, conn: sqlite3.Connection, rows: Rows) -> None:
        last_moment, last_stamp = None, 0
        for view, view_rows in rows.items():
            fv, encoders, out, restamp = self._views[view], self._encoders[view], [], []
            for user, moment, row, before in view_rows:
                key = self._key(fv, user)
                stamp = last_stamp if moment == last_moment else _feast_sqlite_epoch(moment)
                last_moment, last_stamp = moment, stamp
                restamp.append((stamp, key, stamp))
                for name, encode in encoders.items():
                    new = row.get(name)
                    if new is not None and name in before and before[name] == new:
                        continue  # unchanged (KEPT always is): the UPDATE below re-stamps it
                    value = encode(new)
                    kind = value.WhichOneof("val")
                    text = value.string_val if kind == "string_val" else str(getattr(value, kind)) if kind in _NUMERIC else None
                    out.append((key, name, value.SerializeToString(), text, stamp))
            conn.executemany(self._sql[view], out)
            conn.executemany(self._stamp_sql[view], restamp)


_KEYS_PER_QUERY = 2048  # x 3 views bound parameters per statement (SQLite allows 32,766)
_CACHE_KIB = 64 * 1024
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
