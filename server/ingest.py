"""Event ingestion: validate, log durably, then update the user's real-time features through Feast's push API."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pandas as pd
from feast import FeatureStore
from feast.data_source import PushMode

from propensity.event_log import EventLog, StreamEvent
from propensity.realtime import MAINTAINED_VIEWS, InvalidEvent, apply_events, parse_event
from server.errors import IngestionUnavailable

log = logging.getLogger(__name__)
MAX_REPORTED_REJECTIONS = 1000
PUSH_SOURCES = {view: f"{view}_push" for view in MAINTAINED_VIEWS}


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
    rejections: list[Rejection] = field(default_factory=list)

    def reject(self, index: int, event_id: str, error: InvalidEvent) -> None:
        self.rejected += 1
        if len(self.rejections) < MAX_REPORTED_REJECTIONS:
            self.rejections.append(Rejection(index, event_id, error.field, error.reason))


class EventIngestor:
    """Applies batches of raw events: log first (durable, idempotent), then push real-time features."""

    def __init__(self, store: FeatureStore, event_log: EventLog, recent_items: int, bought_items: int, recorded_types: frozenset[str]) -> None:
        self._store = store
        self._log = event_log
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

    def ingest(self, raw_events: Iterable[dict], report: IngestReport, first_index: int) -> None:
        """Validate and apply one message's events; bad events are reported and skipped, the rest proceed."""
        valid: list[StreamEvent] = []
        for offset, raw in enumerate(raw_events):
            try:
                valid.append(parse_event(**raw))
            except InvalidEvent as error:
                report.reject(first_index + offset, raw.get("event_id", ""), error)
        accepted, duplicates = self._log.append(valid)
        report.duplicates += len(duplicates)
        if accepted:
            self._update_features(accepted)
        report.accepted += len(accepted)

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
            moment = pd.Timestamp(max(e.event_time_ms for e in by_user[user]), unit="ms", tz="UTC")
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
