"""The online-store half of ingestion in its own process, and messages merged while they wait for the store
(server/ingest.py), against real SQLite and Feast stores:

- the feature update's process dies: the next update starts a new one; the store fails inside it: the error comes
  back, the message's events stay unpushed in the log and the retry pushes them; every event counted exactly once;
- the decoded-value memo (value bytes written are not parsed again when read back) leaves the same rows as a fresh
  reader that parses everything;
- the store's lane runs the mergeable jobs waiting together as one call, within its limit, and answers each caller.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from propensity.event_log import EventLog, StreamEvent
from propensity.feature_store import open_store
from propensity.raw_data import EVENT_TYPES
from propensity.realtime import MAINTAINED_VIEWS
from propensity.settings import FeatureSettings
from server.ingest import EventIngestor, IngestReport, Lane, LocalFeatures, SqliteRows, sqlite_spec
from tests.conftest import Pipeline, private_env, users, wait_for


def _raw(events: list[StreamEvent]) -> list[dict]:
    return [{"event_id": e.event_id, "event_time": str(e.event_time_ms), "user_id": e.user_id, "item_id": e.item_id,
             "event_type": e.event_type, "session_id": e.session_id or "", "price": e.price, "quantity": e.quantity} for e in events]


def _message(tag: str, known: list[str], items: list[str], per_user: int) -> list[StreamEvent]:
    now_ms = int(time.time() * 1000)
    kinds = ["view", "add_to_cart", "view", "purchase"]
    return [StreamEvent(f"{tag}-{u}-{k}", now_ms - 1000 * k, user, items[(u + k) % len(items)], kinds[(u + k) % 4], f"s-{u}", price=3.5, quantity=1.0)
            for u, user in enumerate(known) for k in range(per_user)]


@pytest.mark.slow
def test_a_killed_or_failing_feature_process_loses_no_event_and_pushes_none_twice(pipeline: Pipeline, tmp_path: Path) -> None:
    env, _ = private_env(pipeline, "process-kill", copy_repo=True)
    store = open_store(Path(env["PROPENSITY_FEATURE_REPO"]))
    known = users(pipeline, 6)
    items = pd.read_parquet(pipeline.work_dir / "prepared" / "events.parquet", columns=["item_id"])["item_id"].drop_duplicates().head(5).tolist()
    features = FeatureSettings()
    refs = ["user_activity:views_30d", "user_activity:carts_30d"]
    before = store.get_online_features(features=refs, entity_rows=[{"user_id": u} for u in known]).to_dict()
    event_log = EventLog(tmp_path / "log")
    ingestor = EventIngestor(store, event_log, features.recent_items_per_user, features.bought_items_per_user,
                             frozenset(EVENT_TYPES), timeout_seconds=0.3, retry_seconds=0.2)
    first, second, third = _message("kill-a", known, items, 3), _message("kill-b", known, items, 2), _message("kill-c", known, items, 1)
    try:
        report = IngestReport()
        ingestor.ingest(_raw(first), report, first_index=0)
        assert report.pushes_pending == 0
        (pid,) = ingestor.helper_pids()
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: not _alive(pid), timeout=10)

        # A dead process is replaced before the next update: nothing is lost (a process still dying when the update
        # reached it may fail that update: then the retry from the log pushes it).
        ingestor.ingest(_raw(second), report, first_index=len(first))
        assert wait_for(lambda: ingestor.retry_pending() >= 0 and event_log.unpushed() == 0, timeout=10)
        (new_pid,) = ingestor.helper_pids()
        assert new_pid != pid and _alive(new_pid)

        # The store refuses (another writer holds it past the busy timeout): the process answers with the error, the
        # message's events stay unpushed in the log, and the retry from the log pushes them once the store is free.
        spec = sqlite_spec(store, {view: store.get_feature_view(view) for view in MAINTAINED_VIEWS})
        blocker = sqlite3.connect(spec.path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            ingestor.ingest(_raw(third), report, first_index=len(first) + len(second))
            assert report.accepted == len(first) + len(second) + len(third) and event_log.unpushed() == len(third)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert ingestor.helper_pids() == [new_pid]  # an error answered is not a dead process
        assert wait_for(lambda: ingestor.retry_pending() == len(third), timeout=10)
        assert ingestor.retry_pending() == 0  # nothing left, nothing pushed twice
    finally:
        ingestor.close()
    assert wait_for(lambda: not _alive(new_pid), timeout=10)  # close() ends the process
    after = store.get_online_features(features=refs, entity_rows=[{"user_id": u} for u in known]).to_dict()
    for i, user in enumerate(known):
        sent = [e for e in first + second + third if e.user_id == user]
        for name, kind in (("views_30d", "view"), ("carts_30d", "add_to_cart")):
            assert after[name][i] == (before[name][i] or 0) + sum(e.event_type == kind for e in sent), f"{user} {name}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_values_remembered_from_the_last_write_leave_the_same_rows_as_parsing_them_again(pipeline: Pipeline) -> None:
    known = users(pipeline, 10)
    items = pd.read_parquet(pipeline.work_dir / "prepared" / "events.parquet", columns=["item_id"])["item_id"].drop_duplicates().head(7).tolist()
    features = FeatureSettings()
    messages = [_message(f"memo-{m}", known[m % 3 :], items[m:], 2 + m % 2) for m in range(4)]
    tables = {}
    for name, fresh_reader_per_message in (("remembered", False), ("parsed", True)):
        env, _ = private_env(pipeline, f"memo-{name}", copy_repo=True)
        store = open_store(Path(env["PROPENSITY_FEATURE_REPO"]))
        views = {view: store.get_feature_view(view) for view in MAINTAINED_VIEWS}
        spec = sqlite_spec(store, views)
        rows = SqliteRows(spec)
        for message in messages:
            if fresh_reader_per_message:
                rows = SqliteRows(spec)
            LocalFeatures(rows, features.recent_items_per_user, features.bought_items_per_user, frozenset(EVENT_TYPES)).apply(message)
        with sqlite3.connect(spec.path) as conn:
            tables[name] = {table: conn.execute(f'SELECT entity_key, feature_name, value FROM "{table}" ORDER BY 1, 2').fetchall() for table in spec.tables}
    assert tables["remembered"] == tables["parsed"]
    assert any(len(rows) for rows in tables["parsed"].values())


def test_the_store_lane_merges_waiting_jobs_up_to_its_limit_and_answers_every_caller() -> None:
    calls: list[list[int]] = []
    started, gate = threading.Event(), threading.Event()

    def job(items: list[int]) -> int:
        started.set()
        gate.wait(10)
        calls.append(list(items))
        return len(calls)

    def other(items: list[int]) -> str:
        calls.append(["other", *items])
        return "other"

    async def scenario() -> list[object]:
        lane = Lane("test-lane", merge_limit=10)
        blocker = lane.run(1, job, [0], merge=True)  # occupies the thread: the rest wait together
        while not started.is_set():
            await asyncio.sleep(0.01)
        waiting = [lane.run(4, job, [4, 4, 4, 4], merge=True), lane.run(3, job, [3, 3, 3], merge=True),
                   lane.run(5, job, [5] * 5, merge=True), lane.run(2, other, [2, 2], merge=True), lane.run(6, job, [6] * 6)]
        gate.set()
        results = await asyncio.gather(blocker, *waiting)
        await asyncio.get_running_loop().run_in_executor(None, lane.shutdown)
        return results

    results = asyncio.run(scenario())
    # Smallest first: `other` (2) alone (another function); then 3 + 4 merged (7; + 5 would pass 10); then 5; then 6,
    # which was not mergeable.
    assert calls == [[0], ["other", 2, 2], [3, 3, 3, 4, 4, 4, 4], [5] * 5, [6] * 6]
    assert results == [1, 3, 3, 4, "other", 5]
