"""How long each periodic task of a serving process stalls its event loop (docs/benchmarks/event_loop.md).

Builds one server process's components from the settings (PROPENSITY_* variables, e.g. the bench shop),
freezes start-up objects as `serve` does, then runs each periodic task the way the server schedules it
while a 1 ms timer on the loop records how late it wakes (the stall a request arriving then would see).
Two loop states: idle, and busy (a coroutine doing ~1 ms of Python per step, like requests do).

    .venv/bin/python docs/benchmarks/event_loop_probe.py [--rounds 5]

Run it against older code with PYTHONPATH=<checkout of that code>: it adapts to both the old app
(blocking refreshes handed to asyncio.to_thread) and the new one (server.background).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from propensity.model_registry import current_version, promote
from propensity.settings import Settings
from server import app
from server.served_log import ServedFeatureLogger

TICK = 0.001


def _run_queue_seconds(fd: int) -> float:
    """Time this thread spent runnable but waiting for a CPU (Linux schedstat): other processes, not us."""
    return int(os.pread(fd, 100, 0).split()[1]) / 1e9


class Probe:
    """A 1 ms timer on the loop; lateness of every wake-up while `recording`.

    This machine is shared: other processes take the CPU from the loop thread for milliseconds at a
    time. That share (the thread's run-queue wait, from /proc/thread-self/schedstat) is subtracted
    in `own`, which leaves the lateness caused inside this process: the GIL and the loop itself.
    """

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.own: list[float] = []
        self.gc_pauses: list[tuple[float, int]] = []  # (seconds, generation) of each collection, any thread
        self.recording = False
        self._task: asyncio.Task | None = None
        self._gc_start = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self.recording:
            self.gc_pauses.append((time.perf_counter() - self._gc_start, info["generation"]))

    async def _run(self) -> None:
        fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)  # the loop's thread
        while True:
            start, queued = time.perf_counter(), _run_queue_seconds(fd)
            await asyncio.sleep(TICK)
            if self.recording:
                lag = time.perf_counter() - start - TICK
                self.lags.append(lag)
                self.own.append(max(0.0, lag - (_run_queue_seconds(fd) - queued)))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def measure(self, action: Callable[[], Awaitable[object]], busy: bool) -> tuple[list[float], list[float], float]:
        """Lateness samples (raw, own) while `action` runs, optionally beside a busy loop, and the action's duration."""
        stop = asyncio.Event()
        worker = asyncio.get_running_loop().create_task(_busy(stop)) if busy else None
        await asyncio.sleep(0.05)
        self.lags, self.own, self.gc_pauses, self.recording = [], [], [], True
        t0 = time.perf_counter()
        await action()
        took = time.perf_counter() - t0
        await asyncio.sleep(0.02)  # a stall right at the end is still recorded
        self.recording = False
        stop.set()
        if worker:
            await worker
        return self.lags, self.own, took


async def _busy(stop: asyncio.Event) -> None:
    """Stands in for request handling: ~1 ms of Python, then yield to the loop."""
    while not stop.is_set():
        end = time.perf_counter() + 0.001
        while time.perf_counter() < end:
            pass
        await asyncio.sleep(0)


def _clone_version(models: Path, source: str, target: str) -> None:
    directory = models / "versions" / target
    if not directory.exists():
        shutil.copytree(models / "versions" / source, directory)
        metadata = json.loads((directory / "metadata.json").read_text())
        metadata["version"] = target
        (directory / "metadata.json").write_text(json.dumps(metadata))


def _tasks(
    settings: Settings, components: app.Components, scratch: Path, warmups: list, closers: list
) -> dict[str, Callable[[], Awaitable[object]]]:
    """Each periodic task, invoked the way the running server invokes it."""
    models = settings.model_dir
    base = current_version(models)
    other = "v29990101T000000"
    _clone_version(models, base, other)
    versions = [other, base]
    logger = ServedFeatureLogger(scratch / "served", 1.0, flush_rows=10**9, flush_seconds=3600)
    rng = np.random.default_rng(0)
    names = [f"f{i}" for i in range(45)]

    def fill_served_log() -> None:  # 5 requests x 200 items = 1,000 rows, the logger's default flush size
        for i in range(5):
            logger.maybe_log(f"r{i}", "u1", base, names, rng.random((200, 45)), [f"i{j}" for j in range(200)], rng.random(200))

    def promote_next() -> None:
        promote(models, versions[0])
        versions.reverse()

    if not hasattr(components.items, "install"):  # the old app: every refresh is a blocking call handed to asyncio.to_thread
        def threaded(fn: Callable[[], object]) -> Callable[[], Awaitable[object]]:
            return lambda: asyncio.to_thread(fn)

        def reload() -> Awaitable[object]:
            promote_next()
            return asyncio.to_thread(components.models.refresh)

        tasks = {
            "catalog refresh": threaded(components.items.refresh),
            "model poll (nothing new)": threaded(components.models.refresh),
            "model reload (promotion)": reload,
            "freshness read": threaded(components.freshness.refresh),
        }
    else:
        from server.background import SWITCH_INTERVAL_SECONDS, Background

        jobs = Background(components.items, components.models, components.freshness, None, 60.0, 5.0)
        if sys.getswitchinterval() == 0.005:  # as Background.start() sets it in the server (unless --switch-interval)
            sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
        closers.append(jobs.builder.close)

        async def changed_refresh() -> None:  # as if the store's content had changed: transfer, unpickle, swap, gc
            components.items.digest = ""
            await jobs.refresh_catalog()

        async def reload_new() -> None:
            promote_next()
            await jobs.poll_models()

        tasks = {
            "catalog refresh (unchanged content)": jobs.refresh_catalog,
            "catalog refresh (changed: + unpickle, swap, gc settle)": changed_refresh,
            "model poll (nothing new)": jobs.poll_models,
            "model reload (promotion)": reload_new,
            "freshness read": jobs.read_freshness,
        }
        warmups.append(jobs.refresh_catalog)  # once: the first refresh also starts the build process

    async def flush() -> None:
        fill_served_log()
        await asyncio.to_thread(logger.flush)  # the logger's own thread does this in the server

    tasks["served-log flush (1,000 rows)"] = flush
    registry = components.store.registry
    project = components.store.project

    async def registry_sync_refresh() -> None:  # what Feast's cache_mode: sync does inside a request on expiry
        registry._get_registry_proto(project=project, allow_cache=False)

    tasks["Feast registry refresh (sync mode, on the loop)"] = registry_sync_refresh

    async def full_gc() -> None:  # an automatic full collection runs on whichever thread allocates: often the loop
        gc.collect()

    tasks["full gc.collect() (on the loop)"] = full_gc
    return tasks


def _row(name: str, busy: bool, lags: list[float], own: list[float], durations: list[float], pauses: list[tuple[float, int]]) -> dict[str, object]:
    raw = np.array(lags) if lags else np.zeros(1)
    longest = max(pauses, default=(0.0, -1))
    mine = np.array(own) if own else np.zeros(1)
    return {
        "task": name,
        "loop": "busy" if busy else "idle",
        "task_ms_median": round(statistics.median(durations) * 1e3, 2),
        "lag_max_ms": round(float(raw.max()) * 1e3, 2),
        "own_lag_max_ms": round(float(mine.max()) * 1e3, 2),
        "own_lag_p99_ms": round(float(np.quantile(mine, 0.99)) * 1e3, 2),
        "own_wakes_over_5ms": int((mine > 0.005).sum()),
        "wakes": len(lags),
        "longest_gc_ms": round(longest[0] * 1e3, 2),
        "longest_gc_generation": longest[1],
    }


async def main(rounds: int, baseline_seconds: float) -> list[dict[str, object]]:
    settings = Settings()
    scratch = Path("/tmp/event_loop_probe")
    scratch.mkdir(exist_ok=True)
    components = app.build_components(settings)
    gc.collect()
    gc.freeze()  # as serve() does after start-up
    probe = Probe()
    probe.start()
    rows = []
    warmups: list[Callable[[], Awaitable[object]]] = []
    closers: list[Callable[[], None]] = []
    tasks = _tasks(settings, components, scratch, warmups, closers)
    for warmup in warmups:  # the first catalog refresh starts the build process: measured once, on its own
        lags, own, took = await probe.measure(warmup, False)
        rows.append(_row("catalog refresh, first (starts the build process)", False, lags, own, [took], probe.gc_pauses))
    for busy in (False, True):
        baseline = (f"(nothing: baseline, {baseline_seconds:g} s)", lambda: asyncio.sleep(baseline_seconds))
        for name, action in [baseline, *tasks.items()]:
            lags, own, durations, pauses = [], [], [], []
            for _ in range(rounds):
                sample, mine, took = await probe.measure(action, busy)
                lags += sample
                own += mine
                pauses += probe.gc_pauses
                durations.append(took)
            rows.append(_row(name, busy, lags, own, durations, pauses))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    promote(settings.model_dir, current_version(settings.model_dir))
    for close in closers:
        close()
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline-seconds", type=float, default=0.5, help="length of each baseline round (nothing in the background)")
    parser.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval before measuring (what-if)")
    args = parser.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    result = asyncio.run(main(args.rounds, args.baseline_seconds))
    print("| task | loop | task ms (median) | lag max ms (raw) | own lag max ms | own lag p99 ms | own wakes > 5 ms / wakes | longest gc ms (gen) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result:
        print(f"| {r['task']} | {r['loop']} | {r['task_ms_median']} | {r['lag_max_ms']} | {r['own_lag_max_ms']} | {r['own_lag_p99_ms']} "
              f"| {r['own_wakes_over_5ms']} / {r['wakes']} | {r['longest_gc_ms']} ({r['longest_gc_generation']}) |")
