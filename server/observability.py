"""Wire logging, metrics, the request interceptor and the served-feature log from the settings, in one place.

How `server/app.py` uses it (one process, settings.server.workers == 1)::

    obs = install_observability(settings)             # first: configures logging, builds metrics
    server = grpc.aio.server(interceptors=obs.interceptors, options=[...])
    ...                                               # hand obs.metrics / obs.served_log to the data plane
    await server.start()
    obs.start_http()                                  # /metrics when settings.server.metrics_port > 0
    try:
        await stop.wait()
        ...                                           # health NOT_SERVING, server.stop(grace)
    finally:
        obs.close()                                   # stops /metrics, flushes the served-feature log

Several worker processes (workers > 1, SO_REUSEPORT): the parent prepares the shared metrics
directory and alone serves the aggregate; each worker records into it::

    parent = install_observability(settings, serve_http=True)   # before forking: sets PROMETHEUS_MULTIPROC_DIR
    workers = [start_worker() for _ in range(settings.server.workers)]
    parent.start_http()                                          # after forking: children do not inherit the socket
    for worker in workers:
        worker.join()
        parent.worker_exited(worker.pid)                         # its live gauges stop counting
    parent.close()

    # in each worker, before its grpc.aio server is built:
    obs = install_observability(settings, serve_http=False, worker=number)  # the single-process case, minus /metrics
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry

from propensity.settings import Settings
from server.interceptors import ObservabilityInterceptor
from server.log_setup import configure_logging
from server.metrics import Metrics, mark_process_dead, multiprocess_enabled, prepare_multiprocess_dir, start_metrics_http, use_in_process_values
from server.served_log import ServedFeatureLogger
from server.tls import CertificateFiles, check_transport

log = logging.getLogger(__name__)


@dataclass
class Observability:
    """What the server needs from observability: metrics, interceptors, the served-feature log, and the /metrics endpoint."""

    metrics: Metrics
    registry: CollectorRegistry
    interceptors: list[grpc.aio.ServerInterceptor]
    served_log: ServedFeatureLogger | None
    metrics_port: int
    metrics_addr: str
    serve_http: bool
    tls: CertificateFiles | None = None  # the server's certificates (security section); /metrics is HTTPS with them
    _owned_dir: Path | None = None  # a metrics directory created here, removed on close
    _http: tuple[WSGIServer, threading.Thread] | None = field(default=None, repr=False)

    def start_http(self) -> int | None:
        """Start /metrics (when serve_http and metrics_port > 0) and return its port; None when off. Idempotent."""
        if self._http is None and self.serve_http and self.metrics_port > 0:
            self._http = start_metrics_http(self.metrics_port, self.registry, self.metrics_addr, tls=self.tls)
            log.info("metrics on %s://%s:%d/metrics%s", "https" if self.tls else "http", self.metrics_addr, self._http[0].server_port,
                     " (all worker processes)" if multiprocess_enabled() else "")
        return self._http[0].server_port if self._http else None

    def listening_fds(self) -> list[int]:
        """The /metrics listening socket, if serving: a worker forked later (a replacement) closes it first thing."""
        return [self._http[0].fileno()] if self._http is not None else []

    def worker_exited(self, pid: int) -> None:
        """Tell the aggregate that worker `pid` is gone (multi-process mode; a no-op otherwise)."""
        if multiprocess_enabled():
            mark_process_dead(pid)

    def close(self) -> None:
        """Stop /metrics and flush the served-feature log. Idempotent."""
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._http = None
        if self.served_log is not None:
            self.served_log.close()
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)
            self._owned_dir = None


def install_observability(
    settings: Settings, serve_http: bool = True, metrics_addr: str | None = None, worker: int = 0
) -> Observability:
    """Configure logging and build metrics, interceptors and the served-feature log for this process.

    serve_http=True: this process serves /metrics (the only process, or the parent of workers).
    serve_http=False: a worker; it records metrics into the directory its parent prepared.
    worker: this worker's number, the `worker` label of its event-loop lag (the parent of workers has none).
    With workers > 1 the parent gets no served-feature log (it answers no RPCs) and prepares a
    fresh temporary metrics directory, shared with the forked workers and removed on close().
    metrics_addr defaults to settings.server.host.
    """
    server = settings.server
    configure_logging(server.log_format, server.log_level)
    check_transport(settings)  # before any port opens: no plaintext beyond loopback unless allowed
    tls = CertificateFiles.from_settings(settings.security)
    parent_of_workers = serve_http and server.workers > 1
    owned: Path | None = None
    if parent_of_workers:
        owned = prepare_multiprocess_dir(Path(tempfile.mkdtemp(prefix="propensity-metrics-")))
    elif server.workers > 1 and not multiprocess_enabled():
        log.warning("workers=%d but no shared metrics directory was prepared: this worker's metrics are not served", server.workers)
    elif server.workers <= 1:
        use_in_process_values()
    registry = CollectorRegistry()
    metrics = Metrics(registry, worker=None if parent_of_workers else worker)
    served_log = None
    if server.served_log_dir is not None and not parent_of_workers:
        served_log = ServedFeatureLogger(server.served_log_dir, server.served_log_sample_rate, on_error=metrics.count_served_log_error)
    return Observability(
        metrics=metrics,
        registry=registry,
        interceptors=[ObservabilityInterceptor(metrics.observe_request)],
        served_log=served_log,
        metrics_port=server.metrics_port,
        metrics_addr=metrics_addr or server.host,
        serve_http=serve_http,
        tls=tls,
        _owned_dir=owned,
    )
