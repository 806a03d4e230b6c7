"""The SQLite feature update's cache of the rows it last read and wrote (server/ingest.py, SqliteRows), against real
Feast SQLite stores: what the cache hands to the update is always what a reader of the file would get.

- after updates through one SqliteRows (served from its cache), the rows it hands over equal a fresh reader's;
- another connection's commit (Feast's own online write, an erasure) drops the cache: the next update sees it;
- a value that passed its view's TTL since it was cached reads as missing, as from the file;
- an update rolled back (the server gone before the commit) leaves no cached rows ahead of the file;
- the cache holds at most its bound of users, and the rows written stay the same with a tiny bound.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from propensity.erasure import forget_online
from propensity.event_log import StreamEvent
from propensity.feature_store import open_store
from propensity.raw_data import EVENT_TYPES
from propensity.realtime import ACTIVITY_VIEW, MAINTAINED_VIEWS
from propensity.settings import FeatureSettings
from server.ingest import LocalFeatures, SqliteRows, SqliteSpec, sqlite_spec
from tests.conftest import Pipeline, private_env, users

pytestmark = pytest.mark.slow


def _message(tag: str, known: list[str], items: list[str], per_user: int) -> list[StreamEvent]:
    now_ms = int(time.time() * 1000)
    kinds = ["view", "add_to_cart", "view", "purchase"]
    return [StreamEvent(f"{tag}-{u}-{k}", now_ms - 1000 * k, user, items[(u + k) % len(items)], kinds[(u + k) % 4], f"s-{u}", price=2.5, quantity=1.0)
            for u, user in enumerate(known) for k in range(per_user)]


def _setup(pipeline: Pipeline, name: str, n_users: int = 8) -> tuple[object, SqliteSpec, list[str], list[str]]:
    env, _ = private_env(pipeline, name, copy_repo=True)
    store = open_store(Path(env["PROPENSITY_FEATURE_REPO"]))
    spec = sqlite_spec(store, {view: store.get_feature_view(view) for view in MAINTAINED_VIEWS})
    items = pd.read_parquet(pipeline.work_dir / "prepared" / "events.parquet", columns=["item_id"])["item_id"].drop_duplicates().head(9).tolist()
    return store, spec, users(pipeline, n_users), items


def _apply(rows: SqliteRows, events: list[StreamEvent]) -> set[str]:
    features = FeatureSettings()
    return LocalFeatures(rows, features.recent_items_per_user, features.bought_items_per_user, frozenset(EVENT_TYPES)).apply(events)


def _seen(rows: SqliteRows, known: list[str]) -> dict[str, dict]:
    """What `rows` hands to an update for these users (served from its cache where it can); writes nothing."""
    seen: dict[str, dict] = {}

    def look(user: str, current: dict[str, dict], now: float) -> tuple[float, dict[str, dict]]:
        seen[user] = {view: dict(row) for view, row in current.items()}
        return now, {}

    rows.update(sorted(known), look)
    return seen


def _assert_current(rows: SqliteRows, spec: SqliteSpec, known: list[str]) -> None:
    cached, fresh = _seen(rows, known), _seen(SqliteRows(spec), known)
    assert repr(cached) == repr(fresh)  # the same values of the same types (0 and 0.0 encode differently)
    assert any(value is not None for row in fresh.values() for values in row.values() for value in values.values())


def test_rows_handed_over_from_the_cache_equal_a_fresh_read_of_the_file(pipeline: Pipeline) -> None:
    _, spec, known, items = _setup(pipeline, "cache-fresh")
    rows = SqliteRows(spec)
    for m in range(4):
        _apply(rows, _message(f"c-{m}", known[m % 3 :], items[m:], 2 + m % 2))
        assert set(known[m % 3 :]) <= set(rows._cache)  # served from the cache below, not read again
        _assert_current(rows, spec, known)


def test_another_connections_commit_drops_the_cache(pipeline: Pipeline) -> None:
    store, spec, known, items = _setup(pipeline, "cache-other-writer")
    rows = SqliteRows(spec)
    _apply(rows, _message("w-1", known, items, 3))
    before = _seen(rows, known)[known[0]][ACTIVITY_VIEW]["views_30d"]

    # Feast's own write (what `feast materialize` or a push from another worker does) of a value the cache holds.
    view = store.get_feature_view(ACTIVITY_VIEW)
    row = store.get_online_features(features=[f"{view.name}:{f.name}" for f in view.features], entity_rows=[{"user_id": known[0]}]).to_dict()
    row["views_30d"] = [before + 1000]
    frame = pd.DataFrame({**row, "event_timestamp": [datetime.now(timezone.utc)]})
    store.write_to_online_store(view.name, frame)
    assert _seen(rows, known)[known[0]][ACTIVITY_VIEW]["views_30d"] == before + 1000
    _assert_current(rows, spec, known)

    # The next update builds on the other writer's value, not on the cached one.
    _apply(rows, [StreamEvent("w-2", int(time.time() * 1000), known[0], items[0], "view", None, None, 1.0)])
    assert _seen(SqliteRows(spec), known)[known[0]][ACTIVITY_VIEW]["views_30d"] == before + 1001

    # An erasure (another connection deleting the user's rows): the user's rows are gone for the next update too.
    assert forget_online(store, [known[1]]) > 0
    gone = _seen(rows, known)[known[1]]
    assert all(value is None for row in gone.values() for value in row.values())
    _assert_current(rows, spec, known)


def test_a_cached_value_past_its_views_ttl_reads_as_missing(pipeline: Pipeline) -> None:
    _, spec, known, items = _setup(pipeline, "cache-ttl")
    views = dict(spec.views)
    short = views[ACTIVITY_VIEW] = views[ACTIVITY_VIEW].__copy__()
    short.ttl = timedelta(seconds=2)
    spec = SqliteSpec(spec.path, spec.tables, views, spec.key_version, spec.timeout_seconds)
    rows = SqliteRows(spec)
    _apply(rows, _message("t-1", known, items, 2))
    assert _seen(rows, known)[known[0]][ACTIVITY_VIEW]["views_30d"]  # fresh: counted
    time.sleep(3.5)
    cached, fresh = _seen(rows, known), _seen(SqliteRows(spec), known)
    assert cached == fresh
    assert all(value is None for user in known for value in cached[user][ACTIVITY_VIEW].values())


def test_an_update_rolled_back_leaves_no_cached_rows_ahead_of_the_file(pipeline: Pipeline) -> None:
    _, spec, known, items = _setup(pipeline, "cache-rollback")
    calls = []

    def server_gone_once() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the server process is gone: not committing")

    rows = SqliteRows(spec, before_commit=server_gone_once)
    _apply(rows, _message("r-1", known, items, 2))
    with pytest.raises(RuntimeError):
        _apply(rows, _message("r-2", known, items, 3))
    _assert_current(rows, spec, known)


def test_the_cache_keeps_at_most_its_bound_of_users_and_writes_the_same_rows(pipeline: Pipeline) -> None:
    _, spec, known, items = _setup(pipeline, "cache-bound", n_users=10)
    _, other_spec, _, _ = _setup(pipeline, "cache-unbound", n_users=10)
    messages = [_message(f"b-{m}", known[m * 3 : m * 3 + 4] + known[:1], items[m:], 2) for m in range(3)]
    unbounded = SqliteRows(other_spec)
    for message in messages:
        _apply(unbounded, message)
    rows = SqliteRows(dataclasses.replace(spec, cached_users=3))  # the bound comes from settings through the spec
    for message in messages:
        _apply(rows, message)
        assert len(rows._cache) <= 3
        _assert_current(rows, spec, known)
    assert _seen(rows, known) == _seen(SqliteRows(other_spec), known)
