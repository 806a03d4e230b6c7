"""Event-loop lag: how late a fixed-interval timer on the serving loop wakes up, and whether periodic work ran meanwhile.

A request that becomes ready while the loop is stuck (a long callback, the GIL held by another
thread, a full garbage collection) waits exactly as long as this timer does, so the lateness of
the timer is the delay the loop adds to every call at that moment.

The monitor sees a stall of D seconds as a lag between D - interval and D (it depends on where in
the sleep it began), so the interval bounds the error: 5 ms keeps a stall over 10 ms from
looking like one under 5 ms. Cost, measured on the 2-vCPU VM: ~140-200 us of CPU per wake-up of an
idle loop (mostly waking from epoll; ~3-4 % of a core at 5 ms), below measurement noise on a busy
loop, where the timer rides along the loop's own iterations. An idle loop reads up to ~1 ms even
without stalls: epoll's timeout has millisecond resolution.

Under load the lag also holds request work: a Recommend runs on the loop from start to end, so a
timer due behind two queued requests is late by both. That is the load, not a stall. To tell the
two apart, periodic work (catalog refresh, model poll, freshness read: every part of it, on the
loop, in the background thread or waiting for the build process) is tracked by `PeriodicWork`, and
a lag sample whose window overlapped any of it is also reported apart (`observe_during_periodic`).
Each step a periodic task runs on the loop itself is timed too (`timed_steps`): that is the only
way it can hold the loop; the background thread can only take the GIL for a switch interval at a time.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterator
from typing import Any, TypeVar

INTERVAL_SECONDS = 0.005
T = TypeVar("T")


class PeriodicWork:
    """Which periodic tasks are running now, or ran since a given moment (perf_counter seconds). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, int] = {}
        self._last_end: dict[str, float] = {}

    @contextlib.contextmanager
    def running(self, task: str = "periodic") -> Iterator[None]:
        """Mark the body as periodic task `task` at work (nesting and several tasks at once are fine)."""
        with self._lock:
            self._active[task] = self._active.get(task, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._active[task] -= 1
                self._last_end[task] = time.perf_counter()

    def overlapping(self, since: float) -> tuple[str, ...]:
        """The tasks running now or that ended at or after `since`."""
        with self._lock:
            return tuple(task for task, n in self._active.items() if n > 0 or self._last_end.get(task, -1.0) >= since)


class _TimedSteps(collections.abc.Coroutine):
    """A coroutine that reports how long each of its steps ran (from resuming to its next await) to `record`."""

    def __init__(self, inner: Coroutine[Any, Any, T], record: Callable[[float], None]) -> None:
        self._inner = inner
        self._record = record

    def send(self, value: object) -> object:
        start = time.perf_counter()
        try:
            return self._inner.send(value)
        finally:
            self._record(time.perf_counter() - start)

    def throw(self, *args: Any) -> object:  # type: ignore[override]
        start = time.perf_counter()
        try:
            return self._inner.throw(*args)
        finally:
            self._record(time.perf_counter() - start)

    def close(self) -> None:
        self._inner.close()

    def __await__(self) -> Generator[Any, None, T]:
        return self  # type: ignore[return-value]

    def __iter__(self) -> Generator[Any, None, T]:
        return self  # type: ignore[return-value]

    def __next__(self) -> object:
        return self.send(None)


def timed_steps(coroutine: Coroutine[Any, Any, T], record: Callable[[float], None]) -> Awaitable[T]:
    """Await `coroutine` with each of its steps on the loop timed into `record(seconds)`."""
    return _TimedSteps(coroutine, record)


class LoopLagMonitor:
    """Sleeps `interval` seconds on the running loop, forever, and hands each wake-up's lateness to `observe`.

    With `periodic`, a lateness whose window (the sleep and the late wake-up) overlapped periodic work
    also goes to `observe_during_periodic(lag, tasks)`, with the tasks it overlapped.
    """

    def __init__(
        self,
        observe: Callable[[float], None],
        interval: float = INTERVAL_SECONDS,
        periodic: PeriodicWork | None = None,
        observe_during_periodic: Callable[[float, tuple[str, ...]], None] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self._observe = observe
        self._periodic = periodic
        self._observe_during_periodic = observe_during_periodic
        self.interval = interval
        self.samples = 0
        self.samples_during_periodic = 0
        self.max_lag = 0.0

    async def run(self) -> None:
        """Measure until cancelled; call it as a task on the loop being watched."""
        while True:
            start = time.perf_counter()
            await asyncio.sleep(self.interval)
            lag = max(0.0, time.perf_counter() - start - self.interval)
            self.samples += 1
            if lag > self.max_lag:
                self.max_lag = lag
            self._observe(lag)
            tasks = self._periodic.overlapping(start) if self._periodic is not None else ()
            if tasks:
                self.samples_during_periodic += 1
                if self._observe_during_periodic is not None:
                    self._observe_during_periodic(lag, tasks)
