"""Batched ingestion (server/ingest.py) against real SQLite and Feast stores, no server:

- a message's events grouped by user, one read and one write per user and view (written directly on Feast's
  SQLite layout), leave the same online features as applying the events one at a time through Feast's push;
- the event log's batched append finds duplicates within a message and across messages, and stores each once.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest
from feast.data_source import PushMode

from propensity.event_log import EventLog, StreamEvent
from propensity.feature_store import open_store
from propensity.raw_data import EVENT_TYPES
from propensity.realtime import MAINTAINED_VIEWS, apply_events
from propensity.settings import FeatureSettings
from server.ingest import PUSH_SOURCES, EventIngestor, IngestReport
from tests.conftest import Pipeline, private_env, users

pytestmark = pytest.mark.slow


def _events(known: list[str], items: list[str]) -> list[StreamEvent]:
    """Several events per user (out of time order, repeated items, carts then purchases), known and new users."""
    now_ms = int(time.time() * 1000)
    kinds = ["view", "view", "add_to_cart", "view", "purchase", "add_to_cart", "return", "view", "purchase"]
    events = []
    for u, user in enumerate([*known, "batching-new-a", "batching-new-b"]):
        for k, kind in enumerate(kinds[: 4 + u % 6]):
            when = now_ms - 60_000 * ((k * 7 + u) % 9) - k  # not in time order within a user
            events.append(StreamEvent(f"batching-{u}-{k}", when, user, items[(u + k // 2) % len(items)], kind,
                                      f"s-{u}", price=[2.5, 10.25, 4.0][k % 3], quantity=float(1 + k % 2)))
    return events


def _raw(event: StreamEvent) -> dict:
    return {"event_id": event.event_id, "event_time": str(event.event_time_ms), "user_id": event.user_id, "item_id": event.item_id,
            "event_type": event.event_type, "session_id": event.session_id or "", "price": event.price, "quantity": event.quantity}


def _one_by_one(store, events: list[StreamEvent], names: dict[str, list[str]], features: FeatureSettings) -> None:
    """The reference: each event alone, read and pushed through Feast's own API (the path before batching)."""
    refs = [f"{view}:{name}" for view, view_names in names.items() for name in view_names]
    for event in sorted(events, key=lambda e: e.event_time_ms):
        current = store.get_online_features(features=refs, entity_rows=[{"user_id": event.user_id}]).to_dict()
        rows = {view: {name: current[name][0] for name in view_names} for view, view_names in names.items()}
        updated = apply_events(rows, [event], features.recent_items_per_user, features.bought_items_per_user, frozenset(EVENT_TYPES))
        moment = pd.Timestamp(max(event.event_time_ms / 1000, time.time()), unit="s", tz="UTC")
        for view, row in updated.items():
            frame = pd.DataFrame([{"user_id": event.user_id, "event_timestamp": moment, **row}])
            for feature in store.get_feature_view(view).features:
                if str(feature.dtype) in ("Int64", "Float64"):
                    frame[feature.name] = frame[feature.name].astype(str(feature.dtype))
            store.push(PUSH_SOURCES[view], frame, to=PushMode.ONLINE)


def test_grouped_per_user_batches_leave_the_same_online_features_as_events_applied_one_by_one(pipeline: Pipeline, tmp_path: Path) -> None:
    known = users(pipeline, 8)
    items = pd.read_parquet(pipeline.work_dir / "prepared" / "events.parquet", columns=["item_id"])["item_id"].drop_duplicates().head(6).tolist()
    events = _events(known, items)
    features = FeatureSettings()
    stores = {}
    for name in ("batched", "reference"):
        env, _ = private_env(pipeline, f"batching-{name}", copy_repo=True)
        stores[name] = open_store(Path(env["PROPENSITY_FEATURE_REPO"]))
    batched, reference = stores["batched"], stores["reference"]
    names = {view: [f.name for f in batched.get_feature_view(view).features] for view in MAINTAINED_VIEWS}

    ingestor = EventIngestor(batched, EventLog(tmp_path / "log"), features.recent_items_per_user, features.bought_items_per_user,
                             frozenset(EVENT_TYPES))
    report = IngestReport()
    half = len(events) // 2  # two messages through the ingestor's own entry point: the second reads what the first wrote
    for first, part in ((0, events[:half]), (half, events[half:])):
        ingestor.ingest([_raw(e) for e in part], report, first_index=first)
    assert (report.accepted, report.duplicates, report.rejected, report.pushes_pending) == (len(events), 0, 0, 0)
    _one_by_one(reference, events, names, features)

    all_users = [*known, "batching-new-a", "batching-new-b"]
    refs = [f"{view}:{name}" for view, view_names in names.items() for name in view_names]
    got = batched.get_online_features(features=refs, entity_rows=[{"user_id": u} for u in all_users]).to_dict()
    want = reference.get_online_features(features=refs, entity_rows=[{"user_id": u} for u in all_users]).to_dict()
    for name in want:
        assert got[name] == want[name], f"{name}: batched {got[name]} != one by one {want[name]}"
    assert any(v for v in want["bought_item_ids"]) and any(v for v in want["recent_item_in_cart"])  # the events did something
    assert all(v >= 1 for v in got["views_7d"][-2:])  # the new users exist

    # Every feature row of a written user view carries the write's stamp (unchanged rows are re-stamped, not left older).
    from feast.infra.online_stores.sqlite import SqliteOnlineStore

    with sqlite3.connect(SqliteOnlineStore._get_db_path(batched.config)) as conn:
        for view in ("user_activity", "user_interests"):
            spread = conn.execute(f'SELECT entity_key, count(DISTINCT event_ts), count(*) FROM "propensity_{view}" GROUP BY entity_key').fetchall()
            written = [s for s in spread if s[2] == len(names[view])]
            assert written and all(distinct == 1 for _, distinct, _ in spread), f"{view}: rows of one user with different stamps"


def test_the_batched_log_append_finds_duplicates_within_and_across_messages_and_stores_each_event_once(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "log")
    now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)

    def ev(event_id: str) -> StreamEvent:
        return StreamEvent(event_id, now_ms, "u1", "i1", "view")

    accepted, duplicates = log.append([ev("a"), ev("b"), ev("a"), ev("c")])
    assert [e.event_id for e in accepted] == ["a", "b", "c"] and [e.event_id for e in duplicates] == ["a"]
    accepted, duplicates = log.append([ev("c"), ev("d"), ev("d")] + [ev(f"x{i}") for i in range(1200)])  # > one lookup chunk
    assert [e.event_id for e in accepted][:1] == ["d"] and len(accepted) == 1201
    assert [e.event_id for e in duplicates] == ["c", "d"]
    accepted, duplicates = log.append([ev(f"x{i}") for i in range(1200)])
    assert accepted == [] and len(duplicates) == 1200
    assert log.count() == 1204 and log.unpushed() == 1204
    log.mark_pushed([f"x{i}" for i in range(1200)])
    assert log.unpushed() == 4
