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
from propensity.realtime import ACTIVITY_VIEW, INTERESTS_VIEW, InvalidEvent, apply_events, parse_event
from server.errors import IngestionUnavailable

log = logging.getLogger(__name__)
MAX_REPORTED_REJECTIONS = 1000
PUSH_SOURCES = (f"{ACTIVITY_VIEW}_push", f"{INTERESTS_VIEW}_push")


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

    def __init__(self, store: FeatureStore, event_log: EventLog, recent_items: int, recorded_types: frozenset[str]) -> None:
        self._store = store
        self._log = event_log
        self._recent_items = recent_items
        self._recorded_types = recorded_types
        self.last_push: dict[str, float] = {}  # feature view -> epoch seconds of its latest real-time push
        registered = {source.name for source in store.list_data_sources()}
        missing = [name for name in PUSH_SOURCES if name not in registered]
        if missing:
            raise IngestionUnavailable(
                f"IngestEvents: the Feast registry has no push source {', '.join(map(repr, missing))}; "
                f"run `feast apply` in the feature repository (or `propensity publish`) with the current definitions"
            )
        # The pushed rows must carry every feature of their view: read the schemas from the registry.
        self._activity_names = [f.name for f in store.get_feature_view(ACTIVITY_VIEW).features]
        self._interest_names = [f.name for f in store.get_feature_view(INTERESTS_VIEW).features]
        self._refs = [f"{ACTIVITY_VIEW}:{n}" for n in self._activity_names] + [f"{INTERESTS_VIEW}:{n}" for n in self._interest_names]

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
        activity_rows, interest_rows = [], []
        for i, user in enumerate(users):
            activity, interests = apply_events(
                {name: current[name][i] for name in self._activity_names},
                {name: current[name][i] for name in self._interest_names},
                by_user[user], self._recent_items, self._recorded_types,
            )
            moment = pd.Timestamp(max(e.event_time_ms for e in by_user[user]), unit="ms", tz="UTC")
            activity_rows.append({"user_id": user, "event_timestamp": moment, **activity})
            interest_rows.append({"user_id": user, "event_timestamp": moment, **interests})
        self._store.push(PUSH_SOURCES[0], _typed(pd.DataFrame(activity_rows), self._store, ACTIVITY_VIEW), to=PushMode.ONLINE)
        self._store.push(PUSH_SOURCES[1], _typed(pd.DataFrame(interest_rows), self._store, INTERESTS_VIEW), to=PushMode.ONLINE)
        now = time.time()
        self.last_push.update({ACTIVITY_VIEW: now, INTERESTS_VIEW: now})
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
