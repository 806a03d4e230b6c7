"""TLS and mutual TLS on real ports with certificates made on the fly: the loopback rule, bad certificates, rotation."""

from __future__ import annotations

import os
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from propensity.settings import Settings
from server.metrics import start_metrics_http
from server.tls import CertificateFiles, InsecureTransportError, check_transport, grpc_server_credentials, is_loopback
from tests.tls_certs import Authority, Pem, ThreadedSecureServer, channel_options, secure_channel

SERVICE = "test.Probe"


def _settings(host: str = "localhost", **security: object) -> Settings:
    return Settings(server={"host": host}, security=security)


# -- the loopback rule -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.0.0.5", "::1", "[::1]"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::", "[::]", "10.1.2.3", "192.168.0.10"])
def test_non_loopback_hosts(host: str) -> None:
    assert not is_loopback(host)


def test_plaintext_on_loopback_is_the_default() -> None:
    check_transport(_settings("localhost"))
    check_transport(Settings())


def test_plaintext_beyond_loopback_is_refused_and_the_error_names_the_setting() -> None:
    with pytest.raises(InsecureTransportError) as error:
        check_transport(_settings("0.0.0.0"))
    assert "security.allow_insecure_bind" in str(error.value)
    assert "PROPENSITY_SECURITY__ALLOW_INSECURE_BIND" in str(error.value)


def test_plaintext_beyond_loopback_when_explicitly_allowed() -> None:
    check_transport(_settings("0.0.0.0", allow_insecure_bind=True))


def test_tls_beyond_loopback_is_accepted(tmp_path: Path) -> None:
    check_transport(_settings("0.0.0.0", tls_cert_file=tmp_path / "c.pem", tls_key_file=tmp_path / "c.key"))


def test_half_a_tls_configuration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InsecureTransportError, match="tls_key_file"):
        check_transport(_settings("0.0.0.0", tls_cert_file=tmp_path / "c.pem"))
    with pytest.raises(InsecureTransportError, match="client_ca_file"):
        check_transport(_settings("localhost", client_ca_file=tmp_path / "ca.pem"))


def test_serve_refuses_plaintext_beyond_loopback_naming_the_setting(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}
    env |= {"PROPENSITY_SERVER__HOST": "0.0.0.0", "PROPENSITY_CONFIG": str(tmp_path / "absent.toml")}
    result = subprocess.run([str(Path(sys.executable).parent / "propensity"), "serve", "--port", "0"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "security.allow_insecure_bind" in result.stderr


# -- a real TLS server -------------------------------------------------------------------------------------------


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"ok:" + request


def _configure(server: grpc.aio.Server) -> object:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}),))

    async def health() -> None:
        servicer = health_async.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    return health()


class Pki:
    """A CA with a server certificate on disk, a good client, and the files a server reads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = Authority("test CA")
        self.ca_file = self.ca.write(root / "ca.pem")
        self.cert_file, self.key_file = self.ca.server().write(root, "server")
        self.client = self.ca.issue("shop-frontend", sans=("spiffe://shop/frontend",))

    def files(self, mutual: bool = True) -> CertificateFiles:
        return CertificateFiles(self.cert_file, self.key_file, self.ca_file if mutual else None)


def _echo_call(port: int, ca: bytes, client: Pem | None = None) -> bytes:
    with secure_channel(port, ca, client) as channel:
        return channel.unary_unary(f"/{SERVICE}/Echo")(b"x", timeout=5)


@pytest.fixture()
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture()
def mtls_server(pki: Pki) -> Iterator[ThreadedSecureServer]:
    server = ThreadedSecureServer(_configure, grpc_server_credentials(pki.files(mutual=True)))
    yield server
    server.stop()


def test_mutual_tls_with_a_good_client_certificate(pki: Pki, mtls_server: ThreadedSecureServer) -> None:
    assert _echo_call(mtls_server.port, pki.ca.pem, pki.client) == b"ok:x"


def test_mutual_tls_refuses_a_missing_client_certificate(pki: Pki, mtls_server: ThreadedSecureServer) -> None:
    with pytest.raises(grpc.RpcError) as error:
        _echo_call(mtls_server.port, pki.ca.pem, client=None)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_certificate_from_another_ca(pki: Pki, mtls_server: ThreadedSecureServer) -> None:
    stranger = Authority("someone else's CA").issue("shop-frontend")
    with pytest.raises(grpc.RpcError) as error:
        _echo_call(mtls_server.port, pki.ca.pem, stranger)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_an_expired_client_certificate(pki: Pki, mtls_server: ThreadedSecureServer) -> None:
    with pytest.raises(grpc.RpcError) as error:
        _echo_call(mtls_server.port, pki.ca.pem, pki.ca.issue("shop-frontend", expired=True))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_refuses_a_server_certificate_from_the_wrong_ca(pki: Pki, mtls_server: ThreadedSecureServer) -> None:
    with pytest.raises(grpc.RpcError) as error:
        _echo_call(mtls_server.port, Authority("wrong CA").pem, pki.client)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_is_refused_by_a_tls_port(mtls_server: ThreadedSecureServer) -> None:
    with grpc.insecure_channel(f"localhost:{mtls_server.port}", options=channel_options()) as channel:
        with pytest.raises(grpc.RpcError) as error:
            channel.unary_unary(f"/{SERVICE}/Echo")(b"x", timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_refuses_an_expired_server_certificate(pki: Pki) -> None:
    cert, key = pki.ca.server(expired=True).write(pki.root, "expired")
    server = ThreadedSecureServer(_configure, grpc_server_credentials(CertificateFiles(cert, key)))
    try:
        with pytest.raises(grpc.RpcError) as error:
            _echo_call(server.port, pki.ca.pem)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        # The same server with a valid certificate answers: the refusal was the expiry.
        pki.ca.server().write(pki.root, "expired")
        assert _wait_for_call(server.port, pki.ca.pem) == b"ok:x"
    finally:
        server.stop()


def test_server_only_tls_accepts_clients_without_certificates(pki: Pki) -> None:
    server = ThreadedSecureServer(_configure, grpc_server_credentials(pki.files(mutual=False)))
    try:
        assert _echo_call(server.port, pki.ca.pem) == b"ok:x"
    finally:
        server.stop()


def test_a_bad_certificate_file_at_start_up_is_an_error(pki: Pki) -> None:
    pki.key_file.write_bytes(pki.ca.server().key)  # a key that does not match the certificate
    with pytest.raises(ssl.SSLError):
        pki.files()


def test_plaintext_health_port_serves_health_only_and_refuses_a_taken_port() -> None:
    import asyncio

    from server.tls import start_plaintext_health
    from tests.conftest import free_port

    async def main() -> None:
        health = health_async.HealthServicer()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        port = free_port()
        server = await start_plaintext_health("127.0.0.1", port, health)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                assert response.status == health_pb2.HealthCheckResponse.SERVING
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await channel.unary_unary("/propensity.v1.RecommendationService/GetModelInfo")(b"", timeout=5)
                assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
            with pytest.raises((OSError, RuntimeError)):
                await start_plaintext_health("127.0.0.1", port, health)
        finally:
            await server.stop(None)

    asyncio.run(main())


# -- rotation ----------------------------------------------------------------------------------------------------


def _wait_for_call(port: int, ca: bytes, client: Pem | None = None, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _echo_call(port, ca, client)
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _rotate(pki: Pki, new_ca: Authority) -> None:
    """Replace the files as an operator or cert-manager would: CA bundle first (old + new), then the pair, atomically."""
    pem = new_ca.server()
    for path, data in ((pki.ca_file, pki.ca.pem + new_ca.pem), (pki.cert_file, pem.cert), (pki.key_file, pem.key)):
        staged = path.with_suffix(".new")
        staged.write_bytes(data)
        os.replace(staged, path)


def test_replaced_files_are_served_to_new_connections_without_a_restart(pki: Pki, mtls_server: ThreadedSecureServer) -> None:
    new_ca = Authority("next CA")
    assert _echo_call(mtls_server.port, pki.ca.pem, pki.client) == b"ok:x"
    with pytest.raises(grpc.RpcError):  # before rotation the server's certificate is not from the new CA
        _echo_call(mtls_server.port, new_ca.pem, pki.client)
    _rotate(pki, new_ca)
    assert _echo_call(mtls_server.port, new_ca.pem, pki.client) == b"ok:x"
    with pytest.raises(grpc.RpcError):  # and the old server certificate is gone
        _echo_call(mtls_server.port, pki.ca.pem, pki.client)
    # The client CA bundle was reloaded too: a client of the new CA is admitted.
    assert _echo_call(mtls_server.port, new_ca.pem, new_ca.issue("next-client")) == b"ok:x"


def test_half_written_rotation_keeps_the_previous_pair(pki: Pki, mtls_server: ThreadedSecureServer) -> None:
    new_ca = Authority("next CA")
    pem = new_ca.server()
    pki.cert_file.write_bytes(pem.cert)  # the key does not match yet
    assert _echo_call(mtls_server.port, pki.ca.pem, pki.client) == b"ok:x"
    pki.key_file.write_bytes(pem.key)
    assert _echo_call(mtls_server.port, new_ca.pem, pki.client) == b"ok:x"


def test_reload_request_rereads_files_even_when_their_stat_did_not_change(pki: Pki) -> None:
    files = pki.files()
    first = files.current()
    assert files.current() is first  # nothing changed: no re-read
    files.reload()  # SIGHUP
    second = files.current()
    assert second.generation == first.generation + 1


# -- the metrics port --------------------------------------------------------------------------------------------


def _scrape(port: int, ca_file: Path, client: tuple[Path, Path] | None) -> str:
    context = ssl.create_default_context(cafile=str(ca_file))
    if client:
        context.load_cert_chain(*client)
    with urllib.request.urlopen(f"https://localhost:{port}/metrics", context=context, timeout=5) as response:
        return response.read().decode()


def test_metrics_port_speaks_mutual_tls_and_rotates(pki: Pki) -> None:
    registry = CollectorRegistry()
    Counter("probe_total_calls", "a probe", registry=registry).inc()
    httpd, thread = start_metrics_http(0, registry, "127.0.0.1", tls=pki.files(mutual=True))
    port = httpd.server_port
    client = pki.client.write(pki.root, "client")
    try:
        assert "probe_total_calls" in _scrape(port, pki.ca_file, client)
        with pytest.raises(OSError):  # URLError, SSLError or a reset, depending on where the handshake fails
            _scrape(port, pki.ca_file, None)  # no client certificate
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=5)  # plaintext
        old_ca = pki.root / "old-ca.pem"
        old_ca.write_bytes(pki.ca.pem)
        new_ca = Authority("next CA")
        _rotate(pki, new_ca)
        new_ca_file = new_ca.write(pki.root / "new-ca.pem")
        assert "probe_total_calls" in _scrape(port, new_ca_file, client)
        with pytest.raises(OSError):
            _scrape(port, old_ca, client)
        assert "probe_total_calls" in _scrape(port, new_ca_file, client)  # the refusals did not stop the endpoint
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# -- the real server, the real tools -----------------------------------------------------------------------------

SECRET_TOKENS = {"read": "e2e-read-token-3c0d9f1b7e", "ingest": "e2e-ingest-token-90aa5d4c21"}


@pytest.mark.slow
def test_real_server_over_mtls_with_tokens_grpcurl_cli_metrics_and_rotation(pipeline, tmp_path: Path) -> None:
    """`propensity serve` with mTLS, auth, no reflection, a plaintext health port and HTTPS metrics, driven by the real tools."""
    import json
    import signal
    import subprocess
    import sys

    from server.auth import hash_token
    from tests.conftest import free_port, private_env, users, wait_until_serving

    bin_dir = Path(sys.executable).parent
    pki = Pki(tmp_path / "pki")
    client_cert, client_key = pki.client.write(pki.root, "client")
    tokens = {}
    for role, token in SECRET_TOKENS.items():
        tokens[role] = pki.root / f"{role}.token"
        tokens[role].write_text(token + "\n")
    callers = [
        {"name": "shop-frontend", "roles": ["read"], "token_sha256": hash_token(SECRET_TOKENS["read"])},
        {"name": "event-pipe", "roles": ["ingest"], "token_sha256": hash_token(SECRET_TOKENS["ingest"])},
    ]
    env, _ = private_env(pipeline, "tls-server", log_format="json", metrics_port=str(free_port()))
    health_port, port = free_port(), free_port()
    env |= {
        "PROPENSITY_SECURITY__TLS_CERT_FILE": str(pki.cert_file), "PROPENSITY_SECURITY__TLS_KEY_FILE": str(pki.key_file),
        "PROPENSITY_SECURITY__CLIENT_CA_FILE": str(pki.ca_file), "PROPENSITY_SECURITY__AUTH": "on",
        "PROPENSITY_SECURITY__CALLERS": json.dumps(callers), "PROPENSITY_SECURITY__REFLECTION": "false",
        "PROPENSITY_SECURITY__HEALTH_PORT": str(health_port),
    }
    metrics_port = int(env["PROPENSITY_SERVER__METRICS_PORT"])
    log = tmp_path / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen([str(bin_dir / "propensity"), "serve", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    target, user = f"localhost:{port}", users(pipeline, 1)[0]
    proto = ["-import-path", "protos", "-proto", "propensity/v1/recommendation_service.proto"]
    mtls = ["-cacert", str(pki.ca_file), "-cert", str(client_cert), "-key", str(client_key)]

    def grpcurl(*args: str, ca: Path = pki.ca_file) -> subprocess.CompletedProcess:
        tls = ["-cacert", str(ca), *mtls[2:]]
        return subprocess.run([str(bin_dir / "grpcurl"), *tls, *args], capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1])

    def cli(*args: str, token_env: str | None = None) -> subprocess.CompletedProcess:
        cli_env = {k: v for k, v in env.items() if k != "PROPENSITY_TOKEN"} | ({"PROPENSITY_TOKEN": token_env} if token_env else {})
        tls = ["--target", target, "--ca-cert", str(pki.ca_file), "--cert", str(client_cert), "--key", str(client_key)]
        return subprocess.run([str(bin_dir / "propensity"), *args, *tls], capture_output=True, text=True, timeout=120, env=cli_env)

    try:
        wait_until_serving(f"localhost:{health_port}", process, log, timeout=120)  # the plaintext health port: no certificate

        recommend = [*proto, "-d", json.dumps({"user_id": user, "num_items": 3}), target, "propensity.v1.RecommendationService/Recommend"]
        ok = grpcurl("-H", f"authorization: Bearer {SECRET_TOKENS['read']}", *recommend)
        assert ok.returncode == 0, ok.stderr
        assert len(json.loads(ok.stdout)["items"]) == 3
        no_token = grpcurl(*recommend)  # a valid certificate, but of no known caller
        assert no_token.returncode != 0 and "Unauthenticated" in no_token.stderr
        wrong_role = grpcurl("-H", f"authorization: Bearer {SECRET_TOKENS['ingest']}", *recommend)
        assert wrong_role.returncode != 0 and "PermissionDenied" in wrong_role.stderr
        listed = grpcurl("-H", f"authorization: Bearer {SECRET_TOKENS['read']}", target, "list")
        assert listed.returncode != 0 and "reflection" in listed.stderr.lower()  # reflection switched off

        answered = cli("recommend", user, "--num-items", "3", token_env=SECRET_TOKENS["read"])
        assert answered.returncode == 0, answered.stderr
        assert f"user {user}" in answered.stdout
        refused = cli("recommend", user, "--token-file", str(tokens["ingest"]))
        assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
        events = pipeline.data_dir / "events.parquet"
        replayed = cli("replay", str(events), "--rate", "0", "--limit", "20", "--token-file", str(tokens["ingest"]))
        assert replayed.returncode == 0, replayed.stderr
        assert "accepted 20" in replayed.stdout.replace(",", "")

        context = ssl.create_default_context(cafile=str(pki.ca_file))
        context.load_cert_chain(client_cert, client_key)
        with urllib.request.urlopen(f"https://localhost:{metrics_port}/metrics", context=context, timeout=5) as response:
            scraped = response.read().decode()
        assert 'propensity_caller_requests_total{caller="shop-frontend",code="OK",method="Recommend"}' in scraped
        assert 'caller="event-pipe",code="PERMISSION_DENIED",method="Recommend"' in scraped

        # Rotation: new files from a new CA, then SIGHUP; the process survives it and new connections get the new certificate.
        new_ca = Authority("next CA")
        new_ca_file = new_ca.write(pki.root / "new-ca.pem")
        old_ca_file = pki.ca.write(pki.root / "old-ca.pem")
        _rotate(pki, new_ca)
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert process.poll() is None
        rotated = grpcurl("-H", f"authorization: Bearer {SECRET_TOKENS['read']}", *recommend, ca=new_ca_file)
        assert rotated.returncode == 0, rotated.stderr
        old = grpcurl("-H", f"authorization: Bearer {SECRET_TOKENS['read']}", *recommend, ca=old_ca_file)
        assert old.returncode != 0  # the old certificate is no longer served
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
    text = log.read_text()
    assert '"caller": "event-pipe"' in text  # the refused call's log line names its caller
    for token in SECRET_TOKENS.values():
        assert token not in text
    for caller in callers:
        assert caller["token_sha256"] not in text  # the settings printout masks the hashes too
    printed = next(json.loads(line)["message"] for line in text.splitlines() if '"settings:' in line)
    security = json.loads(printed.split("\n", 1)[1])["security"]
    assert [c["token_sha256"] for c in security["callers"]] == ["***", "***"]


@pytest.mark.slow
def test_worker_processes_serve_tls_and_the_parent_serves_https_metrics(pipeline, tmp_path: Path) -> None:
    """server.workers=2 on a TLS port: each worker binds with the certificates, the parent's /metrics speaks HTTPS."""
    import json
    import subprocess
    import sys

    from propensity.client import PropensityClient, tls_credentials
    from server.auth import hash_token
    from tests.conftest import free_port, private_env, users, wait_until_serving

    pki = Pki(tmp_path / "pki")
    token = "workers-read-token-41d2"
    env, _ = private_env(pipeline, "tls-workers", workers="2", metrics_port=str(free_port()))
    health_port, port = free_port(), free_port()
    env |= {
        "PROPENSITY_SECURITY__TLS_CERT_FILE": str(pki.cert_file), "PROPENSITY_SECURITY__TLS_KEY_FILE": str(pki.key_file),
        "PROPENSITY_SECURITY__AUTH": "on", "PROPENSITY_SECURITY__HEALTH_PORT": str(health_port),
        "PROPENSITY_SECURITY__CALLERS": json.dumps([{"name": "reader", "roles": ["read"], "token_sha256": hash_token(token)}]),
    }
    log = tmp_path / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen([str(Path(sys.executable).parent / "propensity"), "serve", "--port", str(port)],
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(f"localhost:{health_port}", process, log, timeout=180)
        with PropensityClient(f"localhost:{port}", timeout=10, credentials=tls_credentials(pki.ca_file), token=token) as client:
            assert client.recommend(users(pipeline, 1)[0], num_items=2).items
        with grpc.insecure_channel(f"localhost:{health_port}") as channel:  # the health port serves health only
            with pytest.raises(grpc.RpcError) as error:
                channel.unary_unary("/propensity.v1.RecommendationService/GetModelInfo")(b"", timeout=5)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        metrics_url = f"https://localhost:{env['PROPENSITY_SERVER__METRICS_PORT']}/metrics"
        with urllib.request.urlopen(metrics_url, context=context, timeout=5) as response:
            assert 'propensity_caller_requests_total{caller="reader",code="OK",method="Recommend"}' in response.read().decode()
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    assert token not in log.read_text()
