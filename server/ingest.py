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
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pandas as pd
from feast import FeatureStore
from feast.data_source import PushMode

from propensity.event_log import EventLog, EventLogError, StreamEvent
from propensity.realtime import MAINTAINED_VIEWS, InvalidEvent, apply_events, parse_event
from server.errors import IngestionUnavailable, RecommendationError
from server.store_reads import DEFAULT_RETRY_SECONDS, DEFAULT_TIMEOUT_SECONDS, StoreBreaker, harden_redis

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
        # The pushed rows must carry every feature of their view: read the schemas from the registry.
        self._names = {view: [f.name for f in store.get_feature_view(view).features] for view in MAINTAINED_VIEWS}
        self._refs = [f"{view}:{name}" for view, names in self._names.items() for name in names]
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
        started = time.perf_counter()
        by_user: dict[str, list[StreamEvent]] = defaultdict(list)
        for event in events:
            by_user[event.user_id].append(event)
        users = sorted(by_user)
        current = self._store.get_online_features(
            features=self._refs, entity_rows=[{"user_id": u} for u in users]
        ).to_dict()
        pushed: dict[str, list[dict]] = {view: [] for view in MAINTAINED_VIEWS}
        for i, user in enumerate(users):
            updated = apply_events(
                {view: {name: current[name][i] for name in names} for view, names in self._names.items()},
                by_user[user], self._recent_items, self._bought_items, self._recorded_types,
            )
            # Never older than the row it replaces: Redis ignores a push not newer than the stored row, and a retried
            # push can carry older events than a row pushed since. The row holds every event so far, so "now" is right.
            moment = pd.Timestamp(max(max(e.event_time_ms for e in by_user[user]) / 1000, time.time()), unit="s", tz="UTC")
            for view, row in updated.items():
                pushed[view].append({"user_id": user, "event_timestamp": moment, **row})
        for view, rows in pushed.items():
            if not rows:
                continue
            self._store.push(PUSH_SOURCES[view], _typed(pd.DataFrame(rows), self._store, view), to=PushMode.ONLINE)
        now = time.time()
        self.last_push.update({view: now for view, rows in pushed.items() if rows})
        log.info("ingested %d events for %d users in %.1f ms", len(events), len(users), (time.perf_counter() - started) * 1000)


def _typed(frame: pd.DataFrame, store: FeatureStore, view: str) -> pd.DataFrame:
    """Give pushed columns the view's types (pandas would make all-null columns 'object')."""
    for feature in store.get_feature_view(view).features:
        kind = str(feature.dtype)
        if kind == "Int64":
            frame[feature.name] = frame[feature.name].astype("Int64")
        elif kind == "Float64":
            frame[feature.name] = frame[feature.name].astype("Float64")
    return frame
