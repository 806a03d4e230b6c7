"""The online store fails under a real server: Redis hangs and dies (a private redis-server of this test), the SQLite file is destroyed.

Recommend keeps answering within the client's deadline from the cached catalog (fallback STORE_UNAVAILABLE),
health stays SERVING, metrics and logs show it, IngestEvents keeps accepting into the durable log, and when
the store is back full service and every acknowledged event's feature update resume by themselves.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from propensity.event_log import EventLog
from propensity.feature_store import open_store
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from server.online_features import OnlineUserFeatures
from server.store_reads import StoreBreaker, StoreUnavailable
from tests.conftest import PROJECT_ROOT, SHOPPER, Pipeline, RunningServer, free_port, private_env, running_server, users, wait_for
from training.prepare import load_prepared
from training.publish import publish_features

REDIS_SERVER = shutil.which("redis-server")
DEADLINE = 1.0  # the client's deadline for every Recommend in these tests
RETRY_SECONDS = 0.5
USER_SERVICE = "propensity_user_v2"
STORE_DOWN = pb.FALLBACK_REASON_STORE_UNAVAILABLE


class PrivateRedis:
    """A redis-server of this test only, on a free port, with a snapshot file so a restart can bring the data back."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        assert REDIS_SERVER
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.directory), "--dbfilename", "dump.rdb"],
            stdout=(self.directory / "redis.log").open("a"), stderr=subprocess.STDOUT,
        )
        assert wait_for(self.answers, timeout=10), (self.directory / "redis.log").read_text()[-2000:]

    def answers(self) -> bool:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)).ping())
        except redis.RedisError:
            return False

    def snapshot(self) -> None:
        import redis

        redis.Redis(port=self.port).save()  # the data a restart loads (the server itself saves nothing: --save '')

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a stopped process must be able to die
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    if REDIS_SERVER is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("redis-server is not installed (CI=true: this suite must run)")
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path_factory.mktemp("private-redis"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@dataclass
class Serving:
    server: RunningServer
    stub: pb_grpc.RecommendationServiceStub
    env: dict[str, str]
    work: Path
    repo: Path
    metrics_port: int


@pytest.fixture(scope="module")
def redis_serving(pipeline: Pipeline, private_redis: PrivateRedis) -> Iterator[Serving]:
    """The pipeline's features published to the private Redis (redis.yaml profile), and a real server reading them."""
    metrics_port = free_port()
    env, work = private_env(pipeline, "store-faults-redis", copy_repo=True, metrics_port=metrics_port, store_retry_seconds=RETRY_SECONDS)
    repo = Path(env["PROPENSITY_FEATURE_REPO"])
    (repo / "profiles").mkdir()
    profile = shutil.copy(PROJECT_ROOT / "feature_repo" / "profiles" / "redis.yaml", repo / "profiles" / "redis.yaml")
    env.update({"PROPENSITY_FEATURE_STORE_YAML": str(profile), "PROPENSITY_REDIS_ADDRESS": f"127.0.0.1:{private_redis.port}", "PROPENSITY_REDIS_DB": "0"})
    with pytest.MonkeyPatch.context() as patch:
        for key in ("PROPENSITY_REDIS_ADDRESS", "PROPENSITY_REDIS_DB"):
            patch.setenv(key, env[key])
        publish_features(repo, load_prepared(work / "prepared").as_of, progress=lambda _: None, yaml_file=Path(profile))
        with running_server(env, pipeline.root / "store-faults-redis.log") as server, grpc.insecure_channel(server.target) as channel:
            yield Serving(server, pb_grpc.RecommendationServiceStub(channel), env, work, repo, metrics_port)


@dataclass
class Traffic:
    """Recommend calls in a loop from a thread (its own channel), each with DEADLINE; every outcome recorded."""

    target: str
    user_ids: list[str]
    calls: list[tuple[float, str, int, float]] = field(default_factory=list)  # (start, status, fallback reason, seconds)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> "Traffic":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.RecommendationServiceStub(channel)
            n = 0
            while not self._stop.is_set():
                user = self.user_ids[n % len(self.user_ids)]
                n += 1
                start = time.monotonic()
                try:
                    response = stub.Recommend(pb.RecommendRequest(user_id=user, num_items=10), timeout=DEADLINE)
                    outcome = ("OK" if response.items else "EMPTY", response.fallback_reason)
                except grpc.RpcError as error:
                    outcome = (error.code().name, -1)
                self.calls.append((start, *outcome, time.monotonic() - start))
                time.sleep(0.01)

    def between(self, start: float, end: float) -> list[tuple[float, str, int, float]]:
        return [c for c in self.calls if start <= c[0] < end]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        metric, _, label_text = series.partition("{")
        found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if part)
        if metric == name and {k: v.strip('"') for k, v in found.items()} == labels:
            return float(value)
    return None


def health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status


def personal(stub: pb_grpc.RecommendationServiceStub, user: str = SHOPPER) -> bool:
    return not stub.Recommend(pb.RecommendRequest(user_id=user, num_items=10), timeout=DEADLINE).fallback_used


def p99(seconds: list[float]) -> float:
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def report(name: str, **figures: object) -> None:
    """Measured figures for docs/reliability/stores.md, printed with -s."""
    print(f"\n[{name}] " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))


@pytest.mark.slow
def test_redis_that_hangs_costs_requests_at_most_its_timeout_and_service_resumes_on_its_own(redis_serving: Serving, private_redis: PrivateRedis, pipeline: Pipeline) -> None:
    """SIGSTOP: Redis accepts connections and never answers, the case that needs socket timeouts."""
    stub, target = redis_serving.stub, redis_serving.server.target
    assert personal(stub)
    shoppers = users(pipeline, 10)
    with Traffic(target, shoppers) as traffic:
        time.sleep(1.0)
        stopped = time.monotonic()
        private_redis.signal(signal.SIGSTOP)
        try:
            time.sleep(3.0)
            assert health(target) == health_pb2.HealthCheckResponse.SERVING
        finally:
            private_redis.signal(signal.SIGCONT)
        resumed = time.monotonic()
        assert wait_for(lambda: any(c[0] > resumed and c[1] == "OK" and c[2] == 0 for c in traffic.calls), timeout=10)
        time.sleep(1.5)
    # A call that started just before SIGSTOP may reach Redis after it (a loaded machine widens that gap): such calls
    # belong to neither window, like those in the 0.3 s after the stop.
    before, during = traffic.between(0, stopped - 0.5), traffic.between(stopped + 0.3, resumed)
    first_personal = min(c[0] for c in traffic.calls if c[0] > resumed and c[2] == 0)
    after = traffic.between(first_personal, float("inf"))
    assert before and during and after
    assert all(c[1] == "OK" for c in traffic.calls), {c[1] for c in traffic.calls}  # no call failed, none missed its deadline
    assert all(c[2] == STORE_DOWN for c in during), {c[2] for c in during}
    assert not any(c[2] == STORE_DOWN for c in before), [c for c in before if c[2] == STORE_DOWN]
    assert not any(c[2] == STORE_DOWN for c in after), [c for c in after if c[2] == STORE_DOWN]
    latencies = [c[3] for c in during]
    assert max(latencies) < DEADLINE
    report("redis SIGSTOP", degraded_calls=len(during), degraded_p50=sorted(latencies)[len(latencies) // 2], degraded_max=max(latencies),
           healthy_p99=p99([c[3] for c in before + after]), recovery_seconds=first_personal - resumed)


@pytest.mark.slow
def test_redis_killed_degrades_answers_keeps_ingesting_and_catches_up_when_it_returns(redis_serving: Serving, private_redis: PrivateRedis, pipeline: Pipeline) -> None:
    stub, target = redis_serving.stub, redis_serving.server.target
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PROPENSITY_REDIS_ADDRESS", redis_serving.env["PROPENSITY_REDIS_ADDRESS"])
        patch.setenv("PROPENSITY_REDIS_DB", "0")
        store = open_store(redis_serving.repo, Path(redis_serving.env["PROPENSITY_FEATURE_STORE_YAML"]))
        reader = OnlineUserFeatures(store, USER_SERVICE)
    regular, newcomer = users(pipeline, 40)[33], "outage-newcomer"
    before = reader.fetch([regular])[0]
    assert before["views_7d"] is not None and personal(stub)
    errors_before = sample(scrape(redis_serving.metrics_port), "propensity_store_errors_total", operation="read") or 0.0
    private_redis.snapshot()
    shoppers = users(pipeline, 10)
    now = datetime.now(timezone.utc)
    outage_events = [
        pb.Event(event_id=f"outage-{i}", event_time=now.isoformat(), user_id=user, item_id=f"i{i:05d}", event_type="view")
        for i, user in enumerate([regular] * 3 + [newcomer] * 2)
    ]
    with Traffic(target, shoppers) as traffic:
        time.sleep(1.0)
        killed = time.monotonic()
        private_redis.kill()
        try:
            time.sleep(1.5)
            # IngestEvents: stored durably and acknowledged; the feature updates wait for the store.
            response = stub.IngestEvents(iter([pb.IngestEventsRequest(events=outage_events)]), timeout=10)
            assert (response.accepted, response.duplicates, response.rejected, response.pushes_pending) == (5, 0, 0, 5)
            log = EventLog(redis_serving.work / "stream")
            assert log.unpushed() == 5
            with pytest.raises(grpc.RpcError) as scored:
                stub.ScoreItems(pb.ScoreItemsRequest(user_id=regular, item_ids=["i00001"]), timeout=DEADLINE)
            assert scored.value.code() == grpc.StatusCode.UNAVAILABLE
            assert health(target) == health_pb2.HealthCheckResponse.SERVING
            down_metrics = scrape(redis_serving.metrics_port)
            time.sleep(1.0)
        finally:
            restarting = time.monotonic()
            private_redis.start()  # same port, the snapshot taken before the kill
        back = time.monotonic()  # Redis answers PING
        assert wait_for(lambda: any(c[0] > back and c[2] == 0 for c in traffic.calls), timeout=10)
        recovered = min(c[0] for c in traffic.calls if c[0] > restarting and c[2] == 0)
        assert wait_for(lambda: log.unpushed() == 0, timeout=10), log.unpushed()
        caught_up = time.monotonic()
    during = traffic.between(killed + 0.3, restarting)
    assert all(c[1] == "OK" for c in traffic.calls), {c[1] for c in traffic.calls}
    assert during and all(c[2] == STORE_DOWN for c in during), {c[2] for c in during}
    assert max(c[3] for c in during) < DEADLINE
    # The degradation in metrics: the fallback reason, failed calls (the breaker probes ~every RETRY_SECONDS, not per call), up=0.
    assert (sample(down_metrics, "propensity_fallbacks_total", reason="STORE_UNAVAILABLE") or 0) >= len(during) // 2
    failed_reads = (sample(down_metrics, "propensity_store_errors_total", operation="read") or 0) - errors_before
    assert 1 <= failed_reads < len(during), (failed_reads, len(during))
    assert sample(down_metrics, "propensity_online_store_up", operation="read") == 0
    assert sample(down_metrics, "propensity_online_store_up", operation="push") == 0
    up_metrics = scrape(redis_serving.metrics_port)
    assert sample(up_metrics, "propensity_online_store_up", operation="read") == 1
    # ... and in the log.
    text = redis_serving.server.log.read_text()
    assert "online store read failed" in text and "online store read answers again" in text
    # Every acknowledged event reached the online features, exactly once.
    after = reader.fetch([regular, newcomer])
    assert after[0]["views_7d"] == before["views_7d"] + 3
    assert after[1]["views_7d"] == 2 and set(after[1]["recent_item_ids"]) == {"i00003", "i00004"}
    assert personal(stub, regular)
    lat = [c[3] for c in during]
    report("redis SIGKILL", degraded_calls=len(during), degraded_p50=sorted(lat)[len(lat) // 2], degraded_max=max(lat),
           redis_start_seconds=back - restarting, first_personal_after_redis_up=recovered - back,
           pushes_caught_up_after_redis_up=caught_up - back, failed_reads=failed_reads)


@pytest.fixture(scope="module")
def sqlite_serving(pipeline: Pipeline) -> Iterator[Serving]:
    metrics_port = free_port()
    env, work = private_env(pipeline, "store-faults-sqlite", copy_repo=True, metrics_port=metrics_port, store_retry_seconds=RETRY_SECONDS)
    with running_server(env, pipeline.root / "store-faults-sqlite.log") as server, grpc.insecure_channel(server.target) as channel:
        yield Serving(server, pb_grpc.RecommendationServiceStub(channel), env, work, Path(env["PROPENSITY_FEATURE_REPO"]), metrics_port)


@pytest.mark.slow
def test_sqlite_online_store_destroyed_and_restored_in_place(sqlite_serving: Serving, pipeline: Pipeline) -> None:
    """The SQLite file's contents vanish under the running server (truncated), then come back."""
    stub, target = sqlite_serving.stub, sqlite_serving.server.target
    path = sqlite_serving.repo / "data" / "online_store.db"
    saved = path.read_bytes()
    assert personal(stub)
    with Traffic(target, users(pipeline, 10)) as traffic:
        time.sleep(1.0)
        broken = time.monotonic()
        os.truncate(path, 0)  # the same inode: the server's open connection sees it
        try:
            time.sleep(2.0)
            assert health(target) == health_pb2.HealthCheckResponse.SERVING
        finally:
            with path.open("r+b") as restored:
                restored.write(saved)
        back = time.monotonic()
        assert wait_for(lambda: any(c[0] > back and c[2] == 0 for c in traffic.calls), timeout=10)
        recovered = min(c[0] for c in traffic.calls if c[0] > back and c[2] == 0)
    during = traffic.between(broken + 0.3, back)
    assert all(c[1] == "OK" for c in traffic.calls)
    assert during and all(c[2] == STORE_DOWN for c in during), {c[2] for c in during}
    assert max(c[3] for c in during) < DEADLINE
    assert personal(stub)
    lat = [c[3] for c in during]
    report("sqlite truncated", degraded_calls=len(during), degraded_p50=sorted(lat)[len(lat) // 2], degraded_max=max(lat), recovery_seconds=recovered - back)


class _Recorder:
    """What a breaker reports to metrics, kept in lists."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.states: list[tuple[str, bool]] = []

    def count_store_error(self, operation: str) -> None:
        self.errors.append(operation)

    def set_store_up(self, operation: str, up: bool) -> None:
        self.states.append((operation, up))


def test_the_breaker_fails_fast_after_a_failure_then_lets_one_probe_through_and_closes_on_success() -> None:
    recorder = _Recorder()
    breaker = StoreBreaker("read", retry_seconds=0.2, observer=recorder)
    breaker.succeeded()  # closed: nothing to report
    assert breaker.allows() and recorder.states == []
    breaker.failed(ConnectionError("refused"))
    assert not breaker.allows()
    assert isinstance(breaker.unavailable(), StoreUnavailable) and "unavailable" in str(breaker.unavailable())
    time.sleep(0.25)
    assert breaker.allows()  # due for a probe
    breaker.failed(TimeoutError("timed out"))  # the probe fails: open again
    assert not breaker.allows()
    assert recorder.errors == ["read", "read"] and recorder.states == [("read", False)]
    time.sleep(0.25)
    breaker.succeeded()
    assert breaker.allows() and breaker.down_since is None and breaker.failures == 0
    assert recorder.states == [("read", False), ("read", True)]
