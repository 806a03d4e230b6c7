"""Right to erasure: ForgetUsers on a real server and `propensity forget`, then every byte the product keeps is searched."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from propensity.erasure import scrub_parquet
from propensity.event_log import EventLog, StreamEvent
from propensity.settings import Settings
from propensity.tombstones import Tombstones
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from tests.conftest import BIN, SHOPPER, Pipeline, private_env, running_server, users

READ_TOKEN, ADMIN_TOKEN = "forget-read-token-3b9d", "forget-admin-token-8e21"
NEVER_SEEN = "never-seen-shopper-0001"


def _callers() -> str:
    digest = lambda token: hashlib.sha256(token.encode()).hexdigest()  # noqa: E731
    return json.dumps([
        {"name": "reader", "roles": ["read"], "token_sha256": digest(READ_TOKEN)},
        {"name": "ops", "roles": ["read", "ingest", "admin"], "token_sha256": digest(ADMIN_TOKEN)},
    ])


def _bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


# -- the search: every file's bytes, and the contents of every Parquet and SQLite file -------------------------------


def _parquet_names(path: Path, needle: str) -> bool:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError):
        return False
    for column in table.columns:
        values = column
        while pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
            values = pc.list_flatten(values)
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            if pc.any(pc.match_substring(values, needle)).as_py():
                return True
    return False


def _sqlite_names(path: Path, needle: str) -> bool:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    if (isinstance(value, str) and needle in value) or (isinstance(value, bytes) and needle.encode() in value):
                        return True
    except sqlite3.DatabaseError:
        return False
    finally:
        conn.close()
    return False


def holders(roots: list[Path], needle: str) -> list[str]:
    """Every file under roots whose bytes, Parquet values or SQLite rows contain needle."""
    found = []
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            data = path.read_bytes()
            if needle.encode() in data:
                found.append(f"{path} (bytes)")
            elif path.suffix == ".parquet" and _parquet_names(path, needle):
                found.append(f"{path} (Parquet values)")
            elif data[:16] == b"SQLite format 3\x00" and _sqlite_names(path, needle):
                found.append(f"{path} (SQLite rows)")
    return found


def _events(user: str, item: str, n: int, start_ms: int) -> list[pb.Event]:
    return [
        pb.Event(event_id=f"forget-{user}-{i}", event_time=str(start_ms + i), user_id=user, item_id=item, event_type="view")
        for i in range(n)
    ]


# -- ForgetUsers against a real server ---------------------------------------------------------------------------


@pytest.mark.slow
def test_forget_users_rpc_erases_the_shopper_everywhere(pipeline: Pipeline) -> None:
    name = "forget-rpc"
    work = pipeline.root / name
    served_dir = work / "served"
    outputs = pipeline.root / f"{name}-outputs"  # a batch output outside the work directory: found through its record
    env, work = private_env(pipeline, name, copy_repo=True, served_log_dir=str(served_dir), served_log_sample_rate=1.0)
    repo = Path(env["PROPENSITY_FEATURE_REPO"])
    env.update({"PROPENSITY_SECURITY__AUTH": "on", "PROPENSITY_SECURITY__CALLERS": _callers()})
    scores = outputs / "scores.parquet"
    batch = subprocess.run([str(BIN / "propensity"), "score-batch", "--out", str(scores)], env=env, capture_output=True, text=True, timeout=300)
    assert batch.returncode == 0, batch.stderr[-3000:]
    roots = [work, repo, outputs]

    with running_server(env, work / "server.log") as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommendationServiceStub(channel)
        ingested = stub.IngestEvents(
            iter([pb.IngestEventsRequest(events=_events(SHOPPER, pipeline.shopper_item, 3, int(time.time() * 1000) - 60_000))]),
            metadata=_bearer(ADMIN_TOKEN), timeout=20,
        )
        assert ingested.accepted == 3
        before = stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, num_items=5), metadata=_bearer(READ_TOKEN), timeout=10)
        assert not before.fallback_used
        # The control: before forgetting, the same search finds the shopper where the product keeps them.
        deadline = time.monotonic() + 20
        while not list(served_dir.glob("served-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.2)
        found = "\n".join(holders(roots, SHOPPER))
        for place in ("online_store.db", "events.parquet", "user_activity.parquet", "events.db", "served-", "scores.parquet"):
            assert place in found, f"the control search did not find {SHOPPER} in {place}:\n{found}"

        with pytest.raises(grpc.RpcError) as denied:
            stub.ForgetUsers(pb.ForgetUsersRequest(user_ids=[SHOPPER]), metadata=_bearer(READ_TOKEN), timeout=60)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as empty:
            stub.ForgetUsers(pb.ForgetUsersRequest(user_ids=[]), metadata=_bearer(ADMIN_TOKEN), timeout=60)
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "user_ids" in empty.value.details()

        report = stub.ForgetUsers(pb.ForgetUsersRequest(user_ids=[SHOPPER]), metadata=_bearer(ADMIN_TOKEN), timeout=120)
        assert report.users == 1 and report.event_log_events == 3 and report.online_rows > 0
        assert report.files_rewritten >= 4 and report.file_rows > 0

        after = stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, num_items=5), metadata=_bearer(READ_TOKEN), timeout=10)
        unknown = stub.Recommend(pb.RecommendRequest(user_id=NEVER_SEEN, num_items=5), metadata=_bearer(READ_TOKEN), timeout=10)
        assert after.fallback_reason == pb.FALLBACK_REASON_UNKNOWN_USER
        assert after.purchase_propensity == unknown.purchase_propensity
        assert [i.item_id for i in after.items] == [i.item_id for i in unknown.items]
        scored = stub.ScoreUsers(pb.ScoreUsersRequest(user_ids=[SHOPPER]), metadata=_bearer(READ_TOKEN), timeout=10)
        assert scored.scores[0].unknown_user

    # After the server stopped (its shutdown flushes the served-feature log): nothing anywhere names the shopper,
    # the server's own log included; the raw input, the shop's, still does.
    assert holders(roots, SHOPPER) == []
    assert holders([pipeline.data_dir], SHOPPER)
    tombstones = (work / "privacy" / "tombstones.jsonl").read_text()
    assert len(tombstones.splitlines()) == 1 and SHOPPER not in tombstones


# -- propensity forget --from-file, then prepare honours the tombstones ----------------------------------------------


@pytest.mark.slow
def test_forget_command_from_file_then_prepare_leaves_them_out(pipeline: Pipeline) -> None:
    env, work = private_env(pipeline, "forget-cli", copy_repo=True)
    repo = Path(env["PROPENSITY_FEATURE_REPO"])
    gone = users(pipeline, 4)[2:4]
    ids_file = pipeline.root / "forget-cli-ids.txt"
    ids_file.write_text(f"\n{gone[0]}\n  {gone[1]}  \n\n")

    empty = pipeline.root / "forget-cli-empty.txt"
    empty.write_text("\n\n")
    refused = subprocess.run([str(BIN / "propensity"), "forget", "--from-file", str(empty)], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "at least one user id" in refused.stderr and str(empty) in refused.stderr

    done = subprocess.run([str(BIN / "propensity"), "forget", "--from-file", str(ids_file)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "forgot 2 user(s)" in done.stdout and not any(user in done.stdout + done.stderr for user in gone)
    for user in gone:
        assert holders([work, repo], user) == [], user

    # Later events: one dated after the forgetting is a new shopper's and is kept; one dated before is not.
    forgotten_at = Tombstones(work / "privacy" / "tombstones.jsonl", (work / "privacy" / "key").read_text().encode()).forgotten(gone)[gone[0]]
    log = EventLog(work / "stream")
    later_ms = int(time.time() * 1000) + 1000
    log.append([
        StreamEvent("after-forget", later_ms, gone[0], pipeline.shopper_item, "view"),
        StreamEvent("before-forget", int(forgotten_at.timestamp() * 1000) - 3_600_000, gone[0], pipeline.shopper_item, "view"),
    ])
    log.close()
    prepared = subprocess.run([str(BIN / "propensity"), "prepare"], env=env, capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert "left out 2 forgotten user(s)" in prepared.stdout
    events = pd.read_parquet(work / "prepared" / "events.parquet")
    assert events.loc[events["user_id"] == gone[0], "event_id"].tolist() == ["after-forget"]
    assert (events["user_id"] == gone[1]).sum() == 0
    assert not pd.read_parquet(work / "prepared" / "users.parquet")["user_id"].isin(gone).any()
    assert (events["user_id"] == users(pipeline, 1)[0]).sum() > 0  # everyone else is still there
    raw = pd.read_parquet(pipeline.data_dir / "events.parquet", columns=["user_id"])
    assert raw["user_id"].isin(gone).sum() > 0  # the shop's raw files are not edited


# -- the pieces ----------------------------------------------------------------------------------------------------


def test_tombstones_hold_keyed_hashes_never_ids(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    stones = Tombstones(tmp_path / "t.jsonl", b"k1")
    at = datetime(2026, 1, 2, tzinfo=timezone.utc)
    assert stones.add(["alice", "bob", "alice"], at) == 2
    text = (tmp_path / "t.jsonl").read_text()
    assert "alice" not in text and "bob" not in text
    assert stones.forgotten(["alice", "carol"]) == {"alice": at}
    # Another key sees nothing: without the key a tombstone cannot be matched to a guessed id.
    assert Tombstones(tmp_path / "t.jsonl", b"k2").forgotten(["alice", "bob"]) == {}

    def no_key() -> bytes:
        raise AssertionError("the key was asked for although there are no tombstones")

    # No tombstones (every prepare of a shop that never forgot anyone): the key is never needed, nor made.
    assert Tombstones(tmp_path / "none.jsonl", no_key).forgotten(["alice"]) == {}


def test_scrub_parquet_removes_rows_naming_the_user_in_any_text_column(tmp_path: Path) -> None:
    path = tmp_path / "q.parquet"
    pq.write_table(pa.table({
        "user_id": ["a1", "a10", "b", None],
        "raw": ['{"user_id": "x"}', "{}", '{"user_id": "a1"}', '{"user_id": "a1x"}'],
        "n": [1, 2, 3, 4],
    }), path)
    assert scrub_parquet(path, ["a1"]) == 2
    assert pq.read_table(path).column("n").to_pylist() == [2, 4]  # "a10" and "a1x" are other users
    assert scrub_parquet(path, ["a1"]) == 0


def test_privacy_key_is_masked_in_settings_dumps() -> None:
    settings = Settings(privacy={"key": "do-not-print-this-key"})
    assert "do-not-print-this-key" not in settings.describe()
    assert settings.privacy.key.get_secret_value() == "do-not-print-this-key"


def test_replicas_starting_together_share_one_generated_privacy_key(tmp_path: Path) -> None:
    """Processes that make the work directory's key at once all read the same, complete key (never an empty file)."""
    script = (
        "import sys; from propensity.settings import Settings; from propensity.pseudonyms import privacy_key\n"
        "sys.stdout.write(privacy_key(Settings(work_dir=sys.argv[1])).decode())"
    )
    for round_ in range(3):
        work = tmp_path / f"work-{round_}"
        starters = [subprocess.Popen([str(BIN / "python"), "-c", script, str(work)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for _ in range(6)]
        outputs = [p.communicate(timeout=120) for p in starters]
        assert all(p.returncode == 0 for p in starters), [err[-500:] for _, err in outputs]
        keys = {out for out, _ in outputs}
        assert len(keys) == 1 and len(keys.pop()) == 64, keys
        assert [f.name for f in (work / "privacy").iterdir()] == ["key"]  # no staged copy left behind


# -- the Redis profile ---------------------------------------------------------------------------------------------

TEST_REDIS_DBS = range(7, 16)
REDIS_LOCK = "propensity:test-lock"  # the convention of tests/test_store_profiles.py


@pytest.fixture
def redis_db() -> Iterator[int]:
    """A private Redis database (claimed with the suite's lock key), flushed afterwards."""
    import os
    import secrets

    import redis

    from propensity.store_profiles import apply_defaults

    apply_defaults()
    host, _, port = os.environ["PROPENSITY_REDIS_ADDRESS"].split(",")[0].rpartition(":")
    try:
        redis.Redis(host=host, port=int(port), socket_timeout=2).ping()
    except redis.RedisError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis at {host}:{port} is down: {error}")
        pytest.skip(f"Redis at {host}:{port} is down: {error}")
    token = secrets.token_hex(4)
    for db in TEST_REDIS_DBS:
        client = redis.Redis(host=host, port=int(port), db=db)
        if client.set(REDIS_LOCK, token, nx=True, ex=1800):
            break
    else:
        pytest.fail(f"no free Redis database among {list(TEST_REDIS_DBS)}")
    try:
        for key in client.scan_iter(count=1000):
            if key != REDIS_LOCK.encode():
                client.delete(key)
        yield db
    finally:
        client.flushdb()


@pytest.mark.slow
def test_forget_deletes_the_users_redis_hash_and_nothing_else(pipeline: Pipeline, redis_db: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import redis

    from propensity.erasure import forget_online
    from propensity.feature_store import copy_definitions, open_store
    from training.prepare import load_prepared
    from training.publish import publish_features

    repo = copy_definitions(tmp_path / "feature_repo")
    shutil.copytree(Path(__file__).resolve().parents[1] / "feature_repo" / "profiles", repo / "profiles")
    shutil.copytree(pipeline.feature_repo / "data" / "offline", repo / "data" / "offline")
    monkeypatch.setenv("PROPENSITY_REDIS_DB", str(redis_db))
    redis_yaml = repo / "profiles" / "redis.yaml"
    publish_features(repo, load_prepared(pipeline.work_dir / "prepared").as_of, progress=lambda _: None, yaml_file=redis_yaml)
    store = open_store(repo, redis_yaml)
    client = redis.Redis(host="127.0.0.1", port=6379, db=redis_db)
    other = users(pipeline, 1)[0]

    def holding(needle: str) -> list[bytes]:
        found = []
        for key in client.scan_iter(count=1000):
            values = client.hgetall(key) if client.type(key) == b"hash" else {}
            if needle.encode() in key or any(needle.encode() in k + v for k, v in values.items()):
                found.append(key)
        return found

    def activity(user: str) -> list:
        return store.get_online_features(features=["user_activity:views_30d"], entity_rows=[{"user_id": user}]).to_dict()["views_30d"]

    assert holding(SHOPPER) and activity(SHOPPER) != [None]  # the control: the shopper is there before
    assert forget_online(store, [SHOPPER]) == 1  # one hash holds every user view of an entity
    assert holding(SHOPPER) == []
    assert activity(SHOPPER) == [None]
    assert holding(other) and activity(other) != [None]  # everyone else stays


def test_forget_deletes_the_users_events_from_the_shared_postgresql_log(tmp_path: Path) -> None:
    import os
    import secrets

    import psycopg

    from propensity.erasure import forget_event_log
    from propensity.event_log_postgres import PostgresEventLog, libpq_dsn, postgres_dsn

    from propensity.store_profiles import apply_defaults

    apply_defaults()
    table = f"forget_test_{secrets.token_hex(4)}"
    server = os.environ["PROPENSITY_PG_URL"].rstrip("/")
    # The server's own `postgres` database and a private table: nothing of another test's is touched.
    settings = Settings(work_dir=tmp_path, ingest={"event_log": "postgres", "postgres_table": table, "postgres_dsn": f"{server}/postgres"})
    dsn = libpq_dsn(postgres_dsn(settings))
    try:
        psycopg.connect(dsn, connect_timeout=2).close()
    except psycopg.OperationalError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is down: {error}")
        pytest.skip(f"PostgreSQL is down: {error}")
    assert forget_event_log(settings, ["gone"]) == 0  # no table yet: nothing was ever logged
    log = PostgresEventLog(dsn, table)
    try:
        now = int(time.time() * 1000)
        log.append([StreamEvent(f"e{i}", now + i, user, "i1", "view") for i, user in enumerate(["gone", "stays", "gone", "gone-not"])])
        assert forget_event_log(settings, ["gone"]) == 2
        assert sorted(log.to_frame()["user_id"]) == ["gone-not", "stays"]
    finally:
        log.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
