"""A worker of `workers=2` is SIGKILLed under steady traffic: the other keeps serving, the parent replaces it,
and the only calls that fail are those that were in flight on the killed worker's connections."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from server.interceptors import SERVED_BY_HEADER
from tests.conftest import Pipeline, free_port, private_env, running_server, users, wait_for

pytestmark = pytest.mark.slow
# Each client has its own connection (no shared subchannel pool), so SO_REUSEPORT spreads them over the workers.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
# Clients as a production caller would configure them: Recommend is read-only, so a call that fails UNAVAILABLE
# before the server started it (sent on a connection that just died) is retried by the channel. A call the
# killed worker had started (its response headers arrived) is committed and never retried: those may fail.
RETRY_UNAVAILABLE = ("grpc.service_config", json.dumps({"methodConfig": [{
    "name": [{"service": "propensity.v1.RecommendationService"}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.05s", "maxBackoff": "1s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]},
}]}))
# SIGKILL takes effect within a few ms (the process's threads exit); a call started in that gap also met a dying worker.
DYING_SECONDS = 0.005


@dataclass(frozen=True)
class Call:
    client: int
    started: float
    ended: float
    code: str
    served_by: int | None


def children(pid: int) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


def served_by(stub: pb_grpc.RecommendationServiceStub, user: str, timeout: float = 10) -> int:
    _, call = stub.Recommend.with_call(pb.RecommendRequest(user_id=user, num_items=5), timeout=timeout, wait_for_ready=True)
    return int(dict(call.initial_metadata())[SERVED_BY_HEADER])


def test_a_killed_worker_is_replaced_and_only_its_in_flight_calls_fail(pipeline: Pipeline) -> None:
    metrics_port = free_port()
    env, _ = private_env(pipeline, "worker-faults", workers=2, metrics_port=metrics_port)
    log = pipeline.root / "worker-faults.log"
    shoppers = users(pipeline, 40)
    with running_server(env, log) as server:
        workers = children(server.process.pid)
        assert len(workers) == 2, workers
        # Open connections until each worker holds at least two (SO_REUSEPORT hashes each connection to one worker).
        channels: list[grpc.Channel] = []
        home: dict[int, int] = {}  # client -> pid holding its connection before the kill
        while min(sum(pid == w for pid in home.values()) for w in workers) < 2:
            assert len(channels) < 40, f"connections never reached both workers: {home}"
            channel = grpc.insecure_channel(server.target, options=[*OWN_CONNECTION, RETRY_UNAVAILABLE])
            home[len(channels)] = served_by(pb_grpc.RecommendationServiceStub(channel), shoppers[0])
            channels.append(channel)
        victim = workers[0]
        calls: list[Call] = []
        stop = threading.Event()

        def client(number: int) -> None:
            stub = pb_grpc.RecommendationServiceStub(channels[number])
            i = number
            while not stop.is_set():
                i += 1
                started = time.monotonic()
                try:
                    # wait_for_ready: a new call waits for the reconnect instead of failing on a dropped connection.
                    _, call = stub.Recommend.with_call(
                        pb.RecommendRequest(user_id=shoppers[i % len(shoppers)], num_items=5), timeout=10, wait_for_ready=True
                    )
                    calls.append(Call(number, started, time.monotonic(), "OK", int(dict(call.initial_metadata())[SERVED_BY_HEADER])))
                except grpc.RpcError as error:
                    calls.append(Call(number, started, time.monotonic(), error.code().name, None))

        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(len(channels))]
        for thread in threads:
            thread.start()
        try:
            assert wait_for(lambda: all(sum(c.client == n and c.code == "OK" for c in calls) >= 3 for n in home), 60)
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            # The parent forks a replacement; it is up when it answers on a fresh connection.
            replacement = 0

            def replacement_serving() -> bool:
                nonlocal replacement
                now = [pid for pid in children(server.process.pid) if pid not in workers]
                if not now:
                    return False
                with grpc.insecure_channel(server.target, options=OWN_CONNECTION) as probe:
                    if served_by(pb_grpc.RecommendationServiceStub(probe), shoppers[1]) != now[0]:
                        return False
                    health = health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    assert health.status == health_pb2.HealthCheckResponse.SERVING
                replacement = now[0]
                return True

            assert wait_for(replacement_serving, 120), log.read_text()[-3000:]
            respawn_seconds = time.monotonic() - killed_at
            time.sleep(1.0)  # every client makes calls after the replacement is up
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        for channel in channels:
            channel.close()

        victims = {n for n, pid in home.items() if pid == victim}
        survivors = set(home) - victims
        failed = [c for c in calls if c.code != "OK"]
        # A client runs one call at a time. In flight on the killed worker: the call each of its clients had running
        # when the worker died.
        in_flight = [c for c in calls if c.client in victims and c.started <= killed_at + DYING_SECONDS and c.ended >= killed_at]
        print(f"\nworker kill: {len(channels)} connections ({len(victims)} on the victim), {len(calls)} calls, "
              f"{len(failed)} failed ({sorted(c.code for c in failed)}), {len(in_flight)} in flight on the victim at the kill, "
              f"replacement serving {respawn_seconds:.1f}s after the kill")
        for c in failed:
            print(f"  failed: client {c.client} started {1000 * (c.started - killed_at):+.1f} ms, ended {1000 * (c.ended - killed_at):+.1f} ms: {c.code}")
        assert all(c in in_flight for c in failed), (failed, in_flight)
        # A client runs one call at a time, so the kill can cut at most one call per client of the victim. (in_flight
        # itself may hold two calls of one client: one answered just before the kill took effect, the next started
        # within DYING_SECONDS of it.)
        assert len(failed) <= len(victims)
        assert all(c.code in ("UNAVAILABLE", "CANCELLED", "INTERNAL", "UNKNOWN") for c in failed), failed
        # The other worker kept serving throughout: its clients never failed and were answered while the victim was down.
        assert not [c for c in calls if c.client in survivors and c.code != "OK"]
        assert any(c.client in survivors and c.code == "OK" and killed_at < c.ended < killed_at + respawn_seconds for c in calls)
        # Every client, the victim's included, reconnected and was answered after the kill.
        after = [c for c in calls if c.started > killed_at and c not in failed and c.served_by != victim]
        assert all(any(c.client == n and c.code == "OK" for c in after) for n in home)
        assert {c.served_by for c in after if c.code == "OK"} <= {workers[1], replacement}

        text = log.read_text()
        assert re.search(rf"worker \d \(pid {victim}\) was killed by signal 9 after [0-9.]+s; replacing it in", text), text[-3000:]
        assert re.search(rf"worker \d replaced: pid {replacement} serving", text), text[-3000:]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert re.search(r"^propensity_worker_restarts_total 1\.0$", metrics, re.MULTILINE), metrics[:2000]
        # The replacement was forked after the parent opened /metrics: it must not hold that socket.
        listeners = subprocess.run(["ss", "-ltnpH", f"sport = :{metrics_port}"], capture_output=True, text=True).stdout
        assert f"pid={server.process.pid}," in listeners and f"pid={replacement}," not in listeners, listeners

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
        assert not children(server.process.pid)


def test_a_replacement_that_cannot_start_is_retried_with_backoff_while_the_other_worker_serves(pipeline: Pipeline) -> None:
    """A crash loop: the served model's directory is gone, so a replacement cannot load it; the parent keeps trying,
    waiting longer each time, the surviving worker answers meanwhile, and once the model is back the slot is refilled."""
    env, work = private_env(pipeline, "worker-crash-loop", workers=2)
    log = pipeline.root / "worker-crash-loop.log"
    versions = work / "models" / "versions"
    with running_server(env, log) as server, grpc.insecure_channel(server.target, options=[RETRY_UNAVAILABLE]) as channel:
        workers = children(server.process.pid)
        served = (versions / (work / "models" / "CURRENT").read_text().strip())
        hidden = versions / f".{served.name}"  # dot-prefixed: not a version to the registry
        served.rename(hidden)
        os.kill(workers[0], signal.SIGKILL)
        stub = pb_grpc.RecommendationServiceStub(channel)
        assert wait_for(lambda: log.read_text().count("failed to start") >= 2, 60), log.read_text()[-3000:]
        text = log.read_text()
        assert re.search(r"replacement worker \d \(pid \d+\) failed to start: .*not found", text), text[-3000:]
        assert "replacing it in 0.2s" in text and "replacing it in 0.4s" in text  # the wait doubles
        for i in range(10):  # the surviving worker answers throughout
            assert served_by(stub, f"crash-loop-{i}") == workers[1]
        hidden.rename(served)
        assert wait_for(lambda: len(children(server.process.pid)) == 2 and "replaced: pid" in log.read_text(), 60), log.read_text()[-3000:]
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
