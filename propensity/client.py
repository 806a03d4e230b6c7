"""A typed client for internal Python services: deadlines and retries configured, generated stub underneath."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

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


class PropensityClient:
    """Calls RecommendationService with a per-call deadline (seconds)."""

    def __init__(self, target: str = "localhost:50051", timeout: float = 1.0) -> None:
        self._channel = grpc.insecure_channel(target, options=[("grpc.service_config", _SERVICE_CONFIG), ("grpc.enable_retries", 1)])
        self._stub = pb_grpc.RecommendationServiceStub(self._channel)
        self.timeout = timeout

    def recommend(self, user_id: str, num_items: int = 10, exclude_item_ids: Sequence[str] = (), candidate_item_ids: Sequence[str] = (), model_version: str = "") -> pb.RecommendResponse:
        request = pb.RecommendRequest(
            user_id=user_id, num_items=num_items, exclude_item_ids=list(exclude_item_ids),
            candidate_item_ids=list(candidate_item_ids), model_version=model_version,
        )
        return self._stub.Recommend(request, timeout=self.timeout)

    def score_users(self, user_ids: Sequence[str], model_version: str = "") -> pb.ScoreUsersResponse:
        return self._stub.ScoreUsers(pb.ScoreUsersRequest(user_ids=list(user_ids), model_version=model_version), timeout=self.timeout)

    def score_items(self, user_id: str, item_ids: Sequence[str], model_version: str = "") -> pb.ScoreItemsResponse:
        return self._stub.ScoreItems(pb.ScoreItemsRequest(user_id=user_id, item_ids=list(item_ids), model_version=model_version), timeout=self.timeout)

    def ingest_events(self, messages: Iterable[pb.IngestEventsRequest], timeout: float | None = None) -> pb.IngestEventsResponse:
        """Stream events (client streaming); the answer counts accepted, duplicate and rejected events."""
        return self._stub.IngestEvents(iter(messages), timeout=timeout)

    def model_info(self) -> pb.GetModelInfoResponse:
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PropensityClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
