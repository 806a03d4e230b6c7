"""Erasure against writers that hold data read before it: the served-feature log of every server worker, pipeline
stages (offline tables, the online store, batch outputs) and events ingested later. docs/privacy.md."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from propensity.erasure import LOCK_FILE, WriteFence, forget_users, tombstones
from propensity.settings import Settings
from propensity.tombstones import ForgottenIndex, TombstoneFeed, Tombstones
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from server.served_log import ServedFeatureLogger
from tests.conftest import SHOPPER, Pipeline, private_env, running_server, users
from tests.test_forget import holders

NOW = datetime(2026, 12, 1, 12, tzinfo=timezone.utc)


# -- the tombstone feed and index ----------------------------------------------------------------------------------


def test_feed_reads_only_complete_lines_appended_since_it_began(tmp_path: Path) -> None:
    stones = Tombstones(tmp_path / "t.jsonl", b"k")
    stones.add(["old"], NOW)
    feed = TombstoneFeed(stones)
    assert feed.new_hashes() == {}  # "old" was forgotten before the feed began
    stones.add(["a", "b"], NOW + timedelta(hours=1))
    with stones.path.open("a") as out:
        out.write('{"user": "half-written')  # an append in progress: read once it is complete
    fresh = feed.new_hashes()
    assert set(feed.matching(fresh, ["old", "a", "b", "c"])) == {"a", "b"}
    with stones.path.open("a") as out:
        out.write(' line", "at": "2026-12-01T13:00:00+00:00"}\n')
    assert list(feed.new_hashes()) == ["half-written line"] and feed.new_hashes() == {}
    # Replaced by an older copy (a restore): read again from its start, never silently skipped.
    stones.path.write_text(stones.path.read_text().splitlines(keepends=True)[0])
    assert feed.matching(feed.new_hashes(), ["old", "a"]) == ["old"]
    stones.path.write_text("not json\n")
    with pytest.raises(ValueError, match=r"t\.jsonl .*not a tombstone"):
        feed.new_hashes()


def test_forgotten_index_covers_events_dated_up_to_the_forgetting(tmp_path: Path) -> None:
    def no_key() -> bytes:
        raise AssertionError("the key was asked for although there are no tombstones")

    assert ForgottenIndex(Tombstones(tmp_path / "none.jsonl", no_key)).forgotten_at("a") is None
    stones = Tombstones(tmp_path / "t.jsonl", b"k")
    index = ForgottenIndex(stones)
    at_ms = int(NOW.timestamp() * 1000)
    assert not index.covers("a", at_ms - 1)
    stones.add(["a"], NOW)  # seen without a restart: the file changed
    assert index.covers("a", at_ms - 1) and index.covers("a", at_ms)
    assert not index.covers("a", at_ms + 1)  # later events are a new shopper's
    assert not index.covers("b", at_ms - 1)
    stones.add(["a"], NOW + timedelta(days=1))  # forgotten again: the latest time counts
    assert index.covers("a", at_ms + 1)
    # The per-message form agrees, event by event, and is None while nobody is forgotten.
    covers = index.checker()
    assert covers is not None and [covers(u, t) for u, t in [("a", at_ms + 1), ("a", at_ms + 86_400_001), ("b", 0)]] == [True, False, False]
    assert ForgottenIndex(Tombstones(tmp_path / "none.jsonl", no_key)).checker() is None


# -- the served-feature log, fenced by the erasure lock ----------------------------------------------------------


def _hold_lock_in_another_process(work_dir: Path) -> subprocess.Popen:
    """A process holding the erasure lock exclusively (as an erasure does) until its stdin closes."""
    code = (
        "import fcntl, sys; h = open(sys.argv[1], 'a'); fcntl.flock(h, fcntl.LOCK_EX); "
        "print('held', flush=True); sys.stdin.read()"
    )
    (work_dir / LOCK_FILE).parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", code, str(work_dir / LOCK_FILE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _sample(logger: ServedFeatureLogger, request_id: str, user: str) -> None:
    assert logger.maybe_log(request_id, user, "v1", ("f",), np.ones((2, 1)), ["i1", "i2"], np.array([0.5, 0.4]))


def _logged_users(directory: Path) -> list[str]:
    files = sorted(directory.glob("served-*.parquet"))
    return sorted(set(pa.concat_tables([pq.read_table(f) for f in files]).column("user_id").to_pylist())) if files else []


def test_a_fenced_flush_waits_for_an_erasure_and_drops_who_it_forgot(tmp_path: Path) -> None:
    settings = Settings(work_dir=tmp_path / "var", privacy={"key": "fence-test-key"})
    logger = ServedFeatureLogger(tmp_path / "served", 1.0, flush_rows=10_000, flush_seconds=3600)
    logger.attach_fence(WriteFence.begin(settings))
    _sample(logger, "r1", "gone")
    _sample(logger, "r2", "stays")
    holder = _hold_lock_in_another_process(settings.work_dir)  # an erasure in another process (another worker, the CLI)
    try:
        flusher = threading.Thread(target=logger.flush)
        flusher.start()
        flusher.join(1.0)
        assert flusher.is_alive(), "the flush did not wait for the erasure lock"
        assert _logged_users(tmp_path / "served") == []
        tombstones(settings).add(["gone"], datetime.now(timezone.utc))  # what that erasure records first
    finally:
        holder.stdin.close()
        holder.wait(10)
    flusher.join(10)
    assert _logged_users(tmp_path / "served") == ["stays"]
    assert logger.forgotten_rows == 2
    # A shopper forgotten long ago who comes back is logged again (a new shopper); a recent one is not.
    _sample(logger, "r3", "gone")
    logger._recently_forgotten = {h: t - 3600 for h, t in logger._recently_forgotten.items()}
    logger.close()
    assert _logged_users(tmp_path / "served") == ["gone", "stays"]


def test_unfenced_logger_writes_whatever_it_buffered(tmp_path: Path) -> None:
    """The control for the test above: without the fence, the same sequence writes the forgotten shopper."""
    settings = Settings(work_dir=tmp_path / "var", privacy={"key": "fence-test-key"})
    logger = ServedFeatureLogger(tmp_path / "served", 1.0, flush_rows=10_000, flush_seconds=3600)
    _sample(logger, "r1", "gone")
    tombstones(settings).add(["gone"], datetime.now(timezone.utc))
    logger.close()
    assert _logged_users(tmp_path / "served") == ["gone"]


# -- a real server with two workers ----------------------------------------------------------------------------------


def _pids_naming(directory: Path, user: str) -> set[str]:
    pids = set()
    for path in directory.glob("served-*.parquet"):
        try:
            if user in pq.read_table(path, columns=["user_id"]).column("user_id").to_pylist():
                pids.add(path.name.split("-")[1])
        except (OSError, pa.ArrowInvalid):
            continue  # replaced meanwhile by an erasure's rewrite
    return pids


@pytest.mark.slow
def test_forget_users_reaches_the_served_log_of_every_worker(pipeline: Pipeline) -> None:
    name = "forget-workers"
    served = pipeline.root / name / "served"
    env, work = private_env(pipeline, name, copy_repo=True, served_log_dir=str(served), served_log_sample_rate=1.0, workers=2)
    repo = Path(env["PROPENSITY_FEATURE_REPO"])
    with running_server(env, work / "server.log") as server:
        # One connection per channel (SO_REUSEPORT balances connections): 8 channels reach both workers.
        channels = [grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(8)]
        stubs = [pb_grpc.RecommendationServiceStub(channel) for channel in channels]
        stop = threading.Event()

        def shop(stub: pb_grpc.RecommendationServiceStub) -> None:
            while not stop.is_set():
                try:
                    stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, num_items=5), timeout=10)
                except grpc.RpcError:
                    time.sleep(0.05)

        threads = [threading.Thread(target=shop, args=(stub,), daemon=True) for stub in stubs]
        try:
            for thread in threads:
                thread.start()
            # The control: both workers sample the shopper (each writes files under its own pid).
            deadline = time.monotonic() + 60
            while len(_pids_naming(served, SHOPPER)) < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert len(_pids_naming(served, SHOPPER)) == 2, "the traffic did not reach both workers' served logs"
            # Forgotten while both workers keep answering (and sampling) the shopper until their features are gone.
            report = stubs[0].ForgetUsers(pb.ForgetUsersRequest(user_ids=[SHOPPER]), timeout=180)
            assert report.users == 1 and report.online_rows > 0
            time.sleep(7)  # past every worker's next flush (5 s), traffic still running
        finally:
            stop.set()
            for thread in threads:
                thread.join(15)
            for channel in channels:
                channel.close()
    # After the server stopped (each worker's shutdown flushes what it buffered): nothing names the shopper.
    assert list(served.glob("served-*.parquet")), "the served log wrote nothing"
    assert holders([work, repo], SHOPPER) == []


# -- pipeline stages that read before an erasure and write after it ---------------------------------------------------


@pytest.mark.slow
def test_a_stage_that_read_before_an_erasure_does_not_write_the_shopper_back(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    from training.prepare import load_prepared
    from training.publish import publish_features

    env, work = private_env(pipeline, "forget-stage", copy_repo=True)
    for key in ("PROPENSITY_DATA_DIR", "PROPENSITY_WORK_DIR", "PROPENSITY_FEATURE_REPO", "PROPENSITY_CONFIG"):
        monkeypatch.setenv(key, env[key])
    settings = Settings()
    repo, outputs = settings.feature_repo, pipeline.root / "forget-stage-outputs"
    activity = settings.offline_dir / "user_activity.parquet"
    scores = outputs / "scores.parquet"

    fence = WriteFence.begin(settings)  # the stage starts
    read = pq.read_table(activity)  # ... and reads
    assert SHOPPER in read.column("user_id").to_pylist()
    forget_users(settings, [SHOPPER])  # a real erasure, while the stage computes
    # The stage writes what it computed from its read: a feature table, a batch output, and the online store.
    pq.write_table(read, activity)
    outputs.mkdir()
    pq.write_table(read.select(["user_id", "views_30d"]), scores)
    publish_features(repo, load_prepared(settings.prepared_dir).as_of, progress=lambda _: None, yaml_file=settings.feature_store_yaml)
    found = "\n".join(holders([work, repo, outputs], SHOPPER))
    for place in ("user_activity.parquet", "scores.parquet", "online_store.db"):  # the control: written back
        assert place in found, f"the stage did not write {SHOPPER} back into {place}:\n{found}"

    assert fence.settle_files([activity, scores]) == 2 * read.column("user_id").to_pylist().count(SHOPPER)
    assert fence.settle_online() > 0
    assert holders([work, repo, outputs], SHOPPER) == []
    others = pq.read_table(scores).column("user_id").to_pylist()
    assert users(pipeline, 1)[0] in others  # everyone else is still there
    # A stage that begins after the erasure is not touched by it: the returning shopper's new rows are theirs.
    later = WriteFence.begin(settings)
    pq.write_table(read, activity)
    assert later.settle_files([activity]) == 0 and SHOPPER in pq.read_table(activity).column("user_id").to_pylist()


# -- events that arrive after the forgetting ------------------------------------------------------------------------


@pytest.mark.slow
def test_events_arriving_after_the_forgetting_follow_the_tombstone_rule(pipeline: Pipeline) -> None:
    from propensity.event_log import EventLog
    from propensity.feature_store import open_store

    env, work = private_env(pipeline, "forget-ingest", copy_repo=True)
    repo = Path(env["PROPENSITY_FEATURE_REPO"])
    with running_server(env, work / "server.log") as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommendationServiceStub(channel)
        assert stub.ForgetUsers(pb.ForgetUsersRequest(user_ids=[SHOPPER]), timeout=180).users == 1
        key = (work / "privacy" / "key").read_bytes().strip()
        forgotten_ms = int(Tombstones(work / "privacy" / "tombstones.jsonl", key).forgotten([SHOPPER])[SHOPPER].timestamp() * 1000)
        now_ms = int(time.time() * 1000)
        assert now_ms > forgotten_ms

        def view(event_id: str, at_ms: int) -> pb.Event:
            return pb.Event(event_id=event_id, event_time=str(at_ms), user_id=SHOPPER, item_id=pipeline.shopper_item, event_type="view")

        # Sent after the forgetting: two dated before it (a late upload of the old shopper's history), one after.
        response = stub.IngestEvents(iter([pb.IngestEventsRequest(events=[
            view("late-1", forgotten_ms - 3_600_000), view("late-2", forgotten_ms), view("new-1", now_ms),
        ])]), timeout=30)
        assert (response.accepted, response.rejected) == (1, 2)
        assert [(r.index, r.event_id, r.field) for r in response.rejections] == [(0, "late-1", "event_time"), (1, "late-2", "event_time")]
        assert all("forgotten" in r.reason and SHOPPER not in r.reason for r in response.rejections)
        # The online features are the new shopper's: built from the one accepted event only.
        store = open_store(repo)
        online = store.get_online_features(features=["user_activity:views_30d"], entity_rows=[{"user_id": SHOPPER}]).to_dict()
        assert online["views_30d"] == [1]
        after = stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, num_items=5), timeout=10)
        assert after.fallback_reason != pb.FALLBACK_REASON_UNKNOWN_USER  # a known (new) shopper again
    log = EventLog(work / "stream")
    try:
        frame = log.to_frame()
    finally:
        log.close()
    assert frame.loc[frame["user_id"] == SHOPPER, "event_id"].tolist() == ["new-1"]
