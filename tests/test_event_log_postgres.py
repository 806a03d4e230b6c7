"""The shared event log on the real PostgreSQL (127.0.0.1:5432): the SQLite log's contract, exactly-once across
concurrent writers and across two real server replicas, durability before the acknowledgement, and
`propensity prepare` reading it."""

from __future__ import annotations

import contextlib
import os
import shutil
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
from propensity.event_log_postgres import PostgresEventLog, open_event_log, postgres_dsn, read_event_log
from propensity.settings import IngestSettings, Settings
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from tests.conftest import BIN, PROJECT_ROOT, Pipeline, free_port, private_env, running_server, wait_for

ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def _pg_up() -> bool:
    import psycopg

    try:
        with psycopg.connect(ADMIN, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="module")
def pg_dsn() -> Iterator[str]:
    """A private database on the local PostgreSQL for this module (started as scripts/services.sh does if down); dropped after."""
    import psycopg
    from psycopg import sql

    if not _pg_up() and shutil.which("pg_ctlcluster"):
        subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "services.sh")], capture_output=True, timeout=120)
    if not _pg_up():
        reason = "no PostgreSQL on 127.0.0.1:5432"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: this suite must run; .ci/run starts it with scripts/services.sh)")
        pytest.skip(reason)
    database = f"propensity_test_{os.getpid()}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{database}"
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))


def rows(dsn: str, sql: str, params: tuple = ()) -> list[tuple]:
    """A query on a connection of its own (not the log's)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def stream_event(event_id: str, minute: int = 0, **extra: object) -> StreamEvent:
    return StreamEvent(event_id, 1_764_000_000_000 + minute * 60_000, f"user-{minute % 3}", f"item-{minute % 5}", "view", **extra)


# --- the log itself -----------------------------------------------------------------------------


def test_the_postgres_log_keeps_the_sqlite_logs_contract(pg_dsn: str, tmp_path: Path) -> None:
    """Same calls on both backends, same answers: accepted/duplicates, push states, claims and leases, the frame."""
    sqlite, postgres = EventLog(tmp_path / "sqlite"), PostgresEventLog(pg_dsn, "contract")
    first = [stream_event("e1", 3), stream_event("e2", 1, session_id="s", price=4.5, quantity=2), stream_event("e1", 3), stream_event("e3", 2)]
    second = [stream_event("e3", 2), stream_event("e4", 0)]
    for log in (sqlite, postgres):
        accepted, duplicates = log.append(first)
        assert [e.event_id for e in accepted] == ["e1", "e2", "e3"] and [e.event_id for e in duplicates] == ["e1"]
        accepted, duplicates = log.append(second)
        assert [e.event_id for e in accepted] == ["e4"] and [e.event_id for e in duplicates] == ["e3"]
        assert log.append([]) == ([], [])
        # appended events are claimed by their appender: nothing to claim until the lease runs out or they are released
        assert (log.count(), log.unpushed(), log.has_claimable(60)) == (4, 4, False)
        assert log.claim_unpushed(10, 60) == []
        log.mark_pushed(["e1", "e2"])
        log.release(["e3"])
        assert log.unpushed() == 2 and log.has_claimable(60)
        assert [e.event_id for e in log.claim_unpushed(10, 60)] == ["e3"]  # e4 is still claimed by its append
        assert [e.event_id for e in log.claim_unpushed(10, 0)] == ["e4", "e3"]  # lease 0: every unpushed one, oldest first
        log.mark_pushed(["e3", "e4", "never-logged"])
        assert (log.unpushed(), log.has_claimable(0)) == (0, False)
    pd.testing.assert_frame_equal(postgres.to_frame(), sqlite.to_frame())
    assert postgres.to_frame()["event_id"].tolist() == ["e4", "e2", "e3", "e1"]
    for log in (sqlite, postgres):  # erasure (docs/privacy.md): every event of the users, nobody else's
        assert (log.forget(["user-0", "nobody"]), log.forget([])) == (2, 0)  # e4 (minute 0) and e1 (minute 3)
    pd.testing.assert_frame_equal(postgres.to_frame(), sqlite.to_frame())
    assert postgres.to_frame()["event_id"].tolist() == ["e2", "e3"]
    postgres.close()


def test_concurrent_writers_store_each_event_exactly_once(pg_dsn: str) -> None:
    """Four processes' worth of logs (own connections) append overlapping messages at the same moment: one winner per id."""
    ids = [f"c{i:05d}" for i in range(4000)]
    messages = [[stream_event(i, n) for n, i in enumerate(ids[start:start + 1000])] for start in range(0, 4000, 500)]  # each id in 2 messages
    logs = [PostgresEventLog(pg_dsn, "concurrent") for _ in range(4)]
    logs[0].count()  # create the table before the race: the race is about the rows
    results: list[tuple[int, int]] = []
    barrier = threading.Barrier(len(logs))

    def writer(log: PostgresEventLog, backwards: bool) -> None:
        # Every writer sends every message at the same moment; half of them with the events in the opposite order:
        # writers taking the same keys in opposite orders deadlock unless the log orders its inserts (an unordered
        # INSERT deadlocked in 31 of 40 such rounds here).
        for message in messages:
            barrier.wait(timeout=30)
            accepted, duplicates = log.append(message[::-1] if backwards else message)
            results.append((len(accepted), len(duplicates)))

    threads = [threading.Thread(target=writer, args=(log, n % 2 == 1)) for n, log in enumerate(logs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sum(a for a, _ in results) == len(ids)
    assert sum(a + d for a, d in results) == len(logs) * sum(map(len, messages))
    assert rows(pg_dsn, "SELECT count(*), count(DISTINCT event_id) FROM concurrent") == [(len(ids), len(ids))]
    for log in logs:
        log.close()


def test_appends_commit_synchronously_even_when_the_database_default_is_asynchronous(pg_dsn: str) -> None:
    database = pg_dsn.rsplit("/", 1)[1]
    rows(pg_dsn, f"ALTER DATABASE {database} SET synchronous_commit = off")
    try:
        assert rows(pg_dsn, "SHOW synchronous_commit") == [("off",)]  # the control: a plain session would not wait for the WAL flush
        log = PostgresEventLog(pg_dsn, "durable")
        with log._transaction(durable=True) as conn:  # the transaction append() runs in
            assert conn.execute("SHOW synchronous_commit").fetchall() == [("on",)]
        with log._transaction(durable=False) as conn:  # push marks: relaxed, as SQLite's
            assert conn.execute("SHOW synchronous_commit").fetchall() == [("off",)]
        log.append([stream_event("d1")])
        assert rows(pg_dsn, "SELECT event_id FROM durable") == [("d1",)]
        log.close()
    finally:
        rows(pg_dsn, f"ALTER DATABASE {database} RESET synchronous_commit")


def test_an_unreachable_postgres_fails_fast_without_leaking_the_password() -> None:
    port = free_port()
    log = PostgresEventLog(f"postgresql+psycopg://writer:s3cret-pw@127.0.0.1:{port}/events", "t")  # connects on first use only
    with pytest.raises(EventLogError, match=rf"event log postgresql://127.0.0.1:{port}/events table t") as caught:
        log.append([stream_event("x")])
    assert "s3cret-pw" not in str(caught.value)
    started = time.monotonic()
    with pytest.raises(EventLogError, match="not retried yet"):
        log.count()
    assert time.monotonic() - started < 0.05  # right after a failed attempt: no second connect on the caller's thread
    with pytest.raises(ValueError, match="ingest.postgres_table"):
        PostgresEventLog("postgresql://x/y", "events; DROP TABLE users")


def test_settings_choose_the_backend_and_default_to_the_profiles_database(pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(work_dir=tmp_path)
    assert read_event_log(settings) is None  # nothing logged yet (no SQLite file), and reading made none
    assert not settings.event_log_dir.exists() and isinstance(open_event_log(settings), EventLog)
    monkeypatch.setenv("PROPENSITY_PG_URL", "postgresql+psycopg://svc:pw@db.internal:5432")
    monkeypatch.setenv("PROPENSITY_PG_DATABASE", "shop")
    shared = settings.model_copy(update={"ingest": IngestSettings(event_log="postgres")})
    assert postgres_dsn(shared) == "postgresql+psycopg://svc:pw@db.internal:5432/shop"  # the store profiles' server and database
    explicit = settings.model_copy(update={"ingest": IngestSettings(event_log="postgres", postgres_dsn=pg_dsn, postgres_table="chosen")})
    log = open_event_log(explicit)
    assert isinstance(log, PostgresEventLog) and log.location.endswith(f"/{pg_dsn.rsplit('/', 1)[1]} table chosen")
    log.append([stream_event("s1")])
    assert read_event_log(explicit)["event_id"].tolist() == ["s1"]
    masked = Settings(ingest=IngestSettings(postgres_dsn="postgresql://svc:hunter2@db/x")).describe()
    assert "hunter2" not in masked
    monkeypatch.setenv("PROPENSITY_INGEST__EVENT_LOG", "mysql")
    with pytest.raises(ValueError, match="event_log"):
        Settings()


# --- two real server replicas on one log --------------------------------------------------------


def ingest(target: str, messages: list[list[pb.Event]]) -> pb.IngestEventsResponse:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.RecommendationServiceStub(channel).IngestEvents(iter([pb.IngestEventsRequest(events=m) for m in messages]), timeout=60)


def event(event_id: str, user: str, item: str, when: datetime) -> pb.Event:
    return pb.Event(event_id=event_id, event_time=when.isoformat(), user_id=user, item_id=item, event_type="view")


@pytest.mark.slow
def test_two_replicas_store_the_same_events_once_durably_and_prepare_reads_them(pipeline: Pipeline, pg_dsn: str) -> None:
    env, work = private_env(pipeline, "pg-event-log", copy_repo=True)
    env.update({"PROPENSITY_INGEST__EVENT_LOG": "postgres", "PROPENSITY_INGEST__POSTGRES_DSN": pg_dsn,
                "PROPENSITY_INGEST__POSTGRES_TABLE": "replicas"})
    users = pd.read_parquet(work / "prepared" / "events.parquet", columns=["user_id"])["user_id"].unique()[:20].tolist()
    items = pd.read_parquet(work / "prepared" / "items.parquet", columns=["item_id"])["item_id"].tolist()[:10]
    now = datetime.now(timezone.utc)
    ids = [f"rep-{i}" for i in range(300)]
    events = [event(i, users[n % len(users)], items[n % len(items)], now - timedelta(minutes=n)) for n, i in enumerate(ids)]
    messages = [events[start:start + 40] for start in range(0, len(events), 30)]  # overlapping messages: ids repeat inside each stream
    with running_server(env, pipeline.root / "pg-a.log") as a, running_server(env, pipeline.root / "pg-b.log") as b:
        responses: dict[str, pb.IngestEventsResponse] = {}
        barrier = threading.Barrier(2)

        def send(name: str, target: str) -> None:
            barrier.wait()
            responses[name] = ingest(target, messages)

        threads = [threading.Thread(target=send, args=(name, server.target)) for name, server in (("a", a), ("b", b))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        sent = sum(map(len, messages))
        assert sum(r.accepted for r in responses.values()) == len(ids), responses
        assert sum(r.accepted + r.duplicates for r in responses.values()) == 2 * sent
        assert all(r.rejected == 0 for r in responses.values())
        assert rows(pg_dsn, "SELECT count(*), count(DISTINCT event_id) FROM replicas") == [(len(ids), len(ids))]
        # Every accepted event reached the online store, whichever replica took it (pushed marks in the shared log).
        assert wait_for(lambda: rows(pg_dsn, "SELECT count(*) FROM replicas WHERE NOT pushed") == [(0,)], timeout=20)

        # Durable before the ack: a separate connection sees the row the moment the acknowledgement arrives.
        for n, target in enumerate((a.target, b.target)):
            fresh = f"ack-{n}"
            assert ingest(target, [[event(fresh, users[0], items[0], now)]]).accepted == 1
            assert rows(pg_dsn, "SELECT event_id FROM replicas WHERE event_id = %s", (fresh,)) == [(fresh,)]
            assert ingest((b.target, a.target)[n], [[event(fresh, users[0], items[0], now)]]).duplicates == 1  # the other replica

    # The next batch build reads the shared log: `propensity prepare` with the same settings.
    result = subprocess.run([str(BIN / "propensity"), "prepare"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    prepared = pd.read_parquet(work / "prepared" / "events.parquet", columns=["event_id"])["event_id"]
    logged = [*ids, "ack-0", "ack-1"]
    assert prepared[prepared.isin(logged)].value_counts().to_dict() == dict.fromkeys(logged, 1)
    # Nothing went to the per-machine SQLite log (the copied work dir may hold one from earlier tests' ingestion).
    local = work / "stream" / "events.db"
    if local.exists():
        with contextlib.closing(sqlite3.connect(local)) as conn:
            marks = ",".join("?" * len(logged))
            assert conn.execute(f"SELECT count(*) FROM events WHERE event_id IN ({marks})", logged).fetchone() == (0,)
