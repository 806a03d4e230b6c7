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
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import queue
import sqlite3
import struct
import subprocess
import sys
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
from propensity.feature_store import is_sqlite_online_store, sqlite_online_path, sqlite_online_table
from propensity.tombstones import FORGOTTEN_EVENT_REASON, ForgottenIndex
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
# Messages waiting for the online store are updated together up to this many events: a larger update costs less per
# event, and a shopper's few events wait for at most one such update ahead of them (smallest first).
MERGED_EVENTS = 2000
# Users whose rows the SQLite feature process keeps between transactions, least recently used dropped first (the
# default of settings' server.ingest_cached_users): ~5 KiB each on the bench shop (30 recent items), ~110 MB at this.
DEFAULT_CACHED_USERS = 20_000
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
        forgotten: ForgottenIndex | None = None,
        cached_users: int = DEFAULT_CACHED_USERS,
    ) -> None:
        self._store = store
        self._forgotten = forgotten  # erased shoppers: their events dated up to the erasure are refused (docs/privacy.md)
        self._log = event_log
        self._observer = observer
        self.breaker = StoreBreaker("push", retry_seconds, observer)
        self._retries: asyncio.Task | None = None
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
        # On SQLite they run in a process of their own (FeatureProcess): see features_for.
        self._features = features_for(store, views, recent_items, bought_items, recorded_types, timeout_seconds, cached_users)
        online = store.config.online_store
        if str(online.type).lower() == "redis" or str(online.type).lower().endswith("redisonlinestore"):
            harden_redis(store._get_provider().online_store._get_client(online), timeout_seconds)  # no 10 s retry backoff
        # One thread per resource: the log's connection is only ever used by one thread, and a user's read-modify-write
        # never races another message's in this process. Each takes the smallest waiting message first, so a shopper's
        # few events are not queued behind other streams' 1,000-event messages (freshness at full load).
        self._log_thread = Lane("ingest-log")
        self._store_thread = Lane("ingest-store", merge_limit=MERGED_EVENTS)
        self._in_flight: set[str] = set()  # event_ids logged by ingest_message whose push is not recorded yet

    def validate(self, raw_events: Iterable[dict], report: IngestReport, first_index: int) -> list[StreamEvent]:
        """The message's usable events; bad ones are reported (with their index in the stream) and skipped."""
        valid: list[StreamEvent] = []
        covers = self._forgotten.checker() if self._forgotten is not None else None  # None: nobody was ever forgotten
        for offset, raw in enumerate(raw_events):
            try:
                event = parse_event(**raw)
                if covers is not None and covers(event.user_id, event.event_time_ms):
                    raise InvalidEvent("event_time", FORGOTTEN_EVENT_REASON)
                valid.append(event)
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
            pushed = await self._store_thread.run(len(accepted), self._update_online, accepted, merge=True)
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
        pushed = await self._store_thread.run(len(events), self._update_online, events, merge=True)
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
        await asyncio.get_running_loop().run_in_executor(None, self._features.close)

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
        """One read of every user's current rows, the events applied per user, one write per user and view."""
        covers = self._forgotten.checker() if self._forgotten is not None else None
        if covers is not None:  # forgotten since validation (an erasure ran meanwhile): never pushed
            events = [event for event in events if not covers(event.user_id, event.event_time_ms)]
            if not events:
                return
        started = time.perf_counter()
        written = self._features.apply(events)
        done = time.time()
        self.last_push.update({view: done for view in written})
        log.debug("ingested %d events in %.1f ms", len(events), (time.perf_counter() - started) * 1000)

    def close(self) -> None:
        """Stop the feature update's process, if it has one (stop() does it too)."""
        self._features.close()

    def helper_pids(self) -> list[int]:
        """The processes this ingestor runs (the SQLite feature update's), for monitoring and tests."""
        return self._features.pids()


def update_features(rows: OnlineRows, events: Sequence[StreamEvent], recent: int, bought: int, recorded: frozenset[str]) -> set[str]:
    """One read of every user's current rows, the events applied per user, one write per user and view; the views written.

    Same result as applying the events one by one (apply_events orders a user's events by time), with one
    store round trip each way per message instead of Feast's push (DataFrame -> Arrow -> protos) per view.
    """
    by_user: dict[str, list[StreamEvent]] = {}
    for event in events:
        user_events = by_user.get(event.user_id)
        if user_events is None:
            by_user[event.user_id] = [event]
        else:
            user_events.append(event)

    def change(user: str, current: dict[str, dict], now: float) -> tuple[float, dict[str, dict]]:
        user_events = by_user[user]
        # Never older than the row it replaces: Redis ignores a write not newer than the stored row, and a retried
        # push can carry older events than a row written since. The row holds every event so far, so "now" is right.
        moment = max(max(e.event_time_ms for e in user_events) / 1000, now)
        return moment, apply_events(current, user_events, recent, bought, recorded)

    return rows.update(sorted(by_user), change)


class FeatureUpdate(Protocol):
    def apply(self, events: Sequence[StreamEvent]) -> set[str]:
        """Apply logged events to the online features; the views written. Raises whatever the store raised."""

    def close(self) -> None: ...

    def pids(self) -> list[int]: ...


@dataclass
class LocalFeatures:
    """The feature update on the calling thread (online stores other than SQLite: their clients wait on the network
    without the GIL)."""

    rows: OnlineRows
    recent: int
    bought: int
    recorded: frozenset[str]

    def apply(self, events: Sequence[StreamEvent]) -> set[str]:
        return update_features(self.rows, events, self.recent, self.bought, self.recorded)

    def close(self) -> None:
        pass

    def pids(self) -> list[int]:
        return []


class FeatureUpdateFailed(RuntimeError):
    """The feature update's process failed, died or did not answer in time; the events stay unpushed in the log."""


class FeatureProcess:
    """The SQLite feature update in a child process: reading, decoding, apply_events and encoding a 1,000-event
    message's rows is ~0.1 s of Python, which in the server's process held the GIL against the serving loop and
    the other ingestion thread, so one process used one core. The child has an interpreter of its own: the server
    process only validates, logs and waits (in recv, without the GIL).

    Same transaction and guarantees as in-process (SqliteRows): the caller learns the result only after the commit.
    The child is spawned (not forked: gRPC's threads) at construction, restarted after a failure, and never commits
    once its parent is gone (a killed server's last push is rolled back, not left half-recorded).
    """

    def __init__(self, spec: SqliteSpec, recent: int, bought: int, recorded: frozenset[str], reply_seconds: float) -> None:
        self._args = (os.getpid(), spec, recent, bought, recorded)
        self._reply_seconds = reply_seconds
        self._process: subprocess.Popen | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._start()

    def _start(self) -> None:
        # A plain `python -c` child rather than multiprocessing's spawn, which would re-run the parent's main script.
        here, there = multiprocessing.Pipe()
        self._process = subprocess.Popen([sys.executable, "-c", _WORKER_BOOT, str(there.fileno())], pass_fds=(there.fileno(),))
        there.close()
        here.send(list(sys.path))
        here.send(self._args)
        self._conn = here

    def apply(self, events: Sequence[StreamEvent]) -> set[str]:
        message = [astuple_event(event) for event in events]
        for attempt in (1, 2):
            if self._process is None or self._process.poll() is not None:
                self.close()
                self._start()
            conn = self._conn
            assert conn is not None
            try:
                conn.send(message)
                break
            except OSError as failure:  # a process that died since the last answer never got these: a new one may
                self.close()
                if attempt == 2:
                    raise FeatureUpdateFailed(f"the feature update process died ({type(failure).__name__}: {failure})") from failure
        try:
            if not conn.poll(self._reply_seconds):
                raise FeatureUpdateFailed(f"the feature update process did not answer within {self._reply_seconds:g} s")
            written, error = conn.recv()
        except (EOFError, OSError, FeatureUpdateFailed) as failure:
            # It may have died after its commit: these events are then pushed again by the retry (as after a server
            # crash between a push and its mark, docs/reliability/stores.md). A fresh process for the next message.
            self.close()
            if isinstance(failure, FeatureUpdateFailed):
                raise
            raise FeatureUpdateFailed(f"the feature update process died ({type(failure).__name__}: {failure})") from failure
        if error is not None:
            raise FeatureUpdateFailed(error)
        return written

    def pids(self) -> list[int]:
        return [self._process.pid] if self._process is not None else []

    def close(self) -> None:
        process, conn, self._process, self._conn = self._process, self._conn, None, None
        if conn is not None:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
            conn.close()
        if process is not None:
            try:
                process.wait(2.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(2.0)


def astuple_event(event: StreamEvent) -> tuple:
    return (event.event_id, event.event_time_ms, event.user_id, event.item_id, event.event_type, event.session_id, event.price, event.quantity)


# The child: Ctrl-C reaches the whole process group, so it ignores SIGINT (the server stops it in order); the
# parent's sys.path first (the same code), then FeatureProcess's arguments, then messages.
_WORKER_BOOT = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); from multiprocessing.connection import Connection; "
    "conn = Connection(int(sys.argv[1])); sys.path[:0] = conn.recv(); from server.ingest import _feature_worker; "
    "_feature_worker(conn, *conn.recv())"
)


def _feature_worker(conn: multiprocessing.connection.Connection, parent: int, spec: SqliteSpec, recent: int, bought: int,
                    recorded: frozenset[str]) -> None:
    """The child's loop: one message's events in, (views written, None) or (None, error text) out; None ends it."""
    import gc

    def parent_alive() -> None:
        if os.getppid() != parent:
            raise FeatureUpdateFailed("the server process is gone: not committing")

    rows = SqliteRows(spec, before_commit=parent_alive)
    # The statement thread takes the GIL back after each statement (a few per part of an update): with the default
    # 5 ms switch interval it would wait up to that long for this thread's Python, each time.
    sys.setswitchinterval(0.0005)
    gc.freeze()  # the modules and registry objects: not traversed by every collection
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            message = None
        if message is None:
            rows.close()
            return
        try:
            written = update_features(rows, [StreamEvent(*fields) for fields in message], recent, bought, recorded)
            reply: tuple = (written, None)
        except Exception as error:  # noqa: BLE001 - reported to the server, which trips its breaker
            reply = (None, f"{type(error).__name__}: {error}")
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return
        if reply[1] is None:
            # What survives a message is mostly the rows' cache (acyclic dicts and lists, still freed by reference
            # counting when dropped): kept out of the cyclic collector's full passes, which grew with it.
            gc.collect(1)
            gc.freeze()
        else:
            gc.collect()  # a failure's traceback cycles: collected now, never frozen with the cache


class Lane:
    """One worker thread for one resource, started on first use: jobs run one at a time, the smallest `size` first
    (then in arrival order); `run` awaits a job's result on the caller's event loop.

    Jobs run with `merge=True` take one list argument: those waiting together for the same function run as one call
    on the lists joined (up to `merge_limit` in total size), and each caller gets that call's result. The online
    store's update does this when messages queue up behind it: one transaction and one read and write per user
    for all of them (a user in several messages is read and written once), so the busier the store, the cheaper
    each event.
    """

    def __init__(self, name: str, merge_limit: float = 0) -> None:
        self._name = name
        self._merge_limit = merge_limit
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, size: float, job: Callable[..., object], *args: object, merge: bool = False) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
        self._jobs.put((size, next(self._order), job, args, loop, future, merge))
        return future

    def shutdown(self) -> None:
        """Stop once every job queued before is done."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put((math.inf, next(self._order), None, (), None, None, False))
            thread.join()

    def _work(self) -> None:
        while True:
            size, _, job, args, loop, future, merge = self._jobs.get()
            if job is None:
                return
            waiting = [(loop, future)]
            if merge:
                joined = list(args[0])
                while size < self._merge_limit:
                    try:
                        other = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if other[2] != job or not other[6] or size + other[0] > self._merge_limit:
                        self._jobs.put(other)  # back in its place (same size and arrival number)
                        break
                    size += other[0]
                    joined.extend(other[3][0])
                    waiting.append((other[4], other[5]))
                args = (joined,)
            try:
                result = job(*args)
            except BaseException as error:  # noqa: BLE001 - handed to the awaiting coroutines
                for loop, future in waiting:
                    loop.call_soon_threadsafe(_settle, future, None, error)
            else:
                for loop, future in waiting:
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


def features_for(store: FeatureStore, views: dict[str, FeatureView], recent: int, bought: int, recorded: frozenset[str],
                 timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS, cached_users: int = DEFAULT_CACHED_USERS) -> FeatureUpdate:
    """Direct SQL on Feast's SQLite online store (the default profile) in a process of its own; Feast's own read and
    write otherwise, on the calling thread."""
    config = store.config
    plain_sqlite = is_sqlite_online_store(config) and not (
        getattr(config.online_store, "vector_enabled", False) or getattr(config.online_store, "enable_openai_compatible_store", False)
    )
    if plain_sqlite:
        # A reply takes at most the busy timeouts of the transaction's statements; past this the child is replaced.
        return FeatureProcess(sqlite_spec(store, views, timeout_seconds, cached_users), recent, bought, recorded, reply_seconds=max(30.0, 4 * timeout_seconds))
    return LocalFeatures(FeastOnlineRows(store, views, timeout_seconds), recent, bought, recorded)


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


def row_encoders(view: FeatureView) -> dict[str, Callable[[object], tuple[bytes, str | None]]]:
    """Per feature, Python value -> (value bytes, value_text) as Feast's SQLite online_write_batch stores them (the text
    of a string or number, else NULL): for the common types without looking the kind up again."""
    direct: dict[str, Callable[[object], tuple[bytes, str | None]]] = {
        "Int64": lambda v: (int64_bytes(v), str(int(v))),
        "Int32": lambda v: (ValueProto(int32_val=int(v)).SerializeToString(), str(int(v))),
        "Float64": lambda v: (b"", None) if math.isnan(v) else (_DOUBLE_TAG + _DOUBLE.pack(float(v)), str(float(v))),
        "String": lambda v: (ValueProto(string_val=str(v)).SerializeToString(), str(v)),
        "Array(String)": lambda v: (string_list_bytes(v), None),
        "Array(Int64)": lambda v: (int64_list_bytes(v), None),
        "Array(Float64)": lambda v: (ValueProto(double_list_val=DoubleList(val=v)).SerializeToString(), None),
    }
    encoders = {}
    for name, encode in value_encoders(view).items():
        fast = direct.get(next(str(f.dtype) for f in view.features if f.name == name))
        encoders[name] = (lambda v, e=fast: _NULL_ROW if v is None else e(v)) if fast else (lambda v, e=encode: _as_row(e(v)))
    return encoders


_NULL_ROW = (b"", None)


# ValueProto bytes built directly for the types the stream writes most (~5,000 values per 1,000 events, most of them
# lists of 30 small ints or item ids): the same bytes upb serialises (tests/test_online_write.py compares them), from
# memoised pieces, without building a message per value. Anything else (negative or out-of-range ints, non-int
# elements, strings that are not valid UTF-8) goes through protobuf as before, with its errors.
class _Varints(dict):
    """Non-negative int64 -> its protobuf varint; ints repeat (counts, the recent items' timestamps). Cleared when full."""

    def __missing__(self, n: object) -> bytes:
        if type(n) is not int or not 0 <= n < 1 << 63:
            raise KeyError(n)
        if len(self) >= _PIECES_LIMIT:
            self.clear()
        out, rest = bytearray(), n
        while rest > 0x7F:
            out.append((rest & 0x7F) | 0x80)
            rest >>= 7
        out.append(rest)
        piece = self[n] = bytes(out)
        return piece


class _StringElements(dict):
    """str -> its bytes as one element of a StringList (tag, length, UTF-8). Cleared when full."""

    def __missing__(self, text: object) -> bytes:
        if type(text) is not str:
            raise KeyError(text)
        try:
            raw = text.encode()
        except UnicodeEncodeError:
            raise KeyError(text) from None
        if len(self) >= _PIECES_LIMIT:
            self.clear()
        piece = self[text] = b"\n" + _VARINTS[len(raw)] + raw
        return piece


_PIECES_LIMIT = 100_000
_VARINTS = _Varints()
_STRING_ELEMENTS = _StringElements()
_DOUBLE = struct.Struct("<d")
_DOUBLE_TAG = b")"  # field 5 (double_val), fixed 64-bit
_INT64_TAG = b" "  # field 4 (int64_val), varint
_INT64_LIST_TAG = b"r"  # field 14 (int64_list_val), length-delimited; its Int64List packs field 1
_STRING_LIST_TAG = b"b"  # field 12 (string_list_val), length-delimited; its StringList repeats field 1


def int64_bytes(value: int) -> bytes:
    """ValueProto(int64_val=int(value)) serialised."""
    try:
        return _INT64_TAG + _VARINTS[value]
    except KeyError:
        return ValueProto(int64_val=int(value)).SerializeToString()


def int64_list_bytes(values: Sequence[int]) -> bytes:
    """ValueProto(int64_list_val=Int64List(val=values)) serialised."""
    varints = _VARINTS
    try:
        body = b"".join(map(varints.__getitem__, values))
    except KeyError:
        return ValueProto(int64_list_val=Int64List(val=values)).SerializeToString()
    if not body:
        return _INT64_LIST_TAG + b"\x00"
    inner = b"\n" + varints[len(body)] + body
    return _INT64_LIST_TAG + varints[len(inner)] + inner


def string_list_bytes(values: Sequence[str]) -> bytes:
    """ValueProto(string_list_val=StringList(val=values)) serialised."""
    try:
        body = b"".join(map(_STRING_ELEMENTS.__getitem__, values))
    except KeyError:
        return ValueProto(string_list_val=StringList(val=values)).SerializeToString()
    return _STRING_LIST_TAG + _VARINTS[len(body)] + body


def _as_row(value: ValueProto) -> tuple[bytes, str | None]:
    kind = value.WhichOneof("val")
    text = value.string_val if kind == "string_val" else str(getattr(value, kind)) if kind in _NUMERIC else None
    return value.SerializeToString(), text


def _entity_key(view: FeatureView, user_id: str) -> EntityKeyProto:
    return EntityKeyProto(join_keys=[view.entity_columns[0].name], entity_values=[ValueProto(string_val=user_id)])


class _Kept:
    """Stands for a stored value that is not decoded: fresh, not null, and not changed by apply_events (which passes
    it through), so it is not written either; the re-stamp keeps it current."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "KEPT"


KEPT = _Kept()


@dataclass(frozen=True)
class SqliteSpec:
    """Where and how SqliteRows reads and writes: picklable, so a child process can open the same store."""

    path: str
    tables: tuple[str, ...]  # per view, in the order of views
    views: dict[str, FeatureView]
    key_version: int
    timeout_seconds: float
    # Users whose rows the writer keeps between transactions (SqliteRows' cache; settings: server.ingest_cached_users).
    cached_users: int = DEFAULT_CACHED_USERS

    def __post_init__(self) -> None:
        if self.cached_users < 0:
            raise ValueError(f"cached_users must be 0 (no cache) or more, not {self.cached_users}")


def sqlite_spec(store: FeatureStore, views: dict[str, FeatureView], timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
                cached_users: int = DEFAULT_CACHED_USERS) -> SqliteSpec:
    config = store.config
    return SqliteSpec(
        path=str(sqlite_online_path(config)), tables=tuple(sqlite_online_table(config, fv) for fv in views.values()),
        views=views, key_version=config.entity_key_serialization_version, timeout_seconds=timeout_seconds,
        cached_users=cached_users,
    )


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
    written unless the row already holds a null this connection wrote (the re-stamp then leaves the same row the upsert
    would), so a feature that was past its TTL when read (read as null) is not brought back by the new stamp. What a read returns afterwards is what Feast's push of the whole row would have left.

    Cache: the rows this connection last read or wrote are kept per user, as _read would return them, with the
    oldest stamp among their values (TTL). They are used instead of the SELECT only while no other connection has
    committed to the file since this one's last transaction (SQLite's `PRAGMA data_version`, read under the write lock:
    feast materialize, another worker's push, an erasure all change it); otherwise the whole cache is dropped first.
    A row whose oldest value has passed its view's TTL since is read again. Entries are stored only after a commit.

    Pipelined (the default, SQLite 3.38 or later): the users are taken in parts of `pipeline_users`; each part's
    upserts and re-stamps are one statement per view (its rows as JSON into one blob of keys and values), run in
    order on a statement thread while this thread computes and encodes the next part. sqlite3 releases the GIL for
    a statement's whole run, so SQLite's row writes and the Python of the next rows use two cores. Same transaction,
    same rows, same bytes; the commit waits for every statement, and a failed one fails the whole update.

    A failed read or write rolls back and drops the connection and the cache; the next message opens the file again.
    """

    def __init__(self, spec: SqliteSpec, before_commit: Callable[[], None] | None = None, pipelined: bool = True,
                 pipeline_users: int | None = None) -> None:
        views, tables = spec.views, list(spec.tables)
        self._path = Path(spec.path)
        self._timeout = spec.timeout_seconds
        self._version = spec.key_version
        self._cached_users = spec.cached_users
        self._before_commit = before_commit
        self._views = views
        self._view_names = list(views)
        self._names = {view: [f.name for f in fv.features] for view, fv in views.items()}
        self._decoded = [frozenset(MAINTAINED.get(view, self._names[view])) for view in self._view_names]
        self._ttls = [fv.ttl.total_seconds() if fv.ttl else None for fv in views.values()]
        self._encoders = {name: row_encoders(fv) for name, fv in views.items()}
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
        # Pipelined: the statements run on a thread of their own while this one computes the next users' rows (below).
        # The one-statement forms need SQLite's ->> (3.38); older libraries run the executemany forms on this thread.
        self._statements = _StatementThread() if pipelined and sqlite3.sqlite_version_info >= (3, 38) else None
        self._part_users = max(1, pipeline_users or _PIPELINE_USERS)
        # The same upsert and re-stamp as _sql and _stamp_sql, for many rows in one statement: the rows as JSON (?2),
        # per user [key offset, key length, stamp, [[feature, value offset, value length, value_text], ...]], into one
        # blob (?1) of the keys and values (JSON carries no bytes; substr of a blob is a blob, of length 0 for a null's
        # b""). One statement runs in C from start to end with the GIL released; executemany takes the GIL back per row.
        self._bulk_sql = {
            # Each user's fields taken out once (materialised; inline they were parsed again per row: 64 against 36 ms
            # for 10,800 rows measured).
            name: f"WITH u AS MATERIALIZED (SELECT substr(?1, value->>0, value->>1) AS k, value->>2 AS stamp, value->'$[3]' AS rs "
            f'FROM json_each(?2)) INSERT INTO "{table}" (entity_key, feature_name, value, value_text, event_ts, created_ts) '
            f"SELECT u.k, f.value->>0, substr(?1, f.value->>1, f.value->>2), f.value->>3, u.stamp, NULL FROM u, json_each(u.rs) AS f "
            f"WHERE true ON CONFLICT(entity_key, feature_name) DO UPDATE SET "  # WHERE: SQLite's upsert parsing
            f"value = excluded.value, value_text = excluded.value_text, event_ts = excluded.event_ts, created_ts = excluded.created_ts"
            for name, table in zip(views, tables)
        }
        # Per stamp (one per message, nearly always): the users' keys as [offset, length] into the same blob.
        self._bulk_stamp_sql = {
            name: f'UPDATE "{table}" SET event_ts = ?1 WHERE entity_key IN '
            f"(SELECT substr(?2, value->>0, value->>1) FROM json_each(?3)) AND event_ts IS NOT ?1"
            for name, table in zip(views, tables)
        }
        self._conn: sqlite3.Connection | None = None
        self._keys: dict[str, bytes] = {}  # user_id -> Feast's serialised entity key (bounded below)
        # Value bytes -> their decoded value, for the maintained features (bounded below). A user's rows written by one
        # message are read by the next message with that user: the bytes this process wrote are not parsed again.
        # The cached values are shared, so they must never be changed in place (apply_events copies what it changes).
        self._memo: dict[bytes, object] = {}
        # Per view, the maintained features whose Python value survives encoding unchanged (no float32 rounding), with
        # the type decoding gives back: only those are remembered at write time.
        self._exact = {view: _exact_types(fv, MAINTAINED.get(view, ())) for view, fv in views.items()}
        # user_id -> (per view: the row as _read returns it, the oldest stamp of its non-null values or inf, the features
        # whose stored row is a null this connection wrote), least recently used first; valid while the file's
        # data_version is still _data_version (see the class docstring).
        self._cache: dict[str, Entry] = {}
        self._data_version: int | None = None

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
                # Under the write lock: nobody else commits until we do, so this version holds for the whole transaction.
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                if version != self._data_version:
                    self._cache.clear()  # another connection committed since our last transaction: rows may differ
                now = time.time()
                current, fresh = self._read(conn, users, now)
                # Pipelined: the users in parts; a part's statements run on the statement thread (in C, without the
                # GIL) while this thread computes and encodes the next part's rows. Each user is in one part, the
                # statements run in order on this connection, in this one transaction: the same rows as one pass.
                statements = self._statements
                step = self._part_users if statements is not None else max(1, len(users))
                views_written: set[str] = set()
                for start in range(0, len(users), step):
                    written: Rows = {}
                    for user, rows in zip(users[start : start + step], current[start : start + step]):
                        moment, updated = change(user, rows, now)
                        for view, row in updated.items():
                            written.setdefault(view, []).append((user, moment, row, rows[view]))
                    self._write(conn, written, fresh)
                    views_written.update(written)
                if statements is not None:
                    statements.finish()  # every part written; raises the first statement's error
                if self._before_commit is not None:
                    self._before_commit()
                conn.execute("COMMIT")
            except BaseException:
                self._forget()
                if self._statements is not None:
                    self._statements.drain()  # nothing of this transaction still running when it is rolled back
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error:
            self._conn = None
            conn.close()
            raise
        self._remember(version, fresh)
        return views_written

    def close(self) -> None:
        """Stop the statement thread and close the connection (the process ends them anyway)."""
        if self._statements is not None:
            self._statements.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _forget(self) -> None:
        self._cache.clear()
        self._data_version = None

    def _remember(self, version: int, fresh: dict[str, Entry]) -> None:
        """After a commit: the users' rows as they now are in the file, most recently used last, within the bound."""
        cache = self._cache
        for user, entry in fresh.items():
            cache.pop(user, None)
            cache[user] = entry
        excess = len(cache) - self._cached_users
        if excess > 0:
            for user in list(itertools.islice(cache, excess)):
                del cache[user]
        self._data_version = version

    def _read(self, conn: sqlite3.Connection, users: list[str], now: float) -> tuple[list[dict[str, dict]], dict[str, Entry]]:
        """Per user, {view: {feature: value}}: decoded for the maintained features, KEPT for the others (None if absent);
        and per user the cache entry of what was read (the rows and, per view, the oldest stamp of a non-null value)."""
        names, view_names = self._names, self._view_names
        # Oldest stamp still fresh, in the stored unit (Feast's naive-UTC reading); no TTL: any stamp.
        oldest = [_feast_sqlite_epoch(now - ttl) if ttl else -1 for ttl in self._ttls]
        cache, n_views = self._cache, len(view_names)
        fresh: dict[str, Entry] = {}
        current: list[list[dict]] = [[]] * len(users)  # every slot is replaced: from the cache or by the SELECT below
        missing: list[int] = []
        for i, user in enumerate(users):
            entry = cache.get(user)
            if entry is not None and all(low >= limit for low, limit in zip(entry[1], oldest)):
                current[i] = entry[0]  # shared with the cache: apply_events never changes its input in place
                fresh[user] = entry
            else:
                missing.append(i)
        if missing:
            fv = self._views[view_names[0]]  # the views share one entity (user_id)
            position = {self._key(fv, users[i]): i for i in missing}
            for i in missing:
                current[i] = [dict.fromkeys(names[view]) for view in view_names]
            lows = {i: [math.inf] * n_views for i in missing}
            decoded, decode, parse = self._decoded, python_value, ValueProto.FromString
            memo = self._memo
            if len(memo) >= _MEMO_ENTRIES:
                memo.clear()
            remembered = memo.get
            unique = list(position)  # a user is grouped once per message, so keys do not repeat
            for start in range(0, len(unique), _KEYS_PER_QUERY):
                part = unique[start : start + _KEYS_PER_QUERY]
                # Padded to a power of two with a key no row has: a few statement shapes, each prepared once.
                part += [b""] * (max(16, 1 << (len(part) - 1).bit_length()) - len(part))
                for view_index, key, name, value, stamp in conn.execute(self._query(len(part)), part * n_views):
                    if not value or (stamp and stamp < oldest[view_index]):
                        continue  # null, or past the view's TTL: missing, never stale-as-fresh
                    i = position[key]
                    if stamp:
                        low = lows[i]
                        if stamp < low[view_index]:
                            low[view_index] = stamp
                    if name in decoded[view_index]:
                        known = remembered(value, _UNKNOWN)
                        if known is _UNKNOWN:
                            known = memo[value] = decode(parse(value))
                        current[i][view_index][name] = known
                    else:
                        current[i][view_index][name] = KEPT
            unknown = [_NO_NULLS] * n_views  # what wrote a null read from the file is not known: it is written again
            for i in missing:
                fresh[users[i]] = (current[i], lows[i], unknown)
        return [dict(zip(view_names, rows)) for rows in current], fresh

    def _query(self, n_keys: int) -> str:
        sql = self._select.get(n_keys)
        if sql is None:
            marks = ",".join("?" * n_keys)
            sql = self._select[n_keys] = " UNION ALL ".join(
                f'SELECT {i}, entity_key, feature_name, value, event_ts + 0 FROM "{table}" WHERE entity_key IN ({marks})'
                for i, table in enumerate(self._tables)
            )
        return sql

    def _write(self, conn: sqlite3.Connection, rows: Rows, fresh: dict[str, Entry]) -> None:
        """The upserts and re-stamps; `fresh` (the cache entries of what was read) is updated to what the rows written
        read back as, for storing once the transaction commits."""
        last_moment, last_stamp = None, 0
        memo, statements = self._memo, self._statements
        for view, view_rows in rows.items():
            fv, encoders, exact, out, restamp = self._views[view], self._encoders[view], self._exact[view], [], []
            view_index = self._view_names.index(view)
            decoded = self._decoded[view_index]
            # Pipelined: `out` holds the JSON users of _bulk_sql, `parts` the blob they point into (1-based offsets).
            parts: list[bytes] = []
            pos, stamped = 1, {}  # stamp -> [[key offset, key length], ...]
            for user, moment, row, before in view_rows:
                key = self._key(fv, user)
                stamp = last_stamp if moment == last_moment else _feast_sqlite_epoch(moment)
                last_moment, last_stamp = moment, stamp
                if statements is None:
                    restamp.append((stamp, key, stamp))
                else:
                    key_at, key_length = pos, len(key)
                    parts.append(key)
                    pos += key_length
                    keys = stamped.get(stamp)
                    if keys is None:
                        stamped[stamp] = [(key_at, key_length)]
                    else:
                        keys.append((key_at, key_length))
                after = dict(before)  # what a read returns once this commits: every row of the view carries `stamp`
                upserts: list[tuple] = []
                cached_rows, lows, nulls = fresh[user]
                stored_null, now_null = nulls[view_index], []
                for name, encode in encoders.items():
                    new = row.get(name)
                    if new is None:
                        if name in stored_null:
                            # The row holds this connection's own null (b"", NULL text, NULL created_ts): re-stamped
                            # below, it is what this upsert would write (~11 % of the upserts on the bench shop).
                            now_null.append(name)
                            continue
                    elif name in before and before[name] == new:
                        continue  # unchanged (KEPT always is): the UPDATE below re-stamps it
                    blob, text = encode(new)
                    if not blob:
                        after[name] = None
                        now_null.append(name)
                    elif name not in decoded:
                        after[name] = KEPT
                    elif name in exact:
                        after[name] = memo[blob] = exact[name](new)  # what reading these bytes back decodes to: not parsed again
                    else:
                        after[name] = python_value(ValueProto.FromString(blob))
                    if statements is None:
                        out.append((key, name, blob, text, stamp))
                    else:
                        upserts.append((name, pos, len(blob), text))
                        parts.append(blob)
                        pos += len(blob)
                if upserts:
                    out.append((key_at, key_length, stamp, upserts))
                # The entry read may be the cache's own: replaced, not changed.
                cached_rows, lows, nulls = list(cached_rows), list(lows), list(nulls)
                cached_rows[view_index], lows[view_index] = after, stamp if stamp else math.inf
                nulls[view_index] = frozenset(now_null)
                fresh[user] = (cached_rows, lows, nulls)
            if statements is None:
                conn.executemany(self._sql[view], out)
                conn.executemany(self._stamp_sql[view], restamp)
                continue
            data = b"".join(parts)
            encoded = _json(out)
            if "\\u0000" in encoded:  # SQLite's JSON ends a string at a NUL: such text is bound as it is, row by row
                statements.submit(conn, self._sql[view], [(data[k - 1 : k - 1 + kn], name, data[v - 1 : v - 1 + vn], text, stamp)
                                                          for k, kn, stamp, upserts in out for name, v, vn, text in upserts], many=True)
            elif out:
                statements.submit(conn, self._bulk_sql[view], (data, encoded))
            for stamp, keys in stamped.items():
                statements.submit(conn, self._bulk_stamp_sql[view], (stamp, data, _json(keys)))


class _StatementThread:
    """Runs SqliteRows' statements in order on a thread of its own. A statement's whole run (json_each over its rows,
    the upserts, the index and page work) is one sqlite3_step in C without the GIL, so it overlaps the Python of the
    next part's rows on the calling thread: two cores for one message's transaction instead of one.

    After a failed statement the ones queued behind it are skipped (the transaction is rolled back); `finish` raises
    that error on the caller's thread. The caller does not use the connection until `finish` or `drain` returned.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="sqlite-statements", daemon=True)
        self._thread.start()

    def submit(self, conn: sqlite3.Connection, sql: str, params: Sequence, many: bool = False) -> None:
        self._jobs.put((conn, sql, params, many))

    def drain(self) -> BaseException | None:
        """Wait for every statement submitted; the first error since the last drain (then forgotten), or None."""
        done = threading.Event()
        self._jobs.put(done)
        done.wait()
        error, self._error = self._error, None
        return error

    def finish(self) -> None:
        error = self.drain()
        if error is not None:
            raise error

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if isinstance(job, threading.Event):
                job.set()
                continue
            if self._error is not None:
                continue  # the transaction failed: what was queued behind is not run
            conn, sql, params, many = job
            try:
                if many:
                    conn.executemany(sql, params)
                else:
                    conn.execute(sql, params)
            except BaseException as error:  # noqa: BLE001 - raised on the caller's thread by finish()
                self._error = error


# Per user: per view, the row as SqliteRows._read returns it; the oldest stamp of its non-null values (inf if none); the
# features whose stored row is a null this connection wrote (value b"", value_text and created_ts NULL).
Entry = tuple[list[dict], list[float], list[frozenset[str]]]
_NO_NULLS: frozenset[str] = frozenset()
_KEYS_PER_QUERY = 2048  # x 3 views bound parameters per statement (SQLite allows 32,766)
_CACHE_KIB = 64 * 1024
_json = json.JSONEncoder(separators=(",", ":")).encode  # compact: less text to write and for json_each to parse
# Users per part of a pipelined update: a 2,000-event update (~1,200 users) in 5 parts, 2-3 statements per view each.
_PIPELINE_USERS = 256
_KEY_CACHE = 200_000  # the views share one entity (user_id), so one key per user serves every view
_NUMERIC = frozenset({"int64_val", "int32_val", "double_val", "float_val", "bool_val"})
_MEMO_ENTRIES = 50_000  # decoded values kept (cleared when full): about 7 messages' worth of rows of 1,000 events
_UNKNOWN = object()
# Feast types whose Python values encode and decode back equal, and the type python_value returns for them (a count
# of a Float64 feature may be the int 0; the lists apply_events builds hold the element type already).
_SAME: Callable[[object], object] = lambda v: v  # noqa: E731
_EXACT: dict[str, Callable[[object], object]] = {
    "Int64": int, "Float64": float, "String": str, "Array(String)": _SAME, "Array(Int64)": _SAME, "Array(Float64)": _SAME,
}


def _exact_types(view: FeatureView, names: Sequence[str]) -> dict[str, Callable[[object], object]]:
    kinds = {feature.name: str(feature.dtype) for feature in view.features}
    return {name: _EXACT[kinds[name]] for name in names if kinds.get(name) in _EXACT}


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
