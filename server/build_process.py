"""A helper process for CPU-heavy, mostly pure-Python builds, so they never compete for the serving process's GIL.

Why not a thread: a thread running Python holds the GIL, and the event loop waits up to the switch
interval for it every time it wants it back (measured: a catalog build in a thread delayed the loop
by 10-50 ms, docs/benchmarks/event_loop.md). A process has its own GIL. It is a fresh interpreter
(`python -m server.build_process`: forking a process that runs gRPC is unsafe, and multiprocessing's
`spawn` would re-run the server's main script in it), talks over a socket pair, and runs at a lower
CPU priority, so when cores are short the kernel runs the serving workers first and the build waits.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
NICENESS = 10  # CPU weight ~1/10 of a serving worker's: builds use idle cores, not busy ones


class BuildFailed(RuntimeError):
    """The function raised in the helper process (the message holds its traceback), or the helper died."""


def _own_scheduling_group() -> None:
    """Leave the serving workers' session, into an autogroup of the lowest priority (where the kernel has autogroups).

    With /proc/sys/kernel/sched_autogroup_enabled = 1 the CPU is shared between sessions first and `nice`
    only orders processes inside one: a build in the workers' session spends their session's share, and
    a worker waking up then waits for the other sessions (open-loop p99 on a shared machine 76-558 ms with
    the build in the workers' session, 47-358 ms in its own: docs/benchmarks/tail.md). It still exits with
    its worker: it reads end-of-file on its socket.
    """
    try:
        os.setsid()
        with open("/proc/self/autogroup", "w") as autogroup:
            autogroup.write("19")
    except OSError:  # no autogroups (e.g. a cgroup-managed service), or not allowed: nice alone then
        pass


# The CPUs this process could use before server.workers.pin_to_own_cpu pinned it; None while it is not pinned.
_unpinned_cpus: frozenset[int] | None = None


def remember_unpinned_cpus(cpus: frozenset[int]) -> None:
    """Record the CPU set a worker had before it pinned itself: the build processes it starts run there again."""
    global _unpinned_cpus
    _unpinned_cpus = frozenset(cpus)


def _unpin(cpus: frozenset[int] | None) -> None:
    """Undo the pin the helper inherits from its worker (server.workers.pin_to_own_cpu): a build at the lowest priority
    should use whichever of the server's cores is idle, not queue behind its own worker. It goes back to the worker's
    set from before the pin (a server started under `taskset` keeps its builds inside that set), never wider."""
    if not cpus:
        return
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:  # none of those CPUs allowed here any more (the cpuset changed): keep the inherited set
        pass


def _serve(conn: Connection, niceness: int, cpus: frozenset[int] | None = None) -> None:
    """The helper's main loop: run each (function, args) received and send back (ok, result or traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the server decides
    os.nice(niceness)
    _own_scheduling_group()
    _unpin(cpus)
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):  # the server closed the socket or exited: nothing left to build for
            return
        try:
            reply: tuple[bool, object] = (True, fn(*args))
        except BaseException:
            reply = (False, traceback.format_exc())
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


class BuildProcess:
    """One helper process, started on first use and restarted if it dies; `call` runs one function in it at a time.

    `call` blocks until the result is back (waiting on the socket releases the GIL): call it from a thread,
    e.g. `await asyncio.to_thread(builder.call, fn, arg)`. fn and its arguments and result are pickled, so
    fn must be a module-level function; return bytes for large results to control where they are unpickled.
    """

    def __init__(self, niceness: int = NICENESS) -> None:
        self._niceness = niceness
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._alive() else None

    def _alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) in the helper process; raises BuildFailed when it raised or the helper died."""
        with self._lock:
            if self._closed:
                raise BuildFailed("the build process is closed")
            conn = self._ensure_started()
            try:
                conn.send((fn, args))
                ok, value = conn.recv()
            except (EOFError, OSError) as error:
                self._stop()  # the next call starts a fresh helper
                raise BuildFailed(f"the build process died while running {getattr(fn, '__name__', fn)}: {error!r}") from None
        if not ok:
            raise BuildFailed(f"{getattr(fn, '__name__', fn)} failed in the build process:\n{value}")
        return value  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the helper now, also in the middle of a build (its result is not needed any more). Idempotent."""
        self._closed = True
        self._stop()

    def _ensure_started(self) -> Connection:
        if not self._alive() or self._conn is None:
            self._stop()
            ours, theirs = socket.socketpair()
            # The child imports what it is sent by module name: give it this process's import path.
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
            cpus = ",".join(str(cpu) for cpu in sorted(_unpinned_cpus)) if _unpinned_cpus else ""
            with theirs:
                process = subprocess.Popen(
                    [sys.executable, "-m", __name__, str(theirs.fileno()), str(self._niceness), cpus], pass_fds=(theirs.fileno(),), env=env
                )
            self._process, self._conn = process, Connection(ours.detach())
            log.info("build process %d started (nice +%d)", process.pid, self._niceness)
        return self._conn

    def _stop(self) -> None:
        conn, process, self._conn, self._process = self._conn, self._process, None, None
        # The process first: a thread blocked reading the socket then sees end-of-file and returns.
        if process is not None:
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if conn is not None:
            conn.close()


if __name__ == "__main__":  # the helper itself: python -m server.build_process <socket fd> <niceness> [<cpu,cpu,...>]
    _cpus = frozenset(int(cpu) for cpu in sys.argv[3].split(",")) if len(sys.argv) > 3 and sys.argv[3] else None
    _serve(Connection(int(sys.argv[1])), int(sys.argv[2]), _cpus)
