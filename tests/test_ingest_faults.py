"""IngestEvents when things break, against a real server: the event log cannot store, and the server is SIGKILLed mid-stream.

An acknowledged event is in the log exactly once and, after the next build (`propensity prepare`, which reads
the log), exactly once in the prepared data; an event the server did not acknowledge is either wholly in the
log (its message committed) or absent; a client retry with the same event_ids is safe.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pandas as pd
import pytest

from propensity.event_log import EventLog, EventLogError, StreamEvent
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from tests.conftest import BIN, Pipeline, private_env, running_server, wait_for

PER_MESSAGE = 50
MESSAGES_PER_STREAM = 4


def numbered(prefix: str, first: int, n: int, when: datetime) -> list[pb.Event]:
    """Events prefix-<number>, each with its own user, item, type and price, so a half-written row would show."""
    kinds = ("view", "view", "add_to_cart", "purchase")
    return [
        pb.Event(event_id=f"{prefix}-{k:06d}", event_time=(when + timedelta(milliseconds=k)).isoformat(), user_id=f"crash-u{k % 37:03d}",
                 item_id=f"i{k % 150:05d}", event_type=kinds[k % 4], session_id=f"s{k // 20}", price=float(k % 90) + 0.5, quantity=float(1 + k % 3))
        for k in range(first, first + n)
    ]


def expected_row(event: pb.Event) -> tuple:
    moment = datetime.fromisoformat(event.event_time)
    return (event.event_id, int(moment.timestamp() * 1000), event.user_id, event.item_id, event.event_type, event.session_id, event.price, event.quantity)


def logged_rows(path: Path) -> dict[str, tuple]:
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = conn.execute("SELECT event_id, event_time_ms, user_id, item_id, event_type, session_id, price, quantity FROM events").fetchall()
    return {row[0]: row for row in rows}


@pytest.fixture(scope="module")
def ingest_env(pipeline: Pipeline) -> tuple[dict[str, str], Path]:
    return private_env(pipeline, "ingest-faults", copy_repo=True, store_retry_seconds=0.5)


@pytest.mark.slow
def test_a_log_that_cannot_store_answers_unavailable_acknowledges_nothing_and_a_retry_is_safe(pipeline: Pipeline, ingest_env) -> None:
    env, work = ingest_env
    path = work / "stream" / "events.db"
    now = datetime.now(timezone.utc) - timedelta(minutes=1)
    stored, refused = numbered("lock", 0, 5, now), numbered("lock", 5, 5, now)
    with running_server(env, pipeline.root / "ingest-faults-lock.log") as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommendationServiceStub(channel)
        blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # used from the request thread
        locked = threading.Event()

        def stream() -> Iterator[pb.IngestEventsRequest]:
            yield pb.IngestEventsRequest(events=stored)
            # The first message is committed and pushed before the log becomes unwritable (another process holds its write lock).
            assert wait_for(lambda: set(logged_rows(path)) >= {e.event_id for e in stored} and EventLog(path.parent).unpushed() == 0, timeout=10)
            blocker.execute("BEGIN EXCLUSIVE")
            locked.set()
            yield pb.IngestEventsRequest(events=refused)

        started = time.monotonic()
        try:
            with pytest.raises(grpc.RpcError) as failed:
                stub.IngestEvents(stream(), timeout=20)
            waited = time.monotonic() - started
        finally:
            if locked.is_set():
                blocker.execute("ROLLBACK")
            blocker.close()
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
        assert "event log" in failed.value.details() and "same event_ids" in failed.value.details()
        assert waited < 10
        logged = logged_rows(path)
        assert not {e.event_id for e in refused} & set(logged)  # nothing of the failing message is in the log
        # The client retries the whole stream: what was stored is a duplicate, the rest is accepted, once.
        again = stub.IngestEvents(iter([pb.IngestEventsRequest(events=stored), pb.IngestEventsRequest(events=refused)]), timeout=20)
        assert (again.accepted, again.duplicates, again.rejected, again.pushes_pending) == (5, 5, 0, 0)
        once_more = stub.IngestEvents(iter([pb.IngestEventsRequest(events=stored + refused)]), timeout=20)
        assert (once_more.accepted, once_more.duplicates) == (0, 10)
        logged = logged_rows(path)
        assert all(logged[e.event_id] == expected_row(e) for e in stored + refused)
    print(f"\n[event log locked] UNAVAILABLE after {waited:.2f}s (busy timeout)")


@pytest.mark.slow
def test_sigkill_during_a_long_stream_keeps_every_acknowledged_event_once_and_nothing_half_written(pipeline: Pipeline, ingest_env, tmp_path: Path) -> None:
    env, work = ingest_env
    path = work / "stream" / "events.db"
    start = datetime.now(timezone.utc) - timedelta(minutes=10)
    sent: dict[str, pb.Event] = {}
    messages: list[list[str]] = []  # event ids per message, in sending order
    acknowledged: list[str] = []
    in_flight = threading.Event()
    client_errors: list[grpc.StatusCode] = []

    with running_server(env, pipeline.root / "ingest-faults-crash.log") as server:
        def client() -> None:
            number = 0
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.RecommendationServiceStub(channel)
                streams = 0
                while True:
                    batch: list[str] = []

                    def stream() -> Iterator[pb.IngestEventsRequest]:
                        nonlocal number
                        for m in range(MESSAGES_PER_STREAM):
                            events = numbered("crash", number, PER_MESSAGE, start)
                            number += PER_MESSAGE
                            sent.update((e.event_id, e) for e in events)
                            messages.append([e.event_id for e in events])
                            batch.extend(e.event_id for e in events)
                            yield pb.IngestEventsRequest(events=events)
                            if streams >= 3 and m == 1:
                                in_flight.set()  # half of this stream is out: the moment to kill
                            time.sleep(0.02)

                    try:
                        response = stub.IngestEvents(stream(), timeout=30)
                    except grpc.RpcError as error:
                        client_errors.append(error.code())
                        return
                    assert response.accepted == len(batch)
                    acknowledged.extend(batch)
                    streams += 1

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        assert in_flight.wait(timeout=60), f"the client never got 3 streams acknowledged: {client_errors}"
        time.sleep(0.01)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=10)
        thread.join(timeout=30)
    assert client_errors == [grpc.StatusCode.UNAVAILABLE], client_errors  # the stream in flight failed: not acknowledged

    logged = logged_rows(path)  # opened after the crash: SQLite recovers the WAL
    assert len(acknowledged) >= 3 * MESSAGES_PER_STREAM * PER_MESSAGE
    assert set(acknowledged) <= set(logged)
    assert {i for i in logged if i.startswith("crash-")} <= set(sent)
    for event_id, row in logged.items():
        if event_id in sent:
            assert row == expected_row(sent[event_id])  # complete and exact, never half-written
    for ids in messages:  # a message is one transaction: wholly in the log or not at all
        present = sum(i in logged for i in ids)
        assert present in (0, len(ids)), (ids[0], present)
    unacknowledged_logged = len([i for i in logged if i in sent and i not in set(acknowledged)])

    # The restarted server takes over the pushes the killed one had claimed (after the lease), and serves.
    with running_server(env, pipeline.root / "ingest-faults-restart.log"):
        log = EventLog(work / "stream")
        assert wait_for(lambda: log.unpushed() == 0, timeout=30), log.unpushed()
    # The next build reads the log: each acknowledged event exactly once in the prepared data.
    built = subprocess.run([str(BIN / "propensity"), "prepare"], env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    prepared = pd.read_parquet(work / "prepared" / "events.parquet", columns=["event_id", "user_id", "item_id", "event_type"])
    crash = prepared[prepared["event_id"].str.startswith("crash-")]
    counts = crash["event_id"].value_counts()
    assert set(acknowledged) <= set(counts.index)
    assert (counts == 1).all(), counts[counts > 1].head()
    assert set(counts.index) == {i for i in logged if i.startswith("crash-")}
    logged_crash = len([i for i in logged if i.startswith("crash-")])
    print(f"\n[SIGKILL mid-stream] acknowledged {len(acknowledged)}, logged {logged_crash} "
          f"(of which {unacknowledged_logged} of the stream in flight, whole messages), prepared {len(crash)} crash events")


# --- the event log's push state, without a server ----------------------------------------------------


def test_the_log_records_push_state_and_hands_abandoned_pushes_to_one_retry(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    events = [StreamEvent(f"e{i}", 1_000 + i, "u1", "i1", "view") for i in range(4)]
    assert log.append(events) == (events, [])
    assert log.unpushed() == 4
    assert log.claim_unpushed(10, lease_seconds=60) == []  # the appending call holds them
    log.mark_pushed(["e0"])
    log.release(["e1", "e2"])  # their push failed
    assert log.has_claimable(lease_seconds=60)  # released: claimable at once
    claimed = log.claim_unpushed(10, lease_seconds=60)
    assert [e.event_id for e in claimed] == ["e1", "e2"] and claimed[0] == events[1]
    assert log.claim_unpushed(10, lease_seconds=60) == []  # claimed once, by one retry
    assert [e.event_id for e in log.claim_unpushed(10, lease_seconds=0)] == ["e1", "e2", "e3"]  # leases over: taken over
    log.mark_pushed(["e1", "e2", "e3"])
    assert log.unpushed() == 0 and not log.has_claimable(lease_seconds=0)
    assert log.append(events[:2]) == ([], events[:2])  # idempotent


def test_a_log_from_before_push_states_counts_its_events_as_pushed(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "events.db") as old:
        old.execute("CREATE TABLE events (event_id TEXT PRIMARY KEY, event_time_ms INTEGER NOT NULL, user_id TEXT NOT NULL, "
                    "item_id TEXT NOT NULL, event_type TEXT NOT NULL, session_id TEXT, price REAL, quantity REAL NOT NULL, "
                    "ingested_at_ms INTEGER NOT NULL DEFAULT 0)")
        old.execute("INSERT INTO events VALUES ('old-1', 5, 'u', 'i', 'view', NULL, NULL, 1.0, 0)")
    log = EventLog(tmp_path)
    assert (log.count(), log.unpushed()) == (1, 0)
    log.append([StreamEvent("new-1", 6, "u", "i", "view")])
    assert log.unpushed() == 1
    assert list(log.to_frame()["event_id"]) == ["old-1", "new-1"]


def test_a_locked_log_refuses_within_its_busy_timeout_and_stores_nothing(tmp_path: Path) -> None:
    log = EventLog(tmp_path, busy_seconds=0.2)
    blocker = sqlite3.connect(tmp_path / "events.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    started = time.monotonic()
    try:
        with pytest.raises(EventLogError, match="database is locked"):
            log.append([StreamEvent("x", 1, "u", "i", "view")])
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert time.monotonic() - started < 2
    assert log.count() == 0
    assert log.append([StreamEvent("x", 1, "u", "i", "view")])[0]
