"""Certificates made on the fly for the TLS and auth tests (the `cryptography` package), and a real TLS test server."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert.write_bytes(self.cert)
        key.write_bytes(self.key)
        return cert, key


class Authority:
    """A throw-away CA that issues server and client certificates."""

    def __init__(self, name: str = "propensity test CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(timezone.utc)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(self._name).issuer_name(self._name).public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self._cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.pem)
        return path

    def issue(self, common_name: str, *, server: bool = False, sans: Sequence[str] = (), expired: bool = False) -> Pem:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(timezone.utc)
        start, end = (now - timedelta(days=10), now - timedelta(days=1)) if expired else (now - timedelta(hours=1), now + timedelta(days=7))
        names: list[x509.GeneralName] = []
        for san in sans:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                names.append(x509.UniformResourceIdentifier(san) if "://" in san else x509.DNSName(san))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        return Pem(cert.public_bytes(serialization.Encoding.PEM), key_pem)

    def server(self, expired: bool = False) -> Pem:
        return self.issue("localhost", server=True, sans=("localhost", "127.0.0.1"), expired=expired)


def channel_options() -> list[tuple[str, int]]:
    """A private subchannel pool: every test channel makes its own connection (and TLS handshake)."""
    return [("grpc.use_local_subchannel_pool", 1)]


def secure_channel(port: int, ca: bytes, client: Pem | None = None, token: str | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=client and client.key, certificate_chain=client and client.cert)
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(f"localhost:{port}", credentials, options=channel_options())


class ThreadedSecureServer:
    """A real grpc.aio server on 127.0.0.1:<free port> with the given credentials, on its own loop in a thread."""

    def __init__(
        self,
        configure: Callable[[grpc.aio.Server], Awaitable[None] | None],
        credentials: grpc.ServerCredentials | None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = self._run(self._start(configure, credentials, interceptors))

    def _run(self, coroutine: Awaitable) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _start(self, configure: Callable, credentials: grpc.ServerCredentials | None, interceptors: Sequence) -> int:
        self._server = grpc.aio.server(interceptors=list(interceptors))
        configured = configure(self._server)
        if asyncio.iscoroutine(configured):
            await configured
        address = "127.0.0.1:0"
        port = self._server.add_secure_port(address, credentials) if credentials else self._server.add_insecure_port(address)
        await self._server.start()
        return port

    def stop(self) -> None:
        self._run(self._server.stop(None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def write_dev_pki(directory: Path) -> None:
    """A CA, a server pair for localhost and a client pair (SAN spiffe://propensity/loadtest) for trying TLS locally."""
    ca = Authority("propensity dev CA")
    ca.write(directory / "ca.pem")
    ca.server().write(directory, "server")
    ca.issue("loadtest", sans=("spiffe://propensity/loadtest",)).write(directory, "client")
    for key in directory.glob("*.key"):
        key.chmod(0o600)


if __name__ == "__main__":  # python -m tests.tls_certs var/tls
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "var/tls")
    write_dev_pki(target)
    print(f"wrote ca.pem, server.pem/.key and client.pem/.key (spiffe://propensity/loadtest) to {target}")
