"""Prometheus metrics of the server: one `Metrics` per process on a registry the caller owns.

Multi-process mode (workers > 1 sharing the port): prometheus_client then keeps every value in
mmap files under PROMETHEUS_MULTIPROC_DIR, and only the parent serves the aggregate
(`start_metrics_http` with a MultiProcessCollector). Gauges therefore declare how they merge:
the live workers' maximum, and a dead worker stops counting once `mark_process_dead` ran.

The event-loop lag is per worker (label `worker`: 0 .. workers-1, so its cardinality is the worker
count): an aggregate would hide the one loop that stalls. Sum or max over `worker` in the query when
one number is wanted.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server, values
from prometheus_client import multiprocess as _multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# 0.5 ms .. 2 s: a cached Recommend is ~1 ms, a cold one with explanations can take ~1 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
STAGES = ("features", "candidates", "scoring", "explain")
FALLBACK_REASONS = ("UNKNOWN_USER", "NO_HISTORY", "NO_CANDIDATES", "DEADLINE", "STORE_UNAVAILABLE")
STORE_OPERATIONS = ("read", "push")
MODEL_ROLES = ("current", "split", "shadow")
# The periodic tasks of a serving worker (server.background.Background), labels of propensity_periodic_loop_step_seconds.
PERIODIC_TASKS = ("catalog refresh", "model poll", "freshness read")
# 0.25 ms .. 1 s, dense around the 5 ms budget a periodic task may stall the loop for.
LOOP_LAG_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """The server's metrics, registered on `registry`; every method is cheap enough for the request path.

    `worker` labels this process's event-loop lag (the worker's number; 0 for a single process); None for
    a process that runs no serving loop (the parent of workers), which then exports no lag series.
    """

    def __init__(self, registry: CollectorRegistry, worker: int | None = 0) -> None:
        self.registry = registry
        self._requests = Counter(
            "propensity_requests", "RPCs finished, by method and status code.", ["method", "code"], registry=registry
        )
        self._request_seconds = Histogram(
            "propensity_request_seconds", "RPC latency in seconds, by method and status code.", ["method", "code"],
            registry=registry, buckets=LATENCY_BUCKETS,
        )
        self._stage_seconds = Histogram(
            "propensity_stage_seconds", "Time spent per data-plane stage in seconds.", ["stage"],
            registry=registry, buckets=LATENCY_BUCKETS,
        )
        self._fallbacks = Counter(
            "propensity_fallbacks", "Requests answered from a fallback, by reason.", ["reason"], registry=registry
        )
        self._model_info = Gauge(
            "propensity_model_info", "1 for each model version in use, by role (current, split, shadow).",
            ["version", "role"], registry=registry, multiprocess_mode="livemax",
        )
        self._feature_age = Gauge(
            "propensity_feature_age_seconds", "Age of the newest materialized value, by feature view.",
            ["feature_view"], registry=registry, multiprocess_mode="livemax",
        )
        self._item_cache_age = Gauge(
            "propensity_item_cache_age_seconds", "Seconds since the in-process item catalog was refreshed.",
            registry=registry, multiprocess_mode="livemax",
        )
        self._served_log_errors = Counter(
            "propensity_served_log_errors", "Served-feature log batches that could not be written.", registry=registry
        )
        self._worker_restarts = Counter(
            "propensity_worker_restarts", "Worker processes that died and were replaced by the parent (server.workers).", registry=registry
        )
        self._store_errors = Counter(
            "propensity_store_errors", "Online-store calls that failed or timed out, by operation (read, push).", ["operation"], registry=registry
        )
        self._store_up = Gauge(
            "propensity_online_store_up", "1 while the online store answers, 0 while a worker's breaker is open, by operation.",
            ["operation"], registry=registry, multiprocess_mode="livemin",
        )
        self._pushes_pending = Gauge(
            "propensity_ingest_pushes_pending", "Logged events whose online-store push is still to be retried.",
            registry=registry, multiprocess_mode="livemax",
        )
        for operation in STORE_OPERATIONS:
            self._store_errors.labels(operation)
            self._store_up.labels(operation).set(1)
        # Bounded: the caller names in settings.security plus "anonymous" and "unknown" (server/auth.py).
        self._caller_requests = Counter(
            "propensity_caller_requests", "RPCs by authenticated caller, method and status code (when auth is on).",
            ["caller", "method", "code"], registry=registry,
        )
        self._loop_lag: Histogram | None = None
        self._loop_lag_periodic: dict[str, Histogram] = {}
        self._periodic_step_by_task: dict[str, Histogram] = {}
        self._loop_lag_max: Gauge | None = None
        self._loop_lag_max_value = 0.0
        if worker is not None:  # bound to this worker's label once: observe_loop_lag runs ~200 times a second
            self._loop_lag = Histogram(
                "propensity_event_loop_lag_seconds", "How late a fixed-interval timer on the worker's event loop woke up.",
                ["worker"], registry=registry, buckets=LOOP_LAG_BUCKETS,
            ).labels(str(worker))
            self._loop_lag_max = Gauge(
                "propensity_event_loop_lag_max_seconds",
                "Largest event-loop lag since the worker started serving (for a window, diff the histogram's buckets).",
                ["worker"], registry=registry, multiprocess_mode="livemax",
            ).labels(str(worker))
            self._loop_lag_max.set(0.0)
            # The same lateness, only for the samples whose window overlapped periodic work (server.loop_monitor.PeriodicWork):
            # the load alone makes lag too; periodic work must not add to it (issue 10: no periodic stall over 5 ms).
            loop_lag_periodic = Histogram(
                "propensity_event_loop_lag_during_periodic_work_seconds",
                "Event-loop lag samples taken while a periodic task (label task) was at work, on the loop or off it.",
                ["worker", "task"], registry=registry, buckets=LOOP_LAG_BUCKETS,
            )
            # task="any": once per sample, whichever tasks it overlapped (the per-task series may count a sample twice).
            self._loop_lag_periodic = {task: loop_lag_periodic.labels(str(worker), task) for task in (*PERIODIC_TASKS, "any")}
            self._periodic_step = Histogram(
                "propensity_periodic_loop_step_seconds",
                "How long one step of a periodic task ran on the event loop (between two awaits): how long it held the loop.",
                ["worker", "task"], registry=registry, buckets=LOOP_LAG_BUCKETS,
            )
            self._periodic_step_by_task = {task: self._periodic_step.labels(str(worker), task) for task in PERIODIC_TASKS}
        # Known label values exist from the start, so rate() and alerts see 0 rather than no series.
        for stage in STAGES:
            self._stage_seconds.labels(stage)
        for reason in FALLBACK_REASONS:
            self._fallbacks.labels(reason)
        self._models: dict[tuple[str, str], None] = {}
        self._models_lock = threading.Lock()

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        """Count one finished RPC and its latency."""
        self._requests.labels(method, code).inc()
        self._request_seconds.labels(method, code).observe(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record the duration of one stage (features, candidates, scoring, explain)."""
        self._stage_seconds.labels(stage).observe(seconds)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage `name`; time spent before an exception counts too."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._stage_seconds.labels(name).observe(time.perf_counter() - start)

    def count_fallback(self, reason: str) -> None:
        """Count one request answered from a fallback (UNKNOWN_USER, NO_HISTORY, NO_CANDIDATES, DEADLINE)."""
        self._fallbacks.labels(reason).inc()

    def set_models(self, versions: Mapping[str, str]) -> None:
        """Replace the versions in use, {version: role}; versions absent from `versions` stop reporting 1.

        New versions are set before retired ones are dropped, so a scrape never sees no model at all.
        Single process: retired series disappear. Multi-process: they drop to 0 (mmap values cannot be
        deleted); the aggregate is the maximum over live workers, so a version counts while any worker uses it.
        """
        wanted = {(version, role): None for version, role in versions.items()}
        with self._models_lock:
            for version, role in wanted:
                self._model_info.labels(version, role).set(1)
            for version, role in self._models:
                if (version, role) not in wanted:
                    self._model_info.labels(version, role).set(0)
                    if not multiprocess_enabled():
                        self._model_info.remove(version, role)
            self._models = wanted

    def set_feature_age(self, view: str, seconds: float) -> None:
        """Age of the newest materialized value of feature view `view`."""
        self._feature_age.labels(view).set(seconds)

    def set_item_cache_age(self, seconds: float) -> None:
        """Seconds since this process last refreshed its item catalog."""
        self._item_cache_age.set(seconds)

    def observe_loop_lag(self, seconds: float) -> None:
        """Record one lateness sample of this worker's event-loop timer (server.loop_monitor)."""
        if self._loop_lag is None or self._loop_lag_max is None:
            return
        self._loop_lag.observe(seconds)
        if seconds > self._loop_lag_max_value:  # the gauge is written only when the maximum grows
            self._loop_lag_max_value = seconds
            self._loop_lag_max.set(seconds)

    def observe_loop_lag_during_periodic(self, seconds: float, tasks: tuple[str, ...]) -> None:
        """Record one lag sample whose window overlapped the periodic `tasks` (also recorded by observe_loop_lag)."""
        for task in (*tasks, "any"):
            histogram = self._loop_lag_periodic.get(task)
            if histogram is not None:
                histogram.observe(seconds)

    def observe_periodic_step(self, task: str, seconds: float) -> None:
        """Record how long one step of periodic task `task` (one of PERIODIC_TASKS) held the event loop."""
        histogram = self._periodic_step_by_task.get(task)
        if histogram is not None:
            histogram.observe(seconds)

    def count_worker_restart(self) -> None:
        """Count one worker process that died while serving and is being replaced."""
        self._worker_restarts.inc()

    def count_store_error(self, operation: str) -> None:
        """Count one failed online-store call (operation read or push)."""
        self._store_errors.labels(operation).inc()

    def set_store_up(self, operation: str, up: bool) -> None:
        """Whether the online store answers this process's calls of one operation (read, push)."""
        self._store_up.labels(operation).set(1 if up else 0)

    def set_pushes_pending(self, events: int) -> None:
        """Logged events whose push to the online store waits for a retry."""
        self._pushes_pending.set(events)

    def observe_caller(self, caller: str, method: str, code: str) -> None:
        """Count one RPC of `caller` (a known caller name, "anonymous" or "unknown") with its final status code."""
        self._caller_requests.labels(caller, method, code).inc()

    def count_served_log_error(self) -> None:
        """Count one served-feature log batch that was dropped because it could not be written."""
        self._served_log_errors.inc()


# Our own multi-process directory, set by prepare_multiprocess_dir and inherited by forked workers.
# Deliberately not read from PROMETHEUS_MULTIPROC_DIR: `import feast` sets that variable to a
# directory of its own, and treating it as ours silently broke single-process metrics.
_shared_dir: Path | None = None


def multiprocess_dir() -> Path | None:
    """The multi-process directory when multi-process mode is on, else None."""
    return _shared_dir


def multiprocess_enabled() -> bool:
    """True when metric values go to mmap files shared by worker processes."""
    return _shared_dir is not None


def use_in_process_values() -> None:
    """Keep metric values in this process's memory (single-process mode), whatever a library switched."""
    if _shared_dir is None:
        values.ValueClass = values.MutexValue


def prepare_multiprocess_dir(path: str | Path, clean: bool = True) -> Path:
    """Create `path`, delete value files of earlier runs, and turn multi-process mode on for this process and its children.

    Call it once in the parent, before any worker starts and before `Metrics` is built; a worker whose
    parent prepared the directory passes clean=False (or needs no call at all when forked). prometheus_client
    picks its value class when it is imported; when that happened before the directory was known, the
    class is switched here (prometheus_client looks it up through `values.ValueClass` at metric creation
    for exactly this purpose), so metrics created afterwards, in this process or forked workers, go to files.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if clean:
        for stale in path.glob("*.db"):  # only value files: a mistyped path must not lose other data
            stale.unlink()
    global _shared_dir
    os.environ[MULTIPROC_ENV] = str(path)  # where MultiProcessValue files go, in this process and forked workers
    values.ValueClass = values.MultiProcessValue()
    _shared_dir = path
    return path


def mark_process_dead(pid: int, path: str | Path | None = None) -> None:
    """Forget the live-gauge values of a worker that exited (its counters and histograms keep counting)."""
    path = path or multiprocess_dir()
    if path is not None:
        _multiprocess.mark_process_dead(pid, str(path))


def start_metrics_http(
    port: int, registry: CollectorRegistry | None = None, addr: str = "127.0.0.1", tls: object | None = None
) -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics on addr:port in a daemon thread; port 0 picks a free one (see `server.server_port`).

    In multi-process mode the endpoint serves the aggregate of every process's files and `registry` is
    ignored; otherwise `registry` is served. Stop with `server.shutdown(); server.server_close()`.
    tls: a server.tls.CertificateFiles; the endpoint then speaks HTTPS (mutual TLS when it has a client CA).
    """
    if multiprocess_enabled():
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry, path=str(multiprocess_dir()))
    elif registry is None:
        raise ValueError("a registry is required outside multi-process mode")
    if tls is not None:
        from prometheus_client import make_wsgi_app

        from server.tls import serve_https

        return serve_https(port, addr, make_wsgi_app(registry), tls)
    return start_http_server(port, addr=addr, registry=registry)
