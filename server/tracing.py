"""OpenTelemetry traces of the server: one server span per RPC, one child span per data-plane stage, exported over OTLP.

Off unless an OTLP endpoint is configured (settings.server.otlp_endpoint, or the standard
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT). Off means off: no interceptor is
installed and the recommender keeps its plain metrics observer, so the request path runs no tracing code
at all (not even a no-op tracer's). On, each worker process has its own provider and exporter thread.

What a Recommend call looks like in a trace backend::

    propensity.v1.RecommendationService/Recommend     (client span, propensity/client.py)
      propensity.v1.RecommendationService/Recommend   (server span: rpc.*, propensity.request_id, status)
        features  candidates  scoring  explain        (the stages that ran; a fallback sets propensity.fallback)

The client's context arrives as W3C `traceparent` metadata, so client and server spans share a trace id.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass

import grpc
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from propensity.settings import Settings
from server.interceptors import UNTRACKED_SERVICES, application_unary, current_request_id, final_code, rewrapped
from server.recommender import Observer

log = logging.getLogger(__name__)
REQUEST_ID_ATTRIBUTE = "propensity.request_id"
FALLBACK_ATTRIBUTE = "propensity.fallback"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
DEFAULT_SERVICE_NAME = "propensity"


def otlp_endpoint(settings: Settings) -> str:
    """The configured collector endpoint ("" when tracing is off): the settings first, then the standard variables."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ""
    return settings.server.otlp_endpoint or next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), "")


@dataclass
class Tracing:
    """A tracer for the server, and the provider to flush on shutdown when this process owns it."""

    tracer: Tracer
    provider: TracerProvider | None = None

    def interceptor(self) -> TracingInterceptor:
        return TracingInterceptor(self.tracer)

    def observer(self, inner: Observer) -> TracedStages:
        """`inner` (the metrics) with a span around every stage it times."""
        return TracedStages(inner, self.tracer)

    def close(self) -> None:
        """Export what is still buffered and stop the exporter thread. Idempotent."""
        if self.provider is not None:
            self.provider.shutdown()
            self.provider = None


def start_tracing(settings: Settings) -> Tracing | None:
    """Tracing over OTLP/gRPC when an endpoint is configured, else None (and nothing is installed).

    The provider also becomes OpenTelemetry's global one, so a library the server calls (and the Python
    client used inside it) records into the same traces. OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are
    honoured; OTEL_EXPORTER_OTLP_HEADERS, _CERTIFICATE, _TIMEOUT and _INSECURE reach the exporter as usual.
    """
    endpoint = otlp_endpoint(settings)
    if not endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # loads grpc stubs: only when on

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: DEFAULT_SERVICE_NAME}
    provider = TracerProvider(
        resource=Resource.create(attributes),
        # ParentBased: a caller's sampling decision (the traceparent flag) is kept; our own roots are sampled at the rate.
        sampler=ParentBased(TraceIdRatioBased(settings.server.trace_sample_rate)),
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    log.info("tracing: spans exported over OTLP to %s (sample rate %g)", endpoint, settings.server.trace_sample_rate)
    return Tracing(provider.get_tracer("propensity.server"), provider)


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """A server span per unary RPC of the application's services, child of the caller's `traceparent` when it sent one.

    Put it after the observability interceptor: the request id is then known when the span starts, and the
    span is the current one for auth, admission and the handler (so their log lines carry its ids).
    """

    def __init__(self, tracer: Tracer, untracked: Iterable[str] = UNTRACKED_SERVICES) -> None:
        self._tracer = tracer
        self._untracked = frozenset(untracked)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler, service, method, wrap = await application_unary(continuation, handler_call_details, self._untracked)
        if not wrap:
            return handler
        parent = propagate.extract(_carrier(handler_call_details.invocation_metadata))
        return rewrapped(handler, self._wrap(handler.unary_unary, service, method, parent))

    def _wrap(self, behavior: Callable, service: str, method: str, parent: Context) -> Callable:
        tracer, name = self._tracer, f"{service}/{method}"

        async def traced(request: object, context: grpc.aio.ServicerContext) -> object:
            attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method, REQUEST_ID_ATTRIBUTE: current_request_id()}
            with tracer.start_as_current_span(
                name, context=parent, kind=SpanKind.SERVER, attributes=attributes, record_exception=False, set_status_on_exception=False
            ) as span:
                error: BaseException | None = None
                try:
                    response = behavior(request, context)
                    if inspect.isawaitable(response):
                        response = await response
                    return response
                except BaseException as raised:
                    error = raised
                    raise
                finally:
                    code = final_code(context, error)
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    if code is not grpc.StatusCode.OK:
                        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {context.details() or ''}".rstrip(": ")))

        return traced


class TracedStages:
    """The recommender's observer with a child span per stage; fallbacks are marked on the server span."""

    def __init__(self, inner: Observer, tracer: Tracer) -> None:
        self._inner = inner
        self._tracer = tracer

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        with self._tracer.start_as_current_span(name), self._inner.stage(name):
            yield

    def count_fallback(self, reason: str) -> None:
        trace.get_current_span().set_attribute(FALLBACK_ATTRIBUTE, reason)
        self._inner.count_fallback(reason)


def _carrier(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """Text metadata as a propagation carrier (keys arrive lower-case; binary `-bin` values are skipped)."""
    return {key: value for key, value in metadata or () if isinstance(value, str)}
