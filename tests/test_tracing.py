"""OpenTelemetry traces: client span -> server span -> stage spans, one trace id, the request id, and the ids in the JSON logs.

The first test serves in this process (serve() on a loop thread of its own) so that its spans land in the SDK's
in-memory exporter; the second runs `propensity serve` as deployed, exporting over OTLP/gRPC to a collector
the test runs on a free port.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import queue
import shutil
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from propensity.client import PropensityClient
from propensity.model_registry import current_version
from propensity.settings import Settings
from server.app import serve
from server.log_setup import JsonFormatter
from server.tracing import Tracing, start_tracing
from tests.conftest import SHOPPER, Pipeline, free_port, private_env, running_server, wait_for

RECOMMEND = "propensity.v1.RecommendationService/Recommend"
STAGES = ["features", "candidates", "scoring", "explain"]


def _clone(models: Path, source: str, target: str) -> str:
    """Another registry version with the same trees, to be the shadow: its scoring logs a line inside the request."""
    directory = models / "versions" / target
    shutil.copytree(models / "versions" / source, directory)
    metadata = json.loads((directory / "metadata.json").read_text())
    (directory / "metadata.json").write_text(json.dumps({**metadata, "version": target}))
    return target


def _traced_client(target: str) -> tuple[PropensityClient, InMemorySpanExporter, TracerProvider]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return PropensityClient(target, timeout=30, tracer_provider=provider), exporter, provider


class _LogCapture(logging.Handler):
    """The server's JSON formatter, writing to memory: formatted in the logging call, so inside the request's context."""

    def __init__(self) -> None:
        super().__init__()
        self.stream = io.StringIO()
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.stream.write(self.format(record) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]


@pytest.fixture
def in_process_server(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, InMemorySpanExporter, str]]:
    """serve() in this process with an in-memory span exporter; yields (target, exporter, shadow version)."""
    env, work = private_env(pipeline, "tracing", host="127.0.0.1", port=free_port(), log_format="json")
    models = work / "models"
    shadow = _clone(models, current_version(models), "v29990305T000000")
    env["PROPENSITY_SERVER__SHADOW_VERSION"] = shadow
    for key, value in env.items():
        if key.startswith("PROPENSITY_") or key.startswith("OTEL_"):
            monkeypatch.setenv(key, value)
    settings = Settings()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    started: queue.Queue = queue.Queue()
    running: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def run() -> None:
        async def main() -> None:
            stop = asyncio.Event()
            running.append((asyncio.get_running_loop(), stop))
            await serve(settings, on_started=started.put, stop=stop, tracing=Tracing(provider.get_tracer("test")))

        asyncio.run(main())

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    thread = threading.Thread(target=run, name="traced-serving-loop", daemon=True)
    thread.start()
    try:
        port = started.get(timeout=180).port
        exporter.clear()  # start-up spans, if any, are not the test's
        yield f"127.0.0.1:{port}", exporter, shadow
    finally:
        if running:
            loop, stop = running[0]
            loop.call_soon_threadsafe(stop.set)
        thread.join(60)
        root.handlers[:] = handlers
        root.setLevel(level)
    assert not thread.is_alive()


def _by_name(spans: tuple[ReadableSpan, ...] | list[ReadableSpan], name: str, kind: SpanKind | None = None) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name and (kind is None or s.kind == kind)]


def test_a_recommend_call_is_one_trace_from_the_client_span_to_the_stage_spans(in_process_server: tuple[str, InMemorySpanExporter, str]) -> None:
    target, server_spans, shadow = in_process_server
    capture = _LogCapture()
    logging.getLogger().addHandler(capture)
    client, client_spans, _ = _traced_client(target)
    try:
        with client:
            response = client.recommend(SHOPPER, num_items=3, explain=True)
            assert response.items and response.request_id and not response.fallback_used

            (client_span,) = _by_name(client_spans.get_finished_spans(), RECOMMEND, SpanKind.CLIENT)
            assert wait_for(lambda: len(_by_name(server_spans.get_finished_spans(), RECOMMEND, SpanKind.SERVER)) == 1, 5)
            finished = server_spans.get_finished_spans()
            (server_span,) = _by_name(finished, RECOMMEND, SpanKind.SERVER)

            # One trace: the server span is the client span's child (W3C traceparent in the metadata) ...
            trace_id = client_span.context.trace_id
            assert server_span.context.trace_id == trace_id
            assert server_span.parent is not None and server_span.parent.span_id == client_span.context.span_id and server_span.parent.is_remote
            # ... and each stage a child of the server span, in the order the data plane runs them.
            stages = sorted((s for s in finished if s.name in STAGES), key=lambda s: s.start_time)
            assert [s.name for s in stages] == STAGES
            for stage in stages:
                assert stage.context.trace_id == trace_id and stage.parent is not None and stage.parent.span_id == server_span.context.span_id
                assert server_span.start_time <= stage.start_time <= stage.end_time <= server_span.end_time

            # The request id on both sides, the gRPC attributes, an OK status.
            assert server_span.attributes["propensity.request_id"] == response.request_id
            assert client_span.attributes["propensity.request_id"] == response.request_id
            assert server_span.attributes["rpc.service"] == "propensity.v1.RecommendationService"
            assert server_span.attributes["rpc.method"] == "Recommend"
            assert server_span.attributes["rpc.grpc.status_code"] == 0 == client_span.attributes["rpc.grpc.status_code"]
            assert server_span.status.status_code == StatusCode.UNSET and "propensity.fallback" not in server_span.attributes

            # The JSON log line the request wrote (the shadow model's scoring) carries the trace and the server span.
            lines = [r for r in capture.records() if r.get("message") == "shadow scoring" and r.get("request_id") == response.request_id]
            assert lines, capture.stream.getvalue()[-2000:]
            assert lines[0]["shadow_version"] == shadow
            assert lines[0]["trace_id"] == trace.format_trace_id(trace_id)
            assert lines[0]["span_id"] == trace.format_span_id(server_span.context.span_id)
            # Outside a span the ids are absent (not zeros).
            logging.getLogger("propensity.test").info("no span here")
            assert "trace_id" not in capture.records()[-1] and "span_id" not in capture.records()[-1]

            # A fallback is marked on the server span, and only the stages that ran have spans.
            server_spans.clear()
            fallback = client.recommend("never-seen-shopper", num_items=3)
            assert fallback.fallback_used
            assert wait_for(lambda: len(_by_name(server_spans.get_finished_spans(), RECOMMEND, SpanKind.SERVER)) == 1, 5)
            (cold,) = _by_name(server_spans.get_finished_spans(), RECOMMEND, SpanKind.SERVER)
            assert cold.attributes["propensity.fallback"] == "UNKNOWN_USER"
            assert [s.name for s in server_spans.get_finished_spans() if s.name in STAGES] == ["features"]

            # A refused call: both spans say so, with the status code.
            server_spans.clear()
            with pytest.raises(grpc.RpcError) as refused:
                client.recommend(SHOPPER, model_version="v19990101T000000")
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            assert wait_for(lambda: len(_by_name(server_spans.get_finished_spans(), RECOMMEND, SpanKind.SERVER)) == 1, 5)
            (failed,) = _by_name(server_spans.get_finished_spans(), RECOMMEND, SpanKind.SERVER)
            failed_client = _by_name(client_spans.get_finished_spans(), RECOMMEND, SpanKind.CLIENT)[-1]
            for span in (failed, failed_client):
                assert span.status.status_code == StatusCode.ERROR and span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
                assert "NOT_FOUND" in span.status.description
            assert failed.context.trace_id == failed_client.context.trace_id

            # Health checks are not traced (probes would drown the traces).
            assert not [s for s in server_spans.get_finished_spans() if "Health" in s.name]
    finally:
        logging.getLogger().removeHandler(capture)


def test_tracing_is_off_unless_an_endpoint_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED", "PROPENSITY_SERVER__OTLP_ENDPOINT"):
        monkeypatch.delenv(variable, raising=False)
    assert start_tracing(Settings()) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert start_tracing(Settings()) is None  # the standard off switch wins
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    tracing = start_tracing(Settings())
    assert tracing is not None and tracing.provider is not None
    tracing.close()


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """The receiving end of OTLP/gRPC: what an OpenTelemetry collector's otlp receiver accepts."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []  # (service.name, span)
        self._lock = threading.Lock()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: int) -> list[tuple[str, object]]:
        with self._lock:
            return [(service, span) for service, span in self.spans if int.from_bytes(span.trace_id, "big") == trace_id]


@pytest.mark.slow
def test_the_deployed_server_exports_its_spans_over_otlp_to_the_configured_collector(pipeline: Pipeline) -> None:
    collector = _Collector()
    receiver = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    env, _ = private_env(pipeline, "tracing-otlp", otlp_endpoint=f"http://127.0.0.1:{port}", log_format="json")
    env.update({"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_SERVICE_NAME": "propensity-test"})  # export within 0.1 s, not 5 s
    try:
        with running_server(env, pipeline.root / "tracing-otlp.log") as server:
            client, client_spans, _ = _traced_client(server.target)
            with client:
                response = client.recommend(SHOPPER, num_items=3, explain=True)
            (client_span,) = _by_name(client_spans.get_finished_spans(), RECOMMEND, SpanKind.CLIENT)
            trace_id = client_span.context.trace_id
            assert wait_for(lambda: len(collector.of_trace(trace_id)) >= 1 + len(STAGES), 10), collector.spans
            exported = collector.of_trace(trace_id)
            assert {service for service, _ in exported} == {"propensity-test"}
            spans = [span for _, span in exported]
            (root,) = [s for s in spans if s.name == RECOMMEND]
            assert int.from_bytes(root.parent_span_id, "big") == client_span.context.span_id
            assert {a.key: a.value.string_value for a in root.attributes}["propensity.request_id"] == response.request_id
            assert sorted(s.name for s in spans if s.parent_span_id == root.span_id) == sorted(STAGES)
        assert "tracing: spans exported over OTLP" in server.log.read_text()
    finally:
        receiver.stop(None)
