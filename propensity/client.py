"""A typed client for internal Python services: deadlines, retries and credentials configured, generated stub underneath."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc

SERVICE = "propensity.v1.RecommendationService"
Response = TypeVar("Response")

# Retries only what is safe to retry: every RPC here is a read.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "propensity.v1.RecommendationService"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.02s",
                    "maxBackoff": "0.2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def tls_credentials(
    ca_file: str | Path | None = None, cert_file: str | Path | None = None, key_file: str | Path | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials from PEM files: the CA that signed the server (None: the system's roots), plus a client pair for mTLS."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs both cert_file and key_file")

    def read(path: str | Path | None) -> bytes | None:
        return Path(path).read_bytes() if path is not None else None

    return grpc.ssl_channel_credentials(root_certificates=read(ca_file), private_key=read(key_file), certificate_chain=read(cert_file))


class PropensityClient:
    """Calls RecommendationService with a per-call deadline (seconds).

    credentials: channel credentials (see `tls_credentials`); None means plaintext, for a server on loopback.
    token: a bearer token sent as `authorization: Bearer ...`; over TLS as gRPC call credentials, in plaintext
    (loopback only, where the server allows it) as call metadata, since gRPC refuses call credentials there.
    tracer_provider: where each call's client span goes (None: OpenTelemetry's global provider, a no-op until the
    application installs one). The span's context is sent as W3C `traceparent` metadata, so the server's spans
    join the caller's trace.
    """

    def __init__(
        self, target: str = "localhost:50051", timeout: float = 1.0, credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        options = [("grpc.service_config", _SERVICE_CONFIG), ("grpc.enable_retries", 1)]
        self._metadata: tuple[tuple[str, str], ...] = ()
        if credentials is not None:
            if token:
                credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
            self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._stub = pb_grpc.RecommendationServiceStub(self._channel)
        self._tracer = trace.get_tracer("propensity.client", tracer_provider=tracer_provider)
        self._own_provider = tracer_provider is not None
        self.timeout = timeout

    def recommend(
        self, user_id: str, num_items: int = 10, exclude_item_ids: Sequence[str] = (), candidate_item_ids: Sequence[str] = (), model_version: str = "",
        explain: bool = False,
    ) -> pb.RecommendResponse:
        request = pb.RecommendRequest(
            user_id=user_id, num_items=num_items, exclude_item_ids=list(exclude_item_ids),
            candidate_item_ids=list(candidate_item_ids), model_version=model_version, explain=explain,
        )
        return self._call("Recommend", self._stub.Recommend, request, self.timeout)

    def score_users(self, user_ids: Sequence[str], model_version: str = "") -> pb.ScoreUsersResponse:
        return self._call("ScoreUsers", self._stub.ScoreUsers, pb.ScoreUsersRequest(user_ids=list(user_ids), model_version=model_version), self.timeout)

    def score_items(self, user_id: str, item_ids: Sequence[str], model_version: str = "") -> pb.ScoreItemsResponse:
        return self._call("ScoreItems", self._stub.ScoreItems, pb.ScoreItemsRequest(user_id=user_id, item_ids=list(item_ids), model_version=model_version), self.timeout)

    def ingest_events(self, messages: Iterable[pb.IngestEventsRequest], timeout: float | None = None) -> pb.IngestEventsResponse:
        """Stream events (client streaming); the answer counts accepted, duplicate and rejected events."""
        return self._call("IngestEvents", self._stub.IngestEvents, iter(messages), timeout)

    def model_info(self) -> pb.GetModelInfoResponse:
        return self._call("GetModelInfo", self._stub.GetModelInfo, pb.GetModelInfoRequest(), self.timeout)

    def _call(self, method: str, stub_method: Callable[..., Response], request: object, timeout: float | None) -> Response:
        """One RPC inside a client span whose context travels as `traceparent` (nothing is sent when no span records)."""
        if not self._own_provider and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            # No provider anywhere (OpenTelemetry not set up by the application): skip the no-op span and inject (bench/tracing_overhead.py).
            return stub_method(request, timeout=timeout, metadata=self._metadata)
        with self._tracer.start_as_current_span(
            f"{SERVICE}/{method}", kind=SpanKind.CLIENT, attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method},
            record_exception=False, set_status_on_exception=False,
        ) as span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            metadata = (*self._metadata, *carrier.items()) if carrier else self._metadata
            try:
                response = stub_method(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as error:
                code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                span.set_status(Status(StatusCode.ERROR, f"{code.name}: {error.details() if isinstance(error, grpc.Call) else error}"))
                raise
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
            if getattr(response, "request_id", ""):  # the server's id for this call: the way from a trace to its log lines
                span.set_attribute("propensity.request_id", response.request_id)
            return response

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PropensityClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
