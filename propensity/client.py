"""A typed client for internal Python services: deadlines, retries and credentials configured, generated stub underneath."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import grpc

from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc

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
    """

    def __init__(
        self, target: str = "localhost:50051", timeout: float = 1.0, credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
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
        self.timeout = timeout

    def recommend(self, user_id: str, num_items: int = 10, exclude_item_ids: Sequence[str] = (), candidate_item_ids: Sequence[str] = (), model_version: str = "") -> pb.RecommendResponse:
        request = pb.RecommendRequest(
            user_id=user_id, num_items=num_items, exclude_item_ids=list(exclude_item_ids),
            candidate_item_ids=list(candidate_item_ids), model_version=model_version,
        )
        return self._stub.Recommend(request, timeout=self.timeout, metadata=self._metadata)

    def score_users(self, user_ids: Sequence[str], model_version: str = "") -> pb.ScoreUsersResponse:
        return self._stub.ScoreUsers(pb.ScoreUsersRequest(user_ids=list(user_ids), model_version=model_version), timeout=self.timeout, metadata=self._metadata)

    def score_items(self, user_id: str, item_ids: Sequence[str], model_version: str = "") -> pb.ScoreItemsResponse:
        return self._stub.ScoreItems(pb.ScoreItemsRequest(user_id=user_id, item_ids=list(item_ids), model_version=model_version), timeout=self.timeout, metadata=self._metadata)

    def ingest_events(self, messages: Iterable[pb.IngestEventsRequest], timeout: float | None = None) -> pb.IngestEventsResponse:
        """Stream events (client streaming); the answer counts accepted, duplicate and rejected events."""
        return self._stub.IngestEvents(iter(messages), timeout=timeout, metadata=self._metadata)

    def model_info(self) -> pb.GetModelInfoResponse:
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PropensityClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
