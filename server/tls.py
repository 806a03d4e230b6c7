"""TLS for the gRPC and metrics ports: certificate files re-read on SIGHUP or when they change, and the loopback rule.

The gRPC port gets `grpc.dynamic_ssl_server_credentials`: gRPC asks a fetcher for the certificate
configuration at every new handshake, and the fetcher answers with fresh files only when one changed
(three stat calls) or a reload was requested (SIGHUP). The metrics port wraps each accepted socket with
the current `ssl.SSLContext`, so both ports rotate at the same moment from the same files.
A half-written rotation (a key that does not match the certificate) is refused and the previous
configuration keeps serving until the files are consistent again.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from propensity.settings import SecuritySettings, Settings

log = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT_SECONDS = 5.0


class InsecureTransportError(ValueError):
    """The settings would expose a plaintext port beyond loopback, or name only half of a TLS configuration."""


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address ("localhost", 127.0.0.0/8, ::1)."""
    name = host.strip().strip("[]")
    if not name:
        return False  # "" binds every interface
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def tls_enabled(security: SecuritySettings) -> bool:
    return security.tls_cert_file is not None and security.tls_key_file is not None


def check_transport(settings: Settings) -> None:
    """Refuse settings that would serve plaintext beyond loopback, or half a TLS configuration; errors name the setting."""
    security, host = settings.security, settings.server.host
    if (security.tls_cert_file is None) != (security.tls_key_file is None):
        raise InsecureTransportError(
            "TLS needs both security.tls_cert_file and security.tls_key_file "
            "(PROPENSITY_SECURITY__TLS_CERT_FILE, PROPENSITY_SECURITY__TLS_KEY_FILE); only one is set"
        )
    if security.client_ca_file is not None and not tls_enabled(security):
        raise InsecureTransportError("security.client_ca_file (mutual TLS) needs security.tls_cert_file and security.tls_key_file")
    if security.auth not in ("auto", "on", "off"):
        raise InsecureTransportError(f"security.auth must be 'auto', 'on' or 'off', got {security.auth!r}")
    if not tls_enabled(security) and not security.allow_insecure_bind and not is_loopback(host):
        raise InsecureTransportError(
            f"refusing to serve plaintext on non-loopback server.host {host!r}: set security.tls_cert_file and "
            "security.tls_key_file, or allow plaintext explicitly with security.allow_insecure_bind "
            "(PROPENSITY_SECURITY__ALLOW_INSECURE_BIND=true)"
        )


@dataclass(frozen=True)
class LoadedCertificates:
    """One consistent read of the files: PEM bytes for gRPC, an SSLContext for the metrics port."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    ssl_context: ssl.SSLContext
    generation: int


class CertificateFiles:
    """The server's certificate chain, key and (optional) client CA, re-read when a file changes or `reload()` was called.

    Thread-safe: gRPC calls the fetcher from its own threads, the metrics server from its accept thread.
    """

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> None:
        self.cert_file, self.key_file, self.client_ca_file = Path(cert_file), Path(key_file), client_ca_file and Path(client_ca_file)
        self._lock = threading.Lock()
        self._reload_requested = False
        self._signature = self._stat()
        self._current = self._load(generation=1)  # a bad file at start-up is an error, not a warning

    @classmethod
    def from_settings(cls, security: SecuritySettings) -> CertificateFiles | None:
        if not tls_enabled(security):
            return None
        return cls(security.tls_cert_file, security.tls_key_file, security.client_ca_file)

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def reload(self) -> None:
        """Re-read the files at the next handshake (SIGHUP). Safe to call from a signal handler."""
        self._reload_requested = True

    def current(self) -> LoadedCertificates:
        """The configuration to serve now: re-read first when the files changed or a reload was requested."""
        signature = self._stat()
        if signature == self._signature and not self._reload_requested:
            return self._current
        with self._lock:
            if signature != self._signature or self._reload_requested:
                try:
                    self._current = self._load(self._current.generation + 1)
                    self._signature, self._reload_requested = signature, False
                    log.info("TLS certificates reloaded from %s (generation %d)", self.cert_file, self._current.generation)
                except (OSError, ValueError) as error:  # mid-rotation: keep serving the previous pair
                    log.warning("TLS certificates not reloaded, previous ones kept: %s", _describe(error))
            return self._current

    def _paths(self) -> list[Path]:
        return [self.cert_file, self.key_file, *([self.client_ca_file] if self.client_ca_file else [])]

    def _stat(self) -> tuple:
        signature = []
        for path in self._paths():
            try:
                stat = path.stat()
                signature.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
            except OSError:
                signature.append(None)
        return tuple(signature)

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        return self.cert_file.read_bytes(), self.key_file.read_bytes(), self.client_ca_file.read_bytes() if self.client_ca_file else None

    def _load(self, generation: int) -> LoadedCertificates:
        before = self._read()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)  # also checks that the key matches the certificate
        if self.client_ca_file is not None:
            context.load_verify_locations(cafile=self.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        if self._read() != before:  # the files moved under us: try again at the next handshake
            raise ValueError("certificate files changed while being read")
        return LoadedCertificates(*before, ssl_context=context, generation=generation)


def _describe(error: Exception) -> str:
    # OpenSSL's messages name the failing check (e.g. KEY_VALUES_MISMATCH), never key material.
    return f"{type(error).__name__}: {error}"


def grpc_server_credentials(files: CertificateFiles) -> grpc.ServerCredentials:
    """Credentials for `server.add_secure_port` that follow the files (mutual TLS when a client CA is set).

    gRPC Python has no "request but do not require" mode: with a client CA, every connection needs a valid
    client certificate; a caller may still name itself with a token on top of it.
    """

    def configuration(loaded: LoadedCertificates) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(loaded.private_key, loaded.cert_chain)], root_certificates=loaded.client_ca)

    served = {"generation": files.current().generation}

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        loaded = files.current()
        if loaded.generation == served["generation"]:
            return None  # unchanged: gRPC keeps the configuration it has
        served["generation"] = loaded.generation
        return configuration(loaded)

    return grpc.dynamic_ssl_server_credentials(
        configuration(files.current()), fetch, require_client_authentication=files.mutual
    )


class TlsListeningSocket:
    """A listening socket whose accepted connections are wrapped with the current certificates (the metrics port).

    socketserver only calls accept(), fileno(), close() and a few getters on its socket; the rest is delegated.
    A failed handshake raises ssl.SSLError (an OSError) from accept(), which socketserver drops quietly.
    """

    def __init__(self, sock: socket.socket, files: CertificateFiles) -> None:
        self._sock, self._files = sock, files

    def accept(self) -> tuple[ssl.SSLSocket, object]:
        conn, address = self._sock.accept()
        conn.settimeout(HANDSHAKE_TIMEOUT_SECONDS)  # a silent client must not hold the accept loop for long
        try:
            wrapped = self._files.current().ssl_context.wrap_socket(conn, server_side=True)
        except BaseException:
            conn.close()
            raise
        wrapped.settimeout(None)
        return wrapped, address

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


def serve_https(port: int, addr: str, app: object, files: CertificateFiles) -> tuple[object, threading.Thread]:
    """prometheus_client's start_wsgi_server, with TLS from `files` (reloaded like the gRPC port's) on each connection."""
    from wsgiref.simple_server import make_server

    from prometheus_client.exposition import ThreadingWSGIServer, _get_best_family, _SilentHandler

    class _Server(ThreadingWSGIServer):
        """A class of its own: the address family is set per server."""

    _Server.address_family, addr = _get_best_family(addr, port)
    httpd = make_server(addr, port, app, _Server, handler_class=_SilentHandler)
    httpd.socket = TlsListeningSocket(httpd.socket, files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return httpd, thread


async def start_plaintext_health(host: str, port: int, health: object, reuse_port: bool = False) -> grpc.aio.Server:
    """A second server with only grpc.health.v1, in plaintext: probes (the kubelet) have no client certificate.

    reuse_port: worker processes share the port, as they share the main one; otherwise a taken port is an error.
    """
    from grpc_health.v1 import health_pb2_grpc

    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if reuse_port else 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot bind the health port {host}:{port} (security.health_port)")
    await server.start()
    return server
