"""Authentication and authorisation: tokens and mTLS identities against a real TLS server, real grpcurl, logs and metrics."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from propensity.client import PropensityClient, tls_credentials
from propensity.settings import CallerSettings, Settings
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from server.auth import ANONYMOUS, UNKNOWN, AuthInterceptor, CallerTable, DEFAULT_POLICY, current_caller, decide, hash_token
from server.auth import main as auth_main
from server.interceptors import ObservabilityInterceptor
from server.log_setup import JsonFormatter
from server.metrics import Metrics
from server.tls import CertificateFiles, grpc_server_credentials
from tests.tls_certs import Authority, Pem, ThreadedSecureServer, secure_channel

GRPCURL = Path(sys.executable).parent / "grpcurl"
READ_TOKEN, INGEST_TOKEN, ADMIN_TOKEN = "read-token-5f1c9a", "ingest-token-77ab02", "admin-token-c0ffee"
SERVICE = "/propensity.v1.RecommendationService/"
log = logging.getLogger("tests.fake_servicer")

CALLERS = [
    CallerSettings(name="shop-frontend", roles=["read"], token_sha256=hash_token(READ_TOKEN)),
    CallerSettings(name="event-pipe", roles=["ingest"], token_sha256=hash_token(INGEST_TOKEN)),
    CallerSettings(name="ops", roles=["read", "ingest", "admin"], token_sha256=hash_token(ADMIN_TOKEN)),
    CallerSettings(name="batch-scorer", roles=["read"], subjects=["spiffe://shop/batch-scorer"]),
    CallerSettings(name="cn-only", roles=["ingest"], subjects=["legacy-cn-client"]),
]


# -- the decision, without a server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table() -> CallerTable:
    return CallerTable(CALLERS)


@pytest.mark.parametrize(
    ("method", "token", "subjects", "caller", "code"),
    [
        ("Recommend", READ_TOKEN, [], "shop-frontend", None),
        ("ScoreUsers", READ_TOKEN, [], "shop-frontend", None),
        ("IngestEvents", READ_TOKEN, [], "shop-frontend", grpc.StatusCode.PERMISSION_DENIED),
        ("IngestEvents", INGEST_TOKEN, [], "event-pipe", None),
        ("Recommend", INGEST_TOKEN, [], "event-pipe", grpc.StatusCode.PERMISSION_DENIED),
        ("ForgetUsers", READ_TOKEN, [], "shop-frontend", grpc.StatusCode.PERMISSION_DENIED),
        ("ForgetUsers", ADMIN_TOKEN, [], "ops", None),
        ("NotInThePolicy", ADMIN_TOKEN, [], "ops", grpc.StatusCode.PERMISSION_DENIED),
        ("Recommend", "not-a-token", [], UNKNOWN, grpc.StatusCode.UNAUTHENTICATED),
        ("Recommend", "", [], UNKNOWN, grpc.StatusCode.UNAUTHENTICATED),  # malformed header
        ("Recommend", None, [], ANONYMOUS, grpc.StatusCode.UNAUTHENTICATED),
        ("Recommend", None, ["batch-scorer-host", "spiffe://shop/batch-scorer"], "batch-scorer", None),
        ("IngestEvents", None, ["spiffe://shop/batch-scorer"], "batch-scorer", grpc.StatusCode.PERMISSION_DENIED),
        ("IngestEvents", None, ["legacy-cn-client"], "cn-only", None),
        ("Recommend", None, ["spiffe://shop/stranger"], UNKNOWN, grpc.StatusCode.UNAUTHENTICATED),
        # A bad token is not rescued by a good certificate: bad credentials presented are refused.
        ("Recommend", "not-a-token", ["spiffe://shop/batch-scorer"], UNKNOWN, grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_decide(table: CallerTable, method: str, token: str | None, subjects: list[str], caller: str, code: grpc.StatusCode | None) -> None:
    decision = decide(table, DEFAULT_POLICY, SERVICE + method, token, subjects)
    assert (decision.caller, decision.code) == (caller, code)
    if token:
        assert token not in decision.message


def test_reflection_is_open_to_any_known_caller_only(table: CallerTable) -> None:
    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    assert decide(table, DEFAULT_POLICY, method, INGEST_TOKEN, []).code is None
    assert decide(table, DEFAULT_POLICY, method, None, []).code == grpc.StatusCode.UNAUTHENTICATED


def test_token_hash_must_be_a_sha256_digest() -> None:
    with pytest.raises(ValueError, match="sha256"):
        CallerTable([CallerSettings(name="x", roles=["read"], token_sha256="plaintext-token")])


def test_reserved_names_are_refused() -> None:
    with pytest.raises(ValueError, match="reserved"):
        CallerTable([CallerSettings(name="anonymous", roles=["read"])])


def test_new_token_prints_a_token_and_its_hash(capsys: pytest.CaptureFixture[str]) -> None:
    assert auth_main(["new-token", "svc", "--roles", "read,ingest"]) == 0
    lines = capsys.readouterr().out.splitlines()
    token = lines[0].rsplit(" ", 1)[1]
    entry = json.loads(lines[1].split(": ", 1)[1])
    assert entry == {"name": "svc", "roles": ["read", "ingest"], "token_sha256": hash_token(token)}
    assert len(token) >= 40


def test_callers_file_is_reread_when_it_changes_or_on_reload(tmp_path: Path) -> None:
    path = tmp_path / "callers.toml"
    path.write_text(f'[[callers]]\nname = "a"\nroles = ["read"]\ntoken_sha256 = "{hash_token("token-a")}"\n')
    table = CallerTable([], path)
    assert table.by_token("token-a").name == "a"
    path.write_text(f'[[callers]]\nname = "b"\nroles = ["read"]\ntoken_sha256 = "{hash_token("token-b")}"\n')
    table.reload()  # SIGHUP; without it the change is seen within a second
    assert table.by_token("token-b").name == "b"
    assert table.by_token("token-a") is None
    path.write_text("not valid toml [[[")
    table.reload()
    assert table.by_token("token-b").name == "b"  # a broken file keeps the previous callers


def test_settings_printout_masks_token_hashes() -> None:
    settings = Settings(security={"callers": [c.model_dump() for c in CALLERS]})
    text = settings.describe()
    for caller in CALLERS:
        if caller.token_sha256:
            assert caller.token_sha256 not in text
    assert '"token_sha256": "***"' in text
    assert '"name": "shop-frontend"' in text  # names are not secrets


# -- a real TLS server with the interceptor ----------------------------------------------------------------------


class FakeRecommendations(pb_grpc.RecommendationServiceServicer):
    """The real service definition with trivial answers: the interceptor is under test, not the recommender."""

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext) -> pb.RecommendResponse:
        log.info("recommend for %s", request.user_id)
        return pb.RecommendResponse(user_id=request.user_id, model_version=current_caller())

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(current_version="v-test")

    async def IngestEvents(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.IngestEventsResponse:
        accepted = 0
        async for message in request_iterator:
            accepted += len(message.events)
        return pb.IngestEventsResponse(accepted=accepted)


@dataclass
class Served:
    port: int  # mutual TLS
    tls_port: int  # server-only TLS: callers without certificates, tokens only
    registry: CollectorRegistry
    pki: Path
    ca: Authority
    client: Pem  # a certificate that identifies batch-scorer
    stranger: Pem  # a valid certificate of no known caller


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("auth-pki")
    ca = Authority()
    ca_file = ca.write(root / "ca.pem")
    cert, key = ca.server().write(root, "server")
    client = ca.issue("batch-scorer-host", sans=("spiffe://shop/batch-scorer",))
    client.write(root, "client")
    registry = CollectorRegistry()
    metrics = Metrics(registry)

    async def configure(server: grpc.aio.Server) -> None:
        pb_grpc.add_RecommendationServiceServicer_to_server(FakeRecommendations(), server)
        health = health_async.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(("propensity.v1.RecommendationService", reflection.SERVICE_NAME), server)

    interceptors = [ObservabilityInterceptor(metrics.observe_request), AuthInterceptor(CallerTable(CALLERS), observe=metrics.observe_caller)]
    mutual = ThreadedSecureServer(configure, grpc_server_credentials(CertificateFiles(cert, key, ca_file)), interceptors)
    server_only = ThreadedSecureServer(configure, grpc_server_credentials(CertificateFiles(cert, key)), interceptors)
    try:
        yield Served(mutual.port, server_only.port, registry, root, ca, client, ca.issue("stranger", sans=("spiffe://shop/stranger",)))
    finally:
        mutual.stop()
        server_only.stop()


def _port(served: Served, client: Pem | None) -> int:
    return served.port if client else served.tls_port


def _recommend(served: Served, token: str | None = None, client: Pem | None = None) -> pb.RecommendResponse:
    with secure_channel(_port(served, client), served.ca.pem, client, token) as channel:
        return pb_grpc.RecommendationServiceStub(channel).Recommend(pb.RecommendRequest(user_id="u1"), timeout=5)


def _ingest(served: Served, token: str | None = None, client: Pem | None = None) -> pb.IngestEventsResponse:
    messages = [pb.IngestEventsRequest(events=[pb.Event(user_id="u1", item_id="i1")]) for _ in range(3)]
    with secure_channel(_port(served, client), served.ca.pem, client, token) as channel:
        return pb_grpc.RecommendationServiceStub(channel).IngestEvents(iter(messages), timeout=5)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code()


def _caller_count(served: Served, caller: str, method: str, code: str) -> float:
    return served.registry.get_sample_value("propensity_caller_requests_total", {"caller": caller, "method": method, "code": code}) or 0.0


def test_read_token_may_recommend(served: Served) -> None:
    assert _recommend(served, READ_TOKEN).model_version == "shop-frontend"  # the handler saw its caller


def test_missing_credentials_are_unauthenticated(served: Served) -> None:
    assert _code(lambda: _recommend(served)) == grpc.StatusCode.UNAUTHENTICATED


def test_bad_token_is_unauthenticated_and_not_echoed(served: Served) -> None:
    with pytest.raises(grpc.RpcError) as error:
        _recommend(served, "guessed-token")
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "guessed-token" not in error.value.details()


def test_caller_without_the_role_is_denied(served: Served) -> None:
    with pytest.raises(grpc.RpcError) as error:
        _recommend(served, INGEST_TOKEN)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "event-pipe" in error.value.details() and INGEST_TOKEN not in error.value.details()


def test_streaming_ingest_is_checked_too(served: Served) -> None:
    assert _ingest(served, INGEST_TOKEN).accepted == 3
    assert _code(lambda: _ingest(served, READ_TOKEN)) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: _ingest(served)) == grpc.StatusCode.UNAUTHENTICATED


def test_mtls_identity_without_a_token(served: Served) -> None:
    assert _recommend(served, client=served.client).model_version == "batch-scorer"
    assert _code(lambda: _ingest(served, client=served.client)) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: _recommend(served, client=served.stranger)) == grpc.StatusCode.UNAUTHENTICATED


def test_token_names_the_caller_on_a_certificate_of_no_known_caller(served: Served) -> None:
    assert _recommend(served, READ_TOKEN, client=served.stranger).model_version == "shop-frontend"
    assert _code(lambda: _recommend(served, "guessed", client=served.stranger)) == grpc.StatusCode.UNAUTHENTICATED


def test_health_stays_open(served: Served) -> None:
    with secure_channel(served.tls_port, served.ca.pem) as channel:  # no token, no certificate
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_caller_is_a_bounded_metrics_label(served: Served) -> None:
    before = {key: _caller_count(served, *key) for key in [
        ("shop-frontend", "Recommend", "OK"), ("unknown", "Recommend", "UNAUTHENTICATED"), ("anonymous", "Recommend", "UNAUTHENTICATED"),
    ]}
    _recommend(served, READ_TOKEN)
    for token in ("guess-1", "guess-2", "guess-3"):
        _code(lambda: _recommend(served, token))
    _code(lambda: _recommend(served))
    deadline = time.monotonic() + 5
    while _caller_count(served, "anonymous", "Recommend", "UNAUTHENTICATED") < before[("anonymous", "Recommend", "UNAUTHENTICATED")] + 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert _caller_count(served, "shop-frontend", "Recommend", "OK") == before[("shop-frontend", "Recommend", "OK")] + 1
    assert _caller_count(served, "unknown", "Recommend", "UNAUTHENTICATED") == before[("unknown", "Recommend", "UNAUTHENTICATED")] + 3
    callers = {s.labels["caller"] for m in served.registry.collect() if m.name == "propensity_caller_requests" for s in m.samples}
    assert callers <= {c.name for c in CALLERS} | {"anonymous", "unknown"}


def test_caller_in_logs_and_tokens_never(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    from server.auth import install_caller_in_logs

    install_caller_in_logs()
    with caplog.at_level(logging.INFO):
        _recommend(served, READ_TOKEN)
        _code(lambda: _recommend(served, INGEST_TOKEN))
        _code(lambda: _recommend(served, "guessed-token"))
        time.sleep(0.2)
    handled = [r for r in caplog.records if r.name == "tests.fake_servicer"]
    assert handled and handled[-1].caller == "shop-frontend"
    assert json.loads(JsonFormatter().format(handled[-1]))["caller"] == "shop-frontend"
    denied = [r.getMessage() for r in caplog.records if r.name == "server.auth"]
    assert any("event-pipe" in line for line in denied) and any("unknown" in line for line in denied)
    everything = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    for secret in (READ_TOKEN, INGEST_TOKEN, "guessed-token", hash_token(READ_TOKEN)):
        assert secret not in everything


def test_propensity_client_takes_credentials(served: Served) -> None:
    credentials = tls_credentials(served.pki / "ca.pem", served.pki / "client.pem", served.pki / "client.key")
    with PropensityClient(f"localhost:{served.port}", timeout=5, credentials=credentials) as client:
        assert client.recommend("u1").model_version == "batch-scorer"  # mTLS identity
    with PropensityClient(f"localhost:{served.tls_port}", timeout=5, credentials=tls_credentials(served.pki / "ca.pem"), token=INGEST_TOKEN) as client:
        assert client.ingest_events([pb.IngestEventsRequest(events=[pb.Event(user_id="u1")])]).accepted == 1
        with pytest.raises(grpc.RpcError) as error:
            client.model_info()
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


# -- real grpcurl ------------------------------------------------------------------------------------------------


def _grpcurl(served: Served, *args: str) -> subprocess.CompletedProcess:
    tls = ["-cacert", str(served.pki / "ca.pem"), "-cert", str(served.pki / "client.pem"), "-key", str(served.pki / "client.key")]
    return subprocess.run([str(GRPCURL), *tls, *args], capture_output=True, text=True, timeout=60)


def test_grpcurl_over_mtls_with_a_token(served: Served) -> None:
    target = f"localhost:{served.port}"
    ok = _grpcurl(served, "-H", f"authorization: Bearer {READ_TOKEN}", "-d", '{"user_id": "u7"}', target,
                  "propensity.v1.RecommendationService/Recommend")
    assert ok.returncode == 0, ok.stderr
    answer = json.loads(ok.stdout)
    assert answer.get("userId", answer.get("user_id")) == "u7", ok.stdout
    assert answer.get("modelVersion", answer.get("model_version")) == "shop-frontend"  # the token wins over the certificate
    denied = _grpcurl(served, "-H", f"authorization: Bearer {INGEST_TOKEN}", "-d", '{"user_id": "u7"}', target,
                      "propensity.v1.RecommendationService/Recommend")
    assert denied.returncode != 0 and "PermissionDenied" in denied.stderr
    bad = _grpcurl(served, "-H", "authorization: Bearer nope", target, "list")
    assert bad.returncode != 0 and "Unauthenticated" in bad.stderr
