"""The serving process's periodic work, kept off the event loop: build elsewhere, swap in on the loop.

No periodic task may stall a serving loop for more than 5 ms (docs/benchmarks/event_loop.md has the
measurements behind each choice). Work goes to one of three places:

- the build process (server.build_process): the catalog re-read, ~1 s of pure Python in Feast's
  online read. In a thread it held the GIL against the loop (10-50 ms lags); a process has its own.
- one background thread: polling and loading models (LightGBM parses in C++ without the GIL), the
  freshness reading and the catalog stamp (each skips its work while its files are unchanged: at 10 s
  periods the registry re-read and the stamp's SQL made 13-16 % of the lag samples taken meanwhile
  exceed 5 ms, against 1.6 % otherwise), unpickling a new catalog, garbage-collection upkeep.
  One thread, so two of these never run at once and never compete with each other for the GIL.
- every run of a periodic task is marked (server.loop_monitor.PeriodicWork), and its steps on the loop
  timed, so the lag it causes is reported apart from the load's (docs/benchmarks/event_loop.md).
- the loop: only putting a finished object in place (one assignment) and updating gauges.

With several workers, their catalog builds take turns (`build_lock`, a file lock the parent names):
the workers' refresh timers start together, so two builds at once took both of a 2-core machine's
cores for 1-2 s, and requests due meanwhile waited for a core. Open-loop p99 on a shared machine was
227-495 ms with both builds running, 34-45 ms with them held, 35-83 ms with both pinned to one core
(docs/benchmarks/tail.md). One at a time leaves the other cores to the serving loops.

The GIL switch interval is lowered (SWITCH_INTERVAL_SECONDS) so that when the background thread does
run Python, the loop waits ~0.5 ms for the GIL instead of CPython's default 5 ms.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import gc
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

from server.build_process import BuildFailed, BuildProcess
from server.item_cache import FreshnessTracker, ItemCache, build_catalog_pieces, unpack_catalog
from server.loop_monitor import LoopLagMonitor, PeriodicWork, timed_steps
from server.metrics import PERIODIC_TASKS, Metrics
from server.model_pool import ModelPool

log = logging.getLogger(__name__)
T = TypeVar("T")
# CPython's default is 5 ms: a loop that wants the GIL back from a thread running Python waits that
# long each time. Measured during a model reload (Feast's typeguard-checked registry objects, lleaves):
# loop lag max ~5-6 ms at 1 ms, ~2.5-3.5 ms at 0.5 ms. Only the loop runs Python most of the time, so
# forced switches happen only while a background job runs.
SWITCH_INTERVAL_SECONDS = 0.0005
FRESHNESS_MAX_SECONDS = 15.0
BUILD_LOCK_POLL_SECONDS = 0.05


@contextlib.contextmanager
def build_turn(lock_path: Path | None, cancelled: Callable[[], bool]) -> Iterator[None]:
    """Hold the workers' shared build lock (none: no-op) while the body runs; raises BuildFailed if `cancelled` first.

    flock, so a worker that dies mid-build releases it with its file descriptor. Polled rather than
    blocking, so a stopping server does not wait for another worker's build.
    """
    if lock_path is None:
        yield
        return
    with open(lock_path, "a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if cancelled():
                    raise BuildFailed("stopped while waiting for another worker's catalog build") from None
                time.sleep(BUILD_LOCK_POLL_SECONDS)
        yield  # closing the file releases the lock


def settle_garbage() -> float:
    """Collect, then freeze what survives so later full collections skip it; returns the seconds it took.

    After start-up and after each swap: a new catalog or model is long-lived, and the full collections
    that run on whichever thread allocates (often the loop) would otherwise walk it again and again
    (FIELD-NOTES: ~110 ms p99 spikes without gc.freeze). Collecting first keeps garbage out of the frozen set.
    """
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - start


class Background:
    """Periodic catalog refresh, model polling and freshness reading for one serving process, plus its lag monitor."""

    def __init__(
        self,
        items: ItemCache,
        models: ModelPool,
        freshness: FreshnessTracker,
        metrics: Metrics | None,
        catalog_seconds: float,
        model_seconds: float,
        build_lock: Path | None = None,
    ) -> None:
        self._items = items
        self._build_lock = build_lock
        self._stopping = False
        self._models = models
        self._freshness = freshness
        self._metrics = metrics
        self._periods = {
            "catalog refresh": (catalog_seconds, self.refresh_catalog),
            "model poll": (model_seconds, self.poll_models),
            "freshness read": (min(FRESHNESS_MAX_SECONDS, catalog_seconds), self.read_freshness),
        }
        assert tuple(self._periods) == PERIODIC_TASKS, "metrics.PERIODIC_TASKS names the periodic tasks"
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="propensity-background")
        self.builder = BuildProcess()
        self.periodic = PeriodicWork()
        self.monitor = LoopLagMonitor(
            metrics.observe_loop_lag if metrics else (lambda lag: None), periodic=self.periodic,
            observe_during_periodic=metrics.observe_loop_lag_during_periodic if metrics else None,
        )
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        """Start the periodic jobs and the lag monitor on the running loop (after start-up work is done)."""
        sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
        self._tasks = [asyncio.create_task(self.monitor.run(), name="event-loop lag")]
        for name, (seconds, job) in self._periods.items():
            self._tasks.append(asyncio.create_task(_every(seconds, job, name, self.periodic, self._step_recorder(name)), name=name))

    async def stop(self) -> None:
        """Cancel the jobs, stop the build process (also mid-build) and the background thread."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.builder.close()
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def refresh_catalog(self) -> bool:
        """Re-read the catalog in the build process; swap it in when its content changed. True when it did."""
        stamp = await self._off_loop(self._items.source_stamp)  # file stats; SQL aggregates only after a write (CatalogSourceStamp)
        if stamp is not None and stamp == self._items.built_from:
            self._items.confirm()  # nothing it is read from changed: skip the ~1-2 s re-read
            return False
        try:
            # A pool thread: it only waits for the other workers' builds and on the build process's socket.
            digest, pieces = await asyncio.to_thread(self._build_catalog, self._items.digest)
        except BuildFailed as error:
            log.error("item catalog refresh failed; keeping the catalog from %.0fs ago: %s", self._items.age_seconds, error)
            return False
        catalog = await self._off_loop(unpack_catalog, pieces) if pieces is not None else None
        self._items.install(catalog, digest, stamp)
        if catalog is not None:
            log.info("item catalog refreshed: %d items", catalog.size)
            await self._off_loop(settle_garbage)
        if self._metrics:
            self._metrics.set_item_cache_age(self._items.age_seconds)
        return catalog is not None

    async def poll_models(self) -> bool:
        """Load a newly promoted model version in the background thread; install it on the loop. True on a reload."""
        bundle = await self._off_loop(self._models.poll)
        if bundle is None:
            return False
        self._models.install(bundle)
        await self._off_loop(settle_garbage)
        return True

    async def read_freshness(self) -> None:
        """Re-read feature freshness in the background thread; publish it on the loop."""
        views = await self._off_loop(self._freshness.read)
        self._freshness.views = views
        if self._metrics:
            for view, (age, _) in views.items():
                self._metrics.set_feature_age(view, age)
            self._metrics.set_item_cache_age(self._items.age_seconds)

    def _build_catalog(self, known_digest: str) -> tuple[str, object]:
        with build_turn(self._build_lock, lambda: self._stopping):
            return self.builder.call(build_catalog_pieces, self._items.spec, known_digest)

    def _step_recorder(self, task: str) -> Callable[[float], None]:
        metrics = self._metrics
        return (lambda seconds: metrics.observe_periodic_step(task, seconds)) if metrics else (lambda seconds: None)

    def _off_loop(self, fn: Callable[..., T], *args: object) -> Awaitable[T]:
        return asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)


async def _every(
    seconds: float, job: Callable[[], Awaitable[object]], name: str, periodic: PeriodicWork | None = None,
    record_step: Callable[[float], None] | None = None,
) -> None:
    """Run `job` every `seconds` (measured from the end of the previous run, so runs never overlap); failures are logged.

    Each run counts as periodic work `name` from start to end (its background-thread and build-process parts
    too), and each of its steps on the loop is timed into `record_step`.
    """
    while True:
        await asyncio.sleep(seconds)
        try:
            with periodic.running(name) if periodic else contextlib.nullcontext():
                run = job()
                await (timed_steps(run, record_step) if record_step and asyncio.iscoroutine(run) else run)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task %s failed", name)
