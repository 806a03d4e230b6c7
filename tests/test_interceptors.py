"""Tests for the observability interceptor over a real grpc.aio server with health and reflection."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from server.interceptors import ObservabilityInterceptor, current_request_id
from server.metrics import Metrics
from tests.aio_server import ThreadedAioServer

SERVICE = "test.Probe"


async def _echo_request_id(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await asyncio.sleep(0)  # the id must survive a suspension
    return current_request_id().encode()


async def _reject(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id: empty")


async def _crash(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise RuntimeError("boom")


async def _not_found_without_abort(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    context.set_code(grpc.StatusCode.NOT_FOUND)
    context.set_details("no such thing")
    return b""


async def _slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await asyncio.sleep(2)
    return b"late"


def _Server(interceptor: ObservabilityInterceptor) -> ThreadedAioServer:
    """Test handlers, health and reflection behind the interceptor on a real grpc.aio server."""

    async def configure(server: grpc.aio.Server) -> None:
        handlers = {
            "Echo": _echo_request_id,
            "Reject": _reject,
            "Crash": _crash,
            "NotFound": _not_found_without_abort,
            "Slow": _slow,
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {k: grpc.unary_unary_rpc_method_handler(v) for k, v in handlers.items()}),)
        )
        health = health_async.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection((SERVICE, reflection.SERVICE_NAME), server)

    return ThreadedAioServer(configure, interceptors=[interceptor])


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[CollectorRegistry, grpc.Channel]]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    server = _Server(ObservabilityInterceptor(metrics.observe_request))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield registry, channel
    finally:
        channel.close()
        server.stop()


@pytest.fixture()
def registry(served: tuple[CollectorRegistry, grpc.Channel]) -> CollectorRegistry:
    return served[0]


@pytest.fixture()
def channel(served: tuple[CollectorRegistry, grpc.Channel]) -> grpc.Channel:
    return served[1]


def _call(channel: grpc.Channel, method: str):
    return channel.unary_unary(f"/{SERVICE}/{method}")


def _eventually(read, expected: float) -> float:
    """The server records after it answered (abort sends the status first; a handler past its deadline only ends
    after its own 2 s sleep): poll for the value, for longer than that on a loaded machine."""
    deadline = time.monotonic() + 10.0
    value = read()
    while value != expected and time.monotonic() < deadline:
        threading.Event().wait(0.01)
        value = read()
    return value


def _requests(registry: CollectorRegistry, method: str, code: str) -> float:
    return registry.get_sample_value("propensity_requests_total", {"method": method, "code": code}) or 0.0


def _latency_count(registry: CollectorRegistry, method: str, code: str) -> float:
    return registry.get_sample_value("propensity_request_seconds_count", {"method": method, "code": code}) or 0.0


def test_client_request_id_is_echoed_and_visible_to_the_handler(channel: grpc.Channel) -> None:
    response, call = _call(channel, "Echo").with_call(b"", metadata=(("x-request-id", "req-42"),), timeout=5)
    assert dict(call.initial_metadata())["x-request-id"] == "req-42"
    assert response == b"req-42"


def test_missing_request_id_is_generated_and_echoed(channel: grpc.Channel) -> None:
    first, call = _call(channel, "Echo").with_call(b"", timeout=5)
    second, _ = _call(channel, "Echo").with_call(b"", timeout=5)
    assert re.fullmatch(r"[0-9a-f]{32}", first.decode())
    assert dict(call.initial_metadata())["x-request-id"] == first.decode()
    assert first != second


def test_unsafe_request_id_is_replaced(channel: grpc.Channel) -> None:
    for unsafe in ("a b\" injected=1", "x" * 129):
        response, call = _call(channel, "Echo").with_call(b"", metadata=(("x-request-id", unsafe),), timeout=5)
        assert re.fullmatch(r"[0-9a-f]{32}", response.decode())
        assert dict(call.initial_metadata())["x-request-id"] == response.decode()


def test_request_id_does_not_leak_out_of_the_rpc(channel: grpc.Channel) -> None:
    _call(channel, "Echo").with_call(b"", metadata=(("x-request-id", "req-leak"),), timeout=5)
    assert current_request_id() == ""


def test_ok_call_is_counted_with_its_latency(registry: CollectorRegistry, channel: grpc.Channel) -> None:
    before, latency_before = _requests(registry, "Echo", "OK"), _latency_count(registry, "Echo", "OK")
    _call(channel, "Echo")(b"", timeout=5)
    assert _eventually(lambda: _requests(registry, "Echo", "OK"), before + 1) == before + 1
    assert _latency_count(registry, "Echo", "OK") == latency_before + 1
    total = registry.get_sample_value("propensity_request_seconds_sum", {"method": "Echo", "code": "OK"})
    assert 0 < total < 5


def test_abort_is_counted_with_its_code_and_still_echoes_the_id(registry: CollectorRegistry, channel: grpc.Channel) -> None:
    before = _requests(registry, "Reject", "INVALID_ARGUMENT")
    with pytest.raises(grpc.RpcError) as error:
        _call(channel, "Reject")(b"", metadata=(("x-request-id", "req-bad"),), timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "user_id: empty"
    assert dict(error.value.initial_metadata())["x-request-id"] == "req-bad"
    assert _eventually(lambda: _requests(registry, "Reject", "INVALID_ARGUMENT"), before + 1) == before + 1
    assert _requests(registry, "Reject", "OK") == 0
    assert _latency_count(registry, "Reject", "INVALID_ARGUMENT") == before + 1


def test_unhandled_exception_is_counted_as_unknown(registry: CollectorRegistry, channel: grpc.Channel) -> None:
    before = _requests(registry, "Crash", "UNKNOWN")
    with pytest.raises(grpc.RpcError) as error:
        _call(channel, "Crash")(b"", timeout=5)
    assert error.value.code() == grpc.StatusCode.UNKNOWN
    assert _eventually(lambda: _requests(registry, "Crash", "UNKNOWN"), before + 1) == before + 1


def test_code_set_without_abort_is_counted(registry: CollectorRegistry, channel: grpc.Channel) -> None:
    before = _requests(registry, "NotFound", "NOT_FOUND")
    with pytest.raises(grpc.RpcError) as error:
        _call(channel, "NotFound")(b"", timeout=5)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert _eventually(lambda: _requests(registry, "NotFound", "NOT_FOUND"), before + 1) == before + 1


def test_expired_deadline_is_counted(registry: CollectorRegistry, channel: grpc.Channel) -> None:
    before = _requests(registry, "Slow", "DEADLINE_EXCEEDED")
    with pytest.raises(grpc.RpcError) as error:
        _call(channel, "Slow")(b"", timeout=0.1)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _eventually(lambda: _requests(registry, "Slow", "DEADLINE_EXCEEDED"), before + 1) == before + 1
    assert _requests(registry, "Slow", "OK") == 0


def test_health_passes_through_without_metrics(registry: CollectorRegistry, channel: grpc.Channel) -> None:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert _requests(registry, "Check", "OK") == 0


def test_streaming_reflection_passes_through(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {s.name for s in responses[0].list_services_response.service}
    assert SERVICE in names
