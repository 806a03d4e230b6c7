"""Several server processes sharing one port (SO_REUSEPORT), so CPU-bound Python uses every core.

The parent forks the workers before any of them creates gRPC objects (grpc's fork rules), waits
until each reports SERVING, forwards SIGTERM/SIGINT to them and waits for their graceful stop.

It also supervises them: a worker that dies while the server is not stopping (SIGKILL, the OOM
killer, a crash in native code) is logged, counted (`propensity_worker_restarts_total`) and
replaced by a fresh fork on the same port. The other workers keep serving meanwhile; only the
calls that were in flight on the dead worker's connections fail, and their clients reconnect to a
live worker. A worker that dies soon after it started waits longer before each new attempt
(RESPAWN_BACKOFF_SECONDS doubling up to RESPAWN_BACKOFF_MAX_SECONDS), so a crash loop, e.g. a
current model that no longer loads, cannot eat the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_exits
from pathlib import Path

from propensity.settings import Settings
from server.app import Started, serve
from server.build_process import remember_unpinned_cpus
from server.observability import Observability, install_observability

log = logging.getLogger("propensity.server")
RESPAWN_BACKOFF_SECONDS = 0.2
RESPAWN_BACKOFF_MAX_SECONDS = 30.0
# A worker that served at least this long before dying is restarted after the initial backoff again.
STABLE_SECONDS = 60.0


@contextlib.contextmanager
def reserve_port(host: str, port: int) -> Iterator[int]:
    """Hold the port (port 0: pick one) with SO_REUSEPORT so workers can bind it and nothing else takes it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1" if host == "localhost" else host, port))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def pin_to_own_cpu(number: int, workers: int) -> int | None:
    """With exactly one worker per CPU this process may use, keep worker `number` on a CPU of its own; returns it (None: not pinned).

    Open loop at 485 req/s on the shared 2-core machine, pinned and unpinned servers alternating, 22 pairs:
    fewer event-loop lags over 5 ms in 19 (median 1.4 % of the samples against 2.5 %); p99 shorter in only
    14 (median 107 against 161 ms), which that machine's load could not settle (docs/benchmarks/tail.md,
    2026-12-02). With more or fewer workers than CPUs nothing is pinned: a pinned worker could not use a
    core another one leaves idle. Called first thing in the forked worker, while it has
    one thread, so gRPC's threads inherit the CPU; the catalog build process leaves it (server.build_process).
    """
    cpus = sorted(os.sched_getaffinity(0))
    if workers != len(cpus):
        return None
    cpu = cpus[number % len(cpus)]
    remember_unpinned_cpus(frozenset(cpus))
    os.sched_setaffinity(0, {cpu})
    return cpu


def _worker(settings: Settings, ready: multiprocessing.Queue, number: int, inherited: tuple[int, ...] = (), build_lock: Path | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop, via SIGTERM
    cpu = pin_to_own_cpu(number, settings.server.workers) if settings.server.pin_workers else None
    if cpu is not None:
        log.info("worker %d pinned to CPU %d", number, cpu)
    # A replacement is forked after the parent opened /metrics: that socket is not ours. (The parent's socket object
    # copied into this process is never closed again: multiprocessing ends a forked child with os._exit.)
    for fd in inherited:
        with contextlib.suppress(OSError):
            os.close(fd)
    try:
        # Records into the parent's metrics directory; `number` labels this worker's event-loop lag.
        observability = install_observability(settings, serve_http=False, worker=number)
        asyncio.run(serve(settings, on_started=lambda started: ready.put((number, os.getpid(), started, None)), reuse_port=True,
                          observability=observability, build_lock=build_lock))
        observability.close()
    except BaseException as error:  # report start-up failures to the parent instead of dying silently
        ready.put((number, os.getpid(), None, f"{type(error).__name__}: {error}"))
        raise


@dataclass
class _Slot:
    """One worker number and the process currently filling it."""

    number: int
    process: multiprocessing.Process
    started_at: float
    served: bool = False  # the slot's first process reported SERVING
    backoff: float = RESPAWN_BACKOFF_SECONDS
    respawn_at: float | None = None  # set while the slot waits to be refilled
    restarts: int = 0
    first: Started | None = None  # the first process's start-up report
    reaped_pid: int = 0  # the last process whose exit was handled


class _Supervisor:
    """Forks the workers, replaces those that die, and stops them all on SIGTERM/SIGINT."""

    def __init__(self, settings: Settings, parent: Observability, build_lock: Path) -> None:
        self._settings = settings
        self._parent = parent
        self._build_lock = build_lock
        self._context = multiprocessing.get_context("fork")
        self.ready: multiprocessing.Queue = self._context.Queue()
        self.slots = [_Slot(i, self._fork(i), time.monotonic()) for i in range(settings.server.workers)]
        self.stopping = False
        self.failed = False  # a worker failed to start: the server stops

    def _fork(self, number: int) -> multiprocessing.Process:
        inherited = tuple(self._parent.listening_fds())
        process = self._context.Process(target=_worker, args=(self._settings, self.ready, number, inherited, self._build_lock), name=f"propensity-worker-{number}")
        process.start()
        return process

    def stop(self, signum: int = signal.SIGTERM, frame: object = None) -> None:
        self.stopping = True
        for slot in self.slots:
            if slot.process.is_alive():
                os.kill(slot.process.pid, signal.SIGTERM)

    def fail(self, message: str, *args: object) -> None:
        log.error(message, *args)
        self.failed = True
        self.stop()

    def handle_reports(self, on_all_serving: Callable[[list[Started]], None]) -> None:
        """Read the workers' start-up reports: the first start of every slot, then replacements."""
        while True:
            try:
                number, pid, started, error = self.ready.get_nowait()
            except queue.Empty:
                return
            slot = self.slots[number]
            if not slot.served:
                if error:
                    self.fail("worker %d failed to start: %s", number, error)
                    continue
                slot.served, slot.first = True, started
                if all(s.served for s in self.slots):
                    on_all_serving([s.first for s in self.slots])
            elif error:
                log.error("replacement worker %d (pid %d) failed to start: %s", number, pid, error)
            else:
                log.info("worker %d replaced: pid %d serving %.1fs after its fork (restart %d)", number, pid, started.seconds, slot.restarts)

    def reap(self, timeout: float) -> None:
        """Wait up to `timeout` for a worker to exit; log, count and schedule the replacement of each that died."""
        running = [slot.process.sentinel for slot in self.slots if slot.respawn_at is None and slot.process.exitcode is None]
        if running:
            wait_for_exits(running, timeout)
        else:
            time.sleep(timeout)
        now = time.monotonic()
        for slot in self.slots:
            if slot.respawn_at is not None or slot.reaped_pid == slot.process.pid or slot.process.is_alive():
                continue
            slot.reaped_pid = slot.process.pid
            self._parent.worker_exited(slot.process.pid)
            if self.stopping:
                continue
            if not slot.served:
                self.fail("worker %d (pid %d) exited with code %s before it started serving", slot.number, slot.process.pid, slot.process.exitcode)
                continue
            code = slot.process.exitcode
            how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
            lived = now - slot.started_at
            if lived >= STABLE_SECONDS:
                slot.backoff = RESPAWN_BACKOFF_SECONDS
            slot.respawn_at = now + slot.backoff
            log.error("worker %d (pid %d) %s after %.1fs; replacing it in %.1fs", slot.number, slot.process.pid, how, lived, slot.backoff)
            self._parent.metrics.count_worker_restart()
            slot.backoff = min(slot.backoff * 2, RESPAWN_BACKOFF_MAX_SECONDS)

    def respawn_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.respawn_at is not None and now >= slot.respawn_at and not self.stopping:
                slot.process = self._fork(slot.number)
                slot.started_at, slot.respawn_at = time.monotonic(), None
                slot.restarts += 1

    def all_exited(self) -> bool:
        return all(not slot.process.is_alive() for slot in self.slots)


def run_workers(settings: Settings, on_started: Callable[[Started], None] | None = None, start_timeout: float = 300.0) -> int:
    """Run settings.server.workers processes on one port until SIGTERM/SIGINT, replacing any that die; return an exit code."""
    parent = install_observability(settings, serve_http=True)  # before forking: the shared metrics directory
    # The workers' catalog builds take turns on this file's lock (server.background.build_turn).
    with reserve_port(settings.server.host, settings.server.port) as port, tempfile.TemporaryDirectory(prefix="propensity-workers-") as shared:
        settings = settings.model_copy(update={"server": settings.server.model_copy(update={"port": port})})
        supervisor = _Supervisor(settings, parent, Path(shared) / "catalog-build.lock")
        parent.start_http()  # after forking, so workers do not inherit the listening socket
        signal.signal(signal.SIGTERM, supervisor.stop)
        signal.signal(signal.SIGINT, supervisor.stop)

        def all_serving(reports: list[Started]) -> None:
            if on_started:
                on_started(Started(port, reports[0].model_version, reports[0].n_items, max(r.seconds for r in reports)))

        deadline = time.monotonic() + start_timeout
        while not (supervisor.stopping and supervisor.all_exited()):
            supervisor.handle_reports(all_serving)
            if not supervisor.stopping and time.monotonic() > deadline and not all(s.served for s in supervisor.slots):
                supervisor.fail("workers not serving after %.0fs; stopping", start_timeout)
            supervisor.reap(0.2)
            supervisor.respawn_due()
        for slot in supervisor.slots:
            slot.process.join()
        parent.close()
        return 1 if supervisor.failed else 0
