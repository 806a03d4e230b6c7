"""What tracing adds to one Recommend, timed in-process (docs/deploy.md#traces).

    .venv/bin/python -m bench.tracing_overhead

- off: what the request path runs when no OTLP endpoint is configured. server/app.py then installs no
  tracing interceptor and keeps the plain metrics observer, so the only tracing code left is the JSON log
  formatter's span lookup, run once per log line (not per request); timed here per line.
- on: the server span and the four stage spans with the SDK and a batch processor (its exporter discards),
  i.e. the per-request work of TracingInterceptor and TracedStages when an endpoint is configured.
- client: PropensityClient's per-call span and traceparent injection, with no provider installed (the
  default) and with an SDK provider.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence

from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from propensity.client import PropensityClient
from server.log_setup import JsonFormatter
from server.metrics import STAGES
from server.tracing import TracedStages

N = 20_000


class _Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class _NoMetrics:
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield

    def count_fallback(self, reason: str) -> None:
        pass


def per_call_us(function: Callable[[], object], n: int = N) -> float:
    function()
    best = float("inf")
    for _ in range(5):  # best of 5: the machine is shared
        start = time.perf_counter()
        for _ in range(n):
            function()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


def main() -> None:
    record = logging.LogRecord("propensity.server", logging.INFO, __file__, 1, "a line", None, None)
    formatter = JsonFormatter()
    lookup = per_call_us(lambda: trace.get_current_span().get_span_context().is_valid, 100_000)
    print(f"off    JSON log line's span lookup (per line):         {lookup:6.2f} us  (whole line {per_call_us(lambda: formatter.format(record)):.2f} us)")

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_Discard()))
    tracer = provider.get_tracer("bench")
    stages = TracedStages(_NoMetrics(), tracer)
    carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}

    def traced_request() -> None:
        parent = propagate.extract(carrier)
        with tracer.start_as_current_span("propensity.v1.RecommendationService/Recommend", context=parent, kind=SpanKind.SERVER,
                                          attributes={"rpc.system": "grpc", "propensity.request_id": "r"}) as span:
            for name in STAGES:
                with stages.stage(name):
                    pass
            span.set_attribute("rpc.grpc.status_code", 0)

    print(f"on     server span + 4 stage spans, SDK (per request): {per_call_us(traced_request, 5_000):6.2f} us")
    provider.shutdown()

    def respond(request: object, timeout: float | None, metadata: object) -> object:
        return request

    plain = PropensityClient("127.0.0.1:1")
    bare = per_call_us(lambda: respond(None, timeout=1.0, metadata=()))
    print(f"client no provider: fast path (per call):               {per_call_us(lambda: plain._call('Recommend', respond, None, 1.0)) - bare:6.2f} us")
    sdk = TracerProvider()
    sdk.add_span_processor(BatchSpanProcessor(_Discard()))
    traced = PropensityClient("127.0.0.1:1", tracer_provider=sdk)
    print(f"client SDK provider: span + inject (per call):          {per_call_us(lambda: traced._call('Recommend', respond, None, 1.0), 5_000) - bare:6.2f} us")
    sdk.shutdown()
    plain.close()
    traced.close()
    assert trace.get_current_span() is trace.INVALID_SPAN


if __name__ == "__main__":
    main()
