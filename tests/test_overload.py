"""Overload: a worker driven at 3x its measured capacity sheds the excess with RESOURCE_EXHAUSTED, keeps the
latency of what it accepts, never sheds health checks, and recovers as soon as the load drops.

The load comes from h2load (C, cheap per request: a Python client cannot offer 3x a Python server's capacity
on the same two cores). h2load cannot tell a shed answer from an accepted one (both are HTTP 200), so:
- shed and accepted counts come from the server's own metrics (propensity_requests_total by code);
- the latency of accepted calls is sampled by an observer: one Python client calling in a closed loop through
  the same overloaded worker, recording each call's code and latency.

Timing on a shared 2-core machine is noisy: the bounds asserted are the issue's where they have a wide margin
and otherwise generous ones, documented at each assertion. The measured figures are printed (pytest -s) and
recorded in docs/reliability/processes.md.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_health.v1 import _async as health_async
from prometheus_client import CollectorRegistry

from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from server.admission import AdmissionInterceptor
from server.interceptors import ObservabilityInterceptor
from server.metrics import Metrics
from tests.aio_server import ThreadedAioServer
from tests.conftest import Pipeline, free_port, private_env, running_server, users

LIMIT = 4  # max_concurrent_requests of the server under test
PENDING = 1  # its max_pending_requests (gRPC core's queue in front of the event loop)
LOADERS = 4  # h2load processes, one connection and one shopper each
OVERLOAD = 3.0  # offered load / measured capacity
SECONDS = 5.0
TIMEOUT = 5.0  # deadline of the observer's calls
# Unloaded p99 on this shared machine swings between ~3 and ~12 ms from run to run (other jobs, GC): latency bounds
# are 5x the larger of it and this floor. The control without limits lands far above them (hundreds of ms).
BASELINE_FLOOR_MS = 10.0
SHED = ("RESOURCE_EXHAUSTED", "CANCELLED")  # our interceptor's answer; gRPC core's backlog cancellation


def p(values: list[float], q: float) -> float:
    return 1000 * float(np.percentile(values, q)) if values else float("nan")


def grpc_body(path: Path, request: pb.RecommendRequest) -> Path:
    message = request.SerializeToString()
    path.write_bytes(b"\x00" + len(message).to_bytes(4, "big") + message)
    return path


def h2load(port: int, bodies: list[Path], seconds: float, streams: int, rps: float = 0.0) -> int:
    """One h2load process per body (one connection each) for `seconds`; returns the requests done."""
    url = f"http://127.0.0.1:{port}/propensity.v1.RecommendationService/Recommend"
    base = ["h2load", "-c", "1", "-t", "1", "-m", str(streams), "-D", f"{int(seconds * 1000)}ms",
            "-H", "content-type: application/grpc", "-H", "te: trailers"] + (["--rps", f"{rps:.3f}"] if rps else [])
    processes = [subprocess.Popen([*base, "-d", str(body), url], stdout=subprocess.PIPE, text=True) for body in bodies]
    done = 0
    for process in processes:
        out, _ = process.communicate(timeout=seconds + 60)
        match = re.search(r"requests: \d+ total, \d+ started, (\d+) done", out)
        assert match and process.returncode == 0, out[-2000:]
        done += int(match.group(1))
    return done


def recommend_counts(metrics_port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    counts = {}
    for labels, value in re.findall(r"^propensity_requests_total\{(.*)\} (\S+)$", text, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if found.get("method") == "Recommend":
            counts[found["code"]] = float(value)
    return counts


@dataclass
class Observer:
    """A closed loop of one client (own connection) plus a health check every 20 ms (another connection)."""

    target: str
    shoppers: list[str]
    calls: list[tuple[float, str, float]] = field(default_factory=list)  # (started, code, seconds)
    health: list[tuple[str, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Observer:
        self.threads = [threading.Thread(target=self._calls, daemon=True), threading.Thread(target=self._health, daemon=True)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def _calls(self) -> None:
        with grpc.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = pb_grpc.RecommendationServiceStub(channel)
            i = 0
            while not self.stop.is_set():
                i += 1
                started = time.perf_counter()
                try:
                    stub.Recommend(pb.RecommendRequest(user_id=self.shoppers[i % len(self.shoppers)], num_items=10), timeout=TIMEOUT)
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name
                self.calls.append((started, code, time.perf_counter() - started))

    def _health(self) -> None:
        with grpc.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self.stop.wait(0.02):
                started = time.perf_counter()
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT).status
                    code = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                except grpc.RpcError as error:
                    code = error.code().name
                self.health.append((code, time.perf_counter() - started))


def drive(target: str, metrics_port: int, shoppers: list[str], work: Path) -> dict:
    """Unloaded latency, capacity (closed loop at LIMIT concurrency), then OVERLOAD x capacity in rate mode."""
    port = int(target.rsplit(":", 1)[1])
    bodies = [grpc_body(work / f"body-{i}.bin", pb.RecommendRequest(user_id=shoppers[i], num_items=10)) for i in range(LOADERS)]
    with Observer(target, shoppers) as idle:  # unloaded: the observer alone (after a warm-up second)
        time.sleep(4.0)
    unloaded = [s for started, code, s in idle.calls if code == "OK" and started > idle.calls[0][0] + 1.0]
    assert all(code == "OK" for _, code, _ in idle.calls)
    seconds = 3.0
    capacity = h2load(port, bodies, seconds, streams=LIMIT // LOADERS) / seconds
    before = recommend_counts(metrics_port)
    with Observer(target, shoppers) as loaded:
        time.sleep(0.5)
        load_started = time.perf_counter()
        offered = h2load(port, bodies, SECONDS, streams=64, rps=OVERLOAD * capacity / LOADERS)
        load_stopped = time.perf_counter()
        time.sleep(1.0)
    after = recommend_counts(metrics_port)
    counts = {code: after.get(code, 0) - before.get(code, 0) for code in after}
    during = [(code, s) for started, code, s in loaded.calls if load_started + 0.5 < started < load_stopped]
    accepted = [s for code, s in during if code == "OK"]
    recovery = [(code, s) for started, code, s in loaded.calls if started >= load_stopped]
    calls = offered + len([c for c in loaded.calls if load_started <= c[0] < load_stopped])
    figures = {
        "unloaded_calls": len(unloaded),
        "unloaded_p50_ms": p(unloaded, 50),
        "unloaded_p99_ms": p(unloaded, 99),
        "capacity_rps": capacity,
        "offered_rps": OVERLOAD * capacity,
        "calls": calls,
        "server_codes": counts,  # what reached the handlers' interceptors: gRPC core's cancellations never do
        "accepted_rps": counts.get("OK", 0) / SECONDS,
        "shed_share": max(0.0, 1 - counts.get("OK", 0) / max(calls, 1)),  # h2load counts only calls done in its run
        "observer_codes": {c: sum(code == c for code, _ in during) for c in sorted({code for code, _ in during})},
        "accepted_p50_ms": p(accepted, 50),
        "accepted_p99_ms": p(accepted, 99),
        "shed_p99_ms": p([s for code, s in during if code in SHED], 99),
        "health": {c: sum(code == c for code, _ in loaded.health) for c in sorted({code for code, _ in loaded.health})},
        "health_p99_ms": p([s for _, s in loaded.health], 99),
        "recovery_codes": sorted({code for code, _ in recovery}),
        "recovery_first_ms": 1000 * recovery[0][1] if recovery else float("nan"),
        "recovery_p99_ms": p([s for _, s in recovery], 99),
    }
    figures["bound_ms"] = 5 * max(figures["unloaded_p99_ms"], BASELINE_FLOOR_MS)
    print("\n" + "\n".join(f"  {k}: {round(v, 1) if isinstance(v, float) else v}" for k, v in figures.items()))
    return figures


def test_calls_past_the_limit_in_handlers_are_refused_at_once_and_health_passes() -> None:
    """The admission interceptor on a real grpc.aio server, with handlers that wait (as I/O-bound ones do)."""
    release = threading.Event()

    async def waiting(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return b"done"

    async def configure(server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(waiting)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Work", {"Wait": handler}),))
        health = health_async.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        await health.set("", health_pb2.HealthCheckResponse.SERVING)

    registry = CollectorRegistry()
    admission = AdmissionInterceptor(2)
    server = ThreadedAioServer(configure, interceptors=[ObservabilityInterceptor(Metrics(registry).observe_request), admission])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            wait = channel.unary_unary("/test.Work/Wait")
            held = [wait.future(b"", timeout=10) for _ in range(2)]
            assert _eventually(lambda: admission.in_flight == 2)
            refused = []
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as error:
                    wait(b"", timeout=10)
                refused.append(error.value)
            assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert "server.max_concurrent_requests=2" in refused[0].details()
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(5):  # never shed, whatever the load
                assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            release.set()
            assert [f.result() for f in held] == [b"done", b"done"]
            assert wait(b"", timeout=10) == b"done"  # a slot is free again: admitted at once
        assert admission.shed == 3 and admission.in_flight == 0
        assert registry.get_sample_value("propensity_requests_total", {"method": "Wait", "code": "RESOURCE_EXHAUSTED"}) == 3
    finally:
        server.stop()


def _eventually(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.slow
def test_overload_is_shed_and_accepted_calls_keep_their_latency(pipeline: Pipeline, tmp_path: Path) -> None:
    metrics_port = free_port()
    env, _ = private_env(pipeline, "overload", max_concurrent_requests=LIMIT, max_pending_requests=PENDING, metrics_port=metrics_port)
    with running_server(env, pipeline.root / "overload.log") as server:
        figures = drive(server.target, metrics_port, users(pipeline, 200), tmp_path)
    # Every call was accepted or shed at once: RESOURCE_EXHAUSTED from the admission interceptor, CANCELLED from
    # gRPC core's backlog bound (what this load meets: see server/admission.py). Nothing timed out or failed otherwise.
    assert set(figures["observer_codes"]) <= {"OK", *SHED}, figures
    assert set(figures["server_codes"]) - {"CANCELLED"} <= {"OK", "RESOURCE_EXHAUSTED"}, figures
    # At 3x capacity about two calls in three must go; a third is a generous floor for a noisy capacity measurement.
    assert figures["shed_share"] > 1 / 3, figures
    # The calls it accepted kept their latency: p99 below 5x the unloaded p99 (with the floor above).
    assert figures["accepted_p99_ms"] < figures["bound_ms"], figures
    # Shedding is quick: a refusal takes no longer than that bound either.
    assert figures["shed_p99_ms"] < figures["bound_ms"], figures
    # Health checks are never shed, and answer SERVING throughout.
    assert figures["health"] and set(figures["health"]) == {"SERVING"}, figures
    # Recovery at once: every call after the load stopped was answered, the first within the same bound.
    assert figures["recovery_codes"] == ["OK"] and figures["recovery_first_ms"] < figures["bound_ms"], figures


@pytest.mark.slow
def test_without_a_limit_the_same_overload_queues(pipeline: Pipeline, tmp_path: Path) -> None:
    """The control: with max_concurrent_requests=0 the same offered load queues inside the worker, and the latency
    of every call grows far past the bound above. So the figures above are the limit's doing."""
    metrics_port = free_port()
    env, _ = private_env(pipeline, "overload-unlimited", max_concurrent_requests=0, max_pending_requests=1000, metrics_port=metrics_port)
    with running_server(env, pipeline.root / "overload-unlimited.log") as server:
        figures = drive(server.target, metrics_port, users(pipeline, 200), tmp_path)
    # Nothing shed (the server may record a CANCELLED or two: h2load going away with calls outstanding).
    assert not figures["server_codes"].get("RESOURCE_EXHAUSTED") and set(figures["observer_codes"]) == {"OK"}, figures
    assert figures["accepted_p99_ms"] > figures["bound_ms"], figures
