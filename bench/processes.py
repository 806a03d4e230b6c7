"""Servers under test as child processes: a free port, wait for health SERVING, always stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server started in its own process group, so stop() reaches its worker processes too."""

    def __init__(self, name: str, cmd: Sequence[str], env: Mapping[str, str], port: int, log_file: Path, cwd: Path) -> None:
        self.name = name
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self.log_file = log_file
        self._log = log_file.open("w")
        self._proc = subprocess.Popen(list(cmd), env=dict(env), cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def wait_serving(self, timeout: float = 180.0) -> float:
        """Seconds until grpc.health.v1 says SERVING; raises if the process dies or time runs out."""
        t0 = time.monotonic()
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() - t0 < timeout:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self._proc.returncode}; log: {self.log_file}\n{self._tail()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - t0
                except grpc.RpcError:
                    pass
                time.sleep(0.25)
        raise TimeoutError(f"{self.name} not SERVING after {timeout:.0f}s; log: {self.log_file}\n{self._tail()}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after `grace` seconds."""
        if self._proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self._proc.wait(timeout=5)
        # Workers forked by the server share its group; make sure none outlives it.
        self._signal(signal.SIGKILL)
        self._log.close()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self._proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _tail(self, n: int = 3000) -> str:
        self._log.flush()
        return self.log_file.read_text(errors="replace")[-n:]

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
