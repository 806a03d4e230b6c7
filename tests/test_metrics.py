"""Tests for the server's metrics: values, the event-loop lag monitor, the /metrics endpoint, multi-process aggregation and the wiring."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from propensity.settings import ServerSettings, Settings
from server.loop_monitor import LoopLagMonitor, PeriodicWork, timed_steps
from server.metrics import Metrics, start_metrics_http
from server.observability import install_observability

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture()
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format (labels in any order), or None."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        metric, _, label_text = series.partition("{")
        found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if part)
        if metric == name and {k: v.strip('"') for k, v in found.items()} == labels:
            return float(value)
    return None


def test_requests_are_counted_and_timed(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.observe_request("Recommend", "OK", 0.003)
    metrics.observe_request("Recommend", "OK", 0.7)
    metrics.observe_request("Recommend", "INVALID_ARGUMENT", 0.0001)
    ok = {"method": "Recommend", "code": "OK"}
    assert registry.get_sample_value("propensity_requests_total", ok) == 2
    assert registry.get_sample_value("propensity_requests_total", {"method": "Recommend", "code": "INVALID_ARGUMENT"}) == 1
    assert registry.get_sample_value("propensity_request_seconds_count", ok) == 2
    assert registry.get_sample_value("propensity_request_seconds_sum", ok) == pytest.approx(0.703)
    assert registry.get_sample_value("propensity_request_seconds_bucket", {**ok, "le": "0.005"}) == 1
    assert registry.get_sample_value("propensity_request_seconds_bucket", {**ok, "le": "0.0005"}) == 0
    assert registry.get_sample_value("propensity_request_seconds_bucket", {**ok, "le": "2.0"}) == 2


def test_stages_are_timed_even_when_they_fail(registry: CollectorRegistry, metrics: Metrics) -> None:
    assert registry.get_sample_value("propensity_stage_seconds_count", {"stage": "explain"}) == 0  # exists from the start
    metrics.observe_stage("features", 0.01)
    with metrics.stage("scoring"):
        pass
    with pytest.raises(KeyError), metrics.stage("scoring"):
        raise KeyError("x")
    assert registry.get_sample_value("propensity_stage_seconds_count", {"stage": "features"}) == 1
    assert registry.get_sample_value("propensity_stage_seconds_sum", {"stage": "features"}) == pytest.approx(0.01)
    assert registry.get_sample_value("propensity_stage_seconds_count", {"stage": "scoring"}) == 2


def test_fallbacks_are_counted_by_reason(registry: CollectorRegistry, metrics: Metrics) -> None:
    assert registry.get_sample_value("propensity_fallbacks_total", {"reason": "DEADLINE"}) == 0
    metrics.count_fallback("UNKNOWN_USER")
    metrics.count_fallback("UNKNOWN_USER")
    assert registry.get_sample_value("propensity_fallbacks_total", {"reason": "UNKNOWN_USER"}) == 2
    assert registry.get_sample_value("propensity_fallbacks_total", {"reason": "NO_HISTORY"}) == 0


def test_model_versions_are_replaced_as_a_set(registry: CollectorRegistry, metrics: Metrics) -> None:
    def info(version: str, role: str) -> float | None:
        return registry.get_sample_value("propensity_model_info", {"version": version, "role": role})

    metrics.set_models({"v1": "current", "v2": "shadow"})
    assert (info("v1", "current"), info("v2", "shadow")) == (1, 1)
    metrics.set_models({"v2": "current", "v3": "split"})
    assert (info("v2", "current"), info("v3", "split")) == (1, 1)
    assert info("v1", "current") is None
    assert info("v2", "shadow") is None


def test_freshness_gauges(registry: CollectorRegistry, metrics: Metrics) -> None:
    metrics.set_feature_age("user_activity", 42.5)
    metrics.set_feature_age("user_activity", 12.0)
    metrics.set_item_cache_age(3.0)
    assert registry.get_sample_value("propensity_feature_age_seconds", {"feature_view": "user_activity"}) == 12.0
    assert registry.get_sample_value("propensity_item_cache_age_seconds") == 3.0


def test_event_loop_lag_is_a_histogram_and_a_running_maximum_per_worker(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry, worker=3)
    worker = {"worker": "3"}
    assert registry.get_sample_value("propensity_event_loop_lag_max_seconds", worker) == 0.0  # exists from the start
    for lag in (0.0004, 0.012, 0.002):
        metrics.observe_loop_lag(lag)
    assert registry.get_sample_value("propensity_event_loop_lag_seconds_count", worker) == 3
    assert registry.get_sample_value("propensity_event_loop_lag_seconds_sum", worker) == pytest.approx(0.0144)
    assert registry.get_sample_value("propensity_event_loop_lag_seconds_bucket", {**worker, "le": "0.005"}) == 2
    assert registry.get_sample_value("propensity_event_loop_lag_seconds_bucket", {**worker, "le": "0.01"}) == 2
    assert registry.get_sample_value("propensity_event_loop_lag_max_seconds", worker) == 0.012  # since start, not the last


def test_a_process_without_a_serving_loop_exports_no_lag(registry: CollectorRegistry) -> None:
    metrics = Metrics(registry, worker=None)  # the parent of workers
    metrics.observe_loop_lag(0.5)
    assert registry.get_sample_value("propensity_event_loop_lag_max_seconds", {"worker": "0"}) is None
    assert registry.get_sample_value("propensity_event_loop_lag_seconds_count", {"worker": "0"}) is None


def test_the_lag_monitor_sees_a_blocked_loop() -> None:
    """A callback that blocks the loop for 200 ms shows up as a wake-up at least that late, less one interval."""
    lags: list[float] = []
    monitor = LoopLagMonitor(lags.append, interval=0.005)

    async def main() -> None:
        task = asyncio.create_task(monitor.run())
        await asyncio.sleep(0.05)
        time.sleep(0.2)  # deliberately on the loop: nothing else runs meanwhile
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(main())
    assert monitor.samples == len(lags) > 0
    assert all(lag >= 0.0 for lag in lags)
    # A lower bound only: noise on a shared machine can make the lag larger, never smaller.
    assert max(lags) >= 0.2 - monitor.interval and monitor.max_lag == max(lags)


def test_lag_while_periodic_work_runs_is_reported_apart_and_a_periodic_step_on_the_loop_is_timed(registry: CollectorRegistry) -> None:
    """A periodic job that blocks the loop for 60 ms in one step: that step is timed, and the lag samples taken
    meanwhile are counted both in the plain histogram and in the during-periodic-work one; samples before the job are not."""
    metrics = Metrics(registry, worker=0)
    periodic = PeriodicWork()
    monitor = LoopLagMonitor(metrics.observe_loop_lag, interval=0.005, periodic=periodic,
                             observe_during_periodic=metrics.observe_loop_lag_during_periodic)
    steps: list[float] = []

    async def job() -> str:
        await asyncio.sleep(0.02)  # off the loop in real jobs: the background thread, the build process
        time.sleep(0.06)  # a step that holds the loop
        await asyncio.sleep(0.01)
        return "done"

    async def main() -> str:
        task = asyncio.create_task(monitor.run())
        await asyncio.sleep(0.05)
        before = monitor.samples
        assert monitor.samples_during_periodic == 0 and before > 0
        with periodic.running("model poll"):
            result = await timed_steps(job(), lambda seconds: (steps.append(seconds), metrics.observe_periodic_step("model poll", seconds)))
        await asyncio.sleep(0.03)
        task.cancel()
        return result

    assert asyncio.run(main()) == "done"
    assert len(steps) == 3 and max(steps) >= 0.06 and sorted(steps)[1] < 0.01  # only the blocking step is long
    worker = {"worker": "0"}
    poll = {**worker, "task": "model poll"}
    during = registry.get_sample_value("propensity_event_loop_lag_during_periodic_work_seconds_count", poll)
    over = during - registry.get_sample_value("propensity_event_loop_lag_during_periodic_work_seconds_bucket", {**poll, "le": "0.05"})
    assert registry.get_sample_value("propensity_event_loop_lag_during_periodic_work_seconds_count", {**worker, "task": "freshness read"}) == 0
    assert 0 < during == monitor.samples_during_periodic < monitor.samples
    assert over >= 1  # the 60 ms hold, seen while the job ran
    step = {**worker, "task": "model poll"}
    assert registry.get_sample_value("propensity_periodic_loop_step_seconds_count", step) == 3
    assert registry.get_sample_value("propensity_periodic_loop_step_seconds_bucket", {**step, "le": "0.05"}) == 2
    assert registry.get_sample_value("propensity_periodic_loop_step_seconds_count", {**worker, "task": "catalog refresh"}) == 0


def test_periodic_work_overlaps_a_window_while_it_runs_and_after_it_ended_within_the_window() -> None:
    periodic = PeriodicWork()
    start = time.perf_counter()
    assert periodic.overlapping(start) == ()
    with periodic.running("catalog refresh"):
        assert periodic.overlapping(time.perf_counter() + 10) == ("catalog refresh",)  # running now: any window overlaps
    assert periodic.overlapping(start) == ("catalog refresh",)  # ended after the window began
    assert periodic.overlapping(time.perf_counter() + 1) == ()


def test_timed_steps_passes_exceptions_and_results_through() -> None:
    steps: list[float] = []

    async def failing() -> None:
        await asyncio.sleep(0)
        raise KeyError("x")

    async def main() -> None:
        with pytest.raises(KeyError):
            await timed_steps(failing(), steps.append)

    asyncio.run(main())
    assert len(steps) == 2


def test_the_lag_monitor_refuses_a_zero_interval() -> None:
    with pytest.raises(ValueError):
        LoopLagMonitor(lambda lag: None, interval=0)


def test_http_endpoint_serves_the_registry(metrics: Metrics, registry: CollectorRegistry) -> None:
    metrics.observe_request("GetModelInfo", "OK", 0.001)
    metrics.set_models({"v1": "current"})
    server, thread = start_metrics_http(0, registry)
    try:
        text = _scrape(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
    for name in ("propensity_requests_total", "propensity_request_seconds_bucket", "propensity_stage_seconds_bucket",
                 "propensity_fallbacks_total", "propensity_feature_age_seconds", "propensity_item_cache_age_seconds",
                 "propensity_event_loop_lag_seconds_bucket", "propensity_event_loop_lag_max_seconds"):
        assert name in text
    assert _sample(text, "propensity_requests_total", method="GetModelInfo", code="OK") == 1
    assert _sample(text, "propensity_model_info", version="v1", role="current") == 1


def test_http_endpoint_needs_a_registry_outside_multiprocess_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(ValueError, match="registry"):
        start_metrics_http(0)


# --- Multi-process mode: prometheus_client decides at import, so every process here is a subprocess. ---


class _Serving:
    """A subprocess that prints its /metrics port, then serves until its stdin closes."""

    def __init__(self, script: str, env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=cwd,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.proc.kill()
            raise AssertionError(f"no port from subprocess: {line!r}\n{self.proc.stderr.read()}")
        self.port = int(line)

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR" and not k.startswith("PROPENSITY_")}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    return {**env, **extra}


def test_worker_processes_are_summed_over_http(tmp_path: Path) -> None:
    """Two workers record into one prepared directory, a third process serves the sum."""
    directory = tmp_path / "prom"
    directory.mkdir()
    env = _env()
    worker = f"""
        import sys
        from prometheus_client import CollectorRegistry
        from server.metrics import Metrics, prepare_multiprocess_dir
        prepare_multiprocess_dir({str(directory)!r}, clean=False)
        n = int(sys.argv[1])
        metrics = Metrics(CollectorRegistry(), worker=n)
        for _ in range(n):
            metrics.observe_request("Recommend", "OK", 0.01)
            metrics.observe_loop_lag(0.001 * n)
        metrics.set_feature_age("user_activity", 10.0 * n)
        metrics.set_models({{"v1": "current"}})
        print(__import__("os").getpid())
    """
    pids = []
    for n in (2, 3):
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(worker), str(n)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=30, check=True)
        pids.append(int(done.stdout))
    serving = _Serving(f"""
        import sys
        from server.metrics import mark_process_dead, prepare_multiprocess_dir, start_metrics_http
        prepare_multiprocess_dir({str(directory)!r}, clean=False)
        mark_process_dead(int(sys.argv[1]))
        server, _ = start_metrics_http(0)
        print(server.server_port, flush=True)
        sys.stdin.read()
    """.replace("sys.argv[1]", str(pids[1])), env, tmp_path)
    try:
        text = _scrape(serving.port)
    finally:
        serving.stop()
    assert _sample(text, "propensity_requests_total", method="Recommend", code="OK") == 5
    assert _sample(text, "propensity_request_seconds_count", method="Recommend", code="OK") == 5
    # Gauges: the maximum over live workers; the second worker was marked dead, so its 30 s is gone.
    assert _sample(text, "propensity_feature_age_seconds", feature_view="user_activity") == 20.0
    assert _sample(text, "propensity_model_info", version="v1", role="current") == 1
    # Event-loop lag, labelled by worker: each worker's own maximum; a dead worker's maximum is gone, its histogram stays.
    assert _sample(text, "propensity_event_loop_lag_max_seconds", worker="2") == pytest.approx(0.002)
    assert _sample(text, "propensity_event_loop_lag_max_seconds", worker="3") is None
    assert _sample(text, "propensity_event_loop_lag_seconds_count", worker="3") == 3


def test_parent_prepares_and_forked_workers_report(tmp_path: Path) -> None:
    """The app's flow: install_observability in the parent (no env var), fork workers, the parent serves the sum."""
    port = _free_port()
    script = f"""
        import multiprocessing, os, sys
        from propensity.settings import ServerSettings, Settings
        from server.metrics import multiprocess_dir
        from server.observability import install_observability

        settings = Settings(server=ServerSettings(workers=2, metrics_port={port}, host="127.0.0.1", served_log_dir=sys.argv[1]))
        parent = install_observability(settings, serve_http=True)
        assert parent.served_log is None, "the parent answers no RPCs"

        def work(number, n):
            obs = install_observability(settings, serve_http=False, worker=number)
            for _ in range(n):
                obs.metrics.observe_request("ScoreUsers", "OK", 0.002)
                obs.metrics.observe_loop_lag(0.001 * n)
            obs.metrics.count_fallback("NO_HISTORY")
            obs.close()

        children = [multiprocessing.get_context("fork").Process(target=work, args=(number, n)) for number, n in enumerate((1, 4))]
        for child in children:
            child.start()
        for child in children:
            child.join()
            assert child.exitcode == 0
            parent.worker_exited(child.pid)
        print(parent.start_http(), flush=True)
        sys.stdin.read()
        directory = multiprocess_dir()
        parent.close()
        assert not directory.exists(), "the temporary metrics directory is removed on close"
    """
    serving = _Serving(script.replace("sys.argv[1]", repr(str(tmp_path / "served"))), _env(), tmp_path)
    try:
        assert serving.port == port
        text = _scrape(port)
    finally:
        serving.stop()
    assert serving.proc.returncode == 0, serving.proc.stderr.read()
    assert _sample(text, "propensity_requests_total", method="ScoreUsers", code="OK") == 5
    assert _sample(text, "propensity_fallbacks_total", reason="NO_HISTORY") == 2
    # The lag stays per worker (summing two loops' lags would hide the one that stalls); the parent adds no series.
    assert _sample(text, "propensity_event_loop_lag_seconds_count", worker="0") == 1
    assert _sample(text, "propensity_event_loop_lag_seconds_count", worker="1") == 4
    assert _sample(text, "propensity_event_loop_lag_seconds_sum", worker="1") == pytest.approx(0.016)
    assert {line.split('worker="')[1].split('"')[0] for line in text.splitlines() if line.startswith("propensity_event_loop_lag_seconds_count")} == {"0", "1"}


# --- The wiring, single process. ---


@pytest.fixture()
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)  # no propensity.toml
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("_isolated")
def test_install_observability_single_process(tmp_path: Path) -> None:
    port = _free_port()
    settings = Settings(server=ServerSettings(metrics_port=port, host="127.0.0.1", served_log_dir=tmp_path / "served",
                                              served_log_sample_rate=0.25, log_format="json"))
    obs = install_observability(settings)
    try:
        assert len(obs.interceptors) == 1
        assert obs.served_log is not None and obs.served_log.sample_rate == 0.25
        obs.metrics.observe_request("Recommend", "OK", 0.004)
        assert obs.start_http() == port
        assert obs.start_http() == port  # idempotent
        assert _sample(_scrape(port), "propensity_requests_total", method="Recommend", code="OK") == 1
    finally:
        obs.close()
    with pytest.raises(urllib.error.URLError):
        _scrape(port)
    obs.close()


@pytest.mark.usefixtures("_isolated")
def test_install_observability_with_everything_off() -> None:
    obs = install_observability(Settings(server=ServerSettings(metrics_port=0)))
    assert obs.served_log is None
    assert obs.start_http() is None
    obs.close()


def test_importing_feast_does_not_hijack_single_process_metrics(tmp_path: Path) -> None:
    """`import feast` sets PROMETHEUS_MULTIPROC_DIR to its own directory; our counters must still be served."""
    port = _free_port()
    script = f"""
        import urllib.request
        import feast  # noqa: F401  (sets PROMETHEUS_MULTIPROC_DIR)
        from propensity.settings import ServerSettings, Settings
        from server.observability import install_observability
        obs = install_observability(Settings(server=ServerSettings(metrics_port={port}, host="127.0.0.1")))
        obs.start_http()
        obs.metrics.observe_request("Recommend", "OK", 0.01)
        print(urllib.request.urlopen("http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
        obs.close()
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _sample(done.stdout, "propensity_requests_total", method="Recommend", code="OK") == 1
    assert _sample(done.stdout, "propensity_fallbacks_total", reason="DEADLINE") == 0
