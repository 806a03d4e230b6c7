"""Several server processes sharing one port (SO_REUSEPORT), so CPU-bound Python uses every core.

The parent forks the workers before any of them creates gRPC objects (grpc's fork rules), waits
until each reports SERVING, forwards SIGTERM/SIGINT to them and waits for their graceful stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
from collections.abc import Callable, Iterator

from propensity.settings import Settings
from server.app import Started, serve
from server.observability import install_observability

log = logging.getLogger("propensity.server")


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


def _worker(settings: Settings, ready: multiprocessing.Queue, number: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop, via SIGTERM
    try:
        # Records into the parent's metrics directory; `number` labels this worker's event-loop lag.
        observability = install_observability(settings, serve_http=False, worker=number)
        asyncio.run(serve(settings, on_started=lambda started: ready.put((number, started, None)), reuse_port=True, observability=observability))
        observability.close()
    except BaseException as error:  # report start-up failures to the parent instead of dying silently
        ready.put((number, None, f"{type(error).__name__}: {error}"))
        raise


def run_workers(settings: Settings, on_started: Callable[[Started], None] | None = None, start_timeout: float = 300.0) -> int:
    """Run settings.server.workers processes on one port until SIGTERM/SIGINT; return an exit code."""
    count = settings.server.workers
    context = multiprocessing.get_context("fork")
    parent = install_observability(settings, serve_http=True)  # before forking: the shared metrics directory
    with reserve_port(settings.server.host, settings.server.port) as port:
        settings = settings.model_copy(update={"server": settings.server.model_copy(update={"port": port})})
        ready: multiprocessing.Queue = context.Queue()
        workers = [context.Process(target=_worker, args=(settings, ready, i), name=f"propensity-worker-{i}") for i in range(count)]
        for worker in workers:
            worker.start()
        parent.start_http()  # after forking, so workers do not inherit the listening socket
        stopping = False

        def stop(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True
            for worker in workers:
                if worker.is_alive():
                    os.kill(worker.pid, signal.SIGTERM)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        reports = []
        for _ in workers:
            number, started, error = ready.get(timeout=start_timeout)
            if error:
                log.error("worker %d failed to start: %s", number, error)
                stop(signal.SIGTERM, None)
                break
            reports.append(started)
        if len(reports) == count and on_started:
            first = reports[0]
            on_started(Started(port, first.model_version, first.n_items, max(r.seconds for r in reports)))
        for worker in workers:
            worker.join()
            parent.worker_exited(worker.pid)
        parent.close()
        failed = [w.name for w in workers if w.exitcode not in (0, None) and not stopping]
        return 1 if failed or len(reports) < count else 0
