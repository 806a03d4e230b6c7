"""The gRPC servicer: protobuf in, data-plane call, protobuf out. Errors map to status codes here only."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from propensity.settings import ServerSettings
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from server import validation
from server.errors import IngestionUnavailable, InvalidArgument, ModelUnavailable, RecommendationError, StreamIdle, UnknownModelVersion
from server.forgetting import ErasureUnavailable, Forgetter
from server.ingest import EventIngestor, EventLogUnavailable, IngestReport
from server.interceptors import current_request_id
from server.queries import ItemScores, ModelsInfo, Recommendation, RecommendQuery, ScoredItem, UserScores
from server.recommender import Recommender
from server.registration import Undecodable, UndecodableRequest
from server.store_reads import StoreUnavailable

log = logging.getLogger(__name__)
Response = TypeVar("Response")
Message = TypeVar("Message")

_STATUS = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownModelVersion: grpc.StatusCode.NOT_FOUND,
    ModelUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
    IngestionUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
    ErasureUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
    EventLogUnavailable: grpc.StatusCode.UNAVAILABLE,  # nothing of the failing message was stored: retry it
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,  # ScoreItems / ScoreUsers need the online store (Recommend degrades instead)
    StreamIdle: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _handle_errors(method: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    @functools.wraps(method)
    async def wrapper(self: RecommendationServicer, request: object, context: grpc.aio.ServicerContext) -> Response:
        try:
            if type(request) is Undecodable:  # bytes that are not the request message (server/registration.py)
                raise UndecodableRequest(request.details)
            return await method(self, request, context)
        except RecommendationError as error:
            code = next((c for kind, c in _STATUS.items() if isinstance(error, kind)), grpc.StatusCode.INTERNAL)
            await context.abort(code, str(error))
        except Exception:
            log.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__}: internal error (see server log)")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


class RecommendationServicer(pb_grpc.RecommendationServiceServicer):
    """Thin adapter over Recommender."""

    def __init__(
        self, recommender: Recommender, limits: ServerSettings, ingestor: EventIngestor | IngestionUnavailable | None = None,
        forgetter: Forgetter | None = None,
    ) -> None:
        self._recommender = recommender
        self._limits = limits
        self._ingestor = ingestor  # or why ingestion is off
        self._forgetter = forgetter

    @_handle_errors
    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext) -> pb.RecommendResponse:
        query = RecommendQuery(
            user_id=validation.user_id(request.user_id),
            num_items=validation.num_items(request.num_items, self._limits),
            exclude_item_ids=validation.id_list(request.exclude_item_ids, "exclude_item_ids", self._limits.max_request_ids),
            candidate_item_ids=validation.id_list(request.candidate_item_ids, "candidate_item_ids", self._limits.max_request_ids),
            model_version=validation.model_version(request.model_version),
            explain=request.explain,
            deadline_seconds=context.time_remaining(),
            request_id=current_request_id(),
        )
        return _recommendation(self._recommender.recommend(query))

    @_handle_errors
    async def ScoreUsers(self, request: pb.ScoreUsersRequest, context: grpc.aio.ServicerContext) -> pb.ScoreUsersResponse:
        user_ids = validation.id_list(request.user_ids, "user_ids", self._limits.max_score_users, required=True)
        version = validation.model_version(request.model_version)
        return _user_scores(await self._recommender.score_users(list(user_ids), version))

    @_handle_errors
    async def ScoreItems(self, request: pb.ScoreItemsRequest, context: grpc.aio.ServicerContext) -> pb.ScoreItemsResponse:
        user_id = validation.user_id(request.user_id)
        item_ids = validation.id_list(request.item_ids, "item_ids", self._limits.max_request_ids, required=True)
        version = validation.model_version(request.model_version)
        return _item_scores(self._recommender.score_items(user_id, list(item_ids), version))

    @_handle_errors
    async def IngestEvents(self, request_iterator: AsyncIterator[pb.IngestEventsRequest], context: grpc.aio.ServicerContext) -> pb.IngestEventsResponse:
        if self._ingestor is None:
            raise IngestionUnavailable("IngestEvents: this server was started without an event log")
        if isinstance(self._ingestor, IngestionUnavailable):
            raise self._ingestor
        report = IngestReport()
        seen = 0
        try:
            async for message in _messages(request_iterator, self._limits.ingest_idle_timeout_seconds):
                await self._ingestor.ingest_message([_event_fields(e) for e in message.events], report, first_index=seen)
                seen += len(message.events)
        except (StreamIdle, UndecodableRequest) as error:
            # Every event before the silence (or the bad message) is already logged and applied: say so, in words and in numbers.
            context.set_trailing_metadata(
                (("ingest-accepted", str(report.accepted)), ("ingest-duplicates", str(report.duplicates)), ("ingest-rejected", str(report.rejected)))
            )
            raise type(error)(
                f"{error} The stream is closed after {seen} events, all handled: accepted {report.accepted}, duplicates "
                f"{report.duplicates}, rejected {report.rejected}; re-sending any of them is safe (a repeated event_id is a duplicate)."
            ) from None
        return pb.IngestEventsResponse(
            accepted=report.accepted,
            duplicates=report.duplicates,
            rejected=report.rejected,
            pushes_pending=report.pushes_pending,
            rejections=[pb.RejectedEvent(index=r.index, event_id=r.event_id, field=r.field, reason=r.reason) for r in report.rejections],
        )

    @_handle_errors
    async def ForgetUsers(self, request: pb.ForgetUsersRequest, context: grpc.aio.ServicerContext) -> pb.ForgetUsersResponse:
        user_ids = validation.id_list(request.user_ids, "user_ids", self._limits.max_score_users, required=True)
        if self._forgetter is None:
            raise ErasureUnavailable("ForgetUsers: this server was started without erasure (use `propensity forget`)")
        report = await self._forgetter.forget(list(user_ids))
        return pb.ForgetUsersResponse(
            users=report.users, event_log_events=report.event_log_events, online_rows=report.online_rows,
            files_rewritten=report.files_rewritten, file_rows=report.file_rows,
        )

    @_handle_errors
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        return _models_info(self._recommender.model_info())


async def _messages(request_iterator: AsyncIterator[Message], idle_seconds: float) -> AsyncIterator[Message]:
    """The stream's messages; StreamIdle when none arrives for idle_seconds (0: wait for ever), UndecodableRequest for bytes that are not one."""
    messages = aiter(request_iterator)
    number = 0
    while True:
        try:
            message = await asyncio.wait_for(anext(messages), timeout=idle_seconds or None)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise StreamIdle(f"IngestEvents: no message for {idle_seconds:g} s (server setting ingest_idle_timeout_seconds).") from None
        number += 1
        if type(message) is Undecodable:
            raise UndecodableRequest(f"IngestEvents message {number}: {message.details}.")
        yield message


def _event_fields(event: pb.Event) -> dict:
    return {
        "event_id": event.event_id, "event_time": event.event_time, "user_id": event.user_id, "item_id": event.item_id,
        "event_type": event.event_type, "session_id": event.session_id,
        "price": event.price if event.HasField("price") else None,
        "quantity": event.quantity if event.HasField("quantity") else None,
    }


def _recommendation(result: Recommendation) -> pb.RecommendResponse:
    return pb.RecommendResponse(
        user_id=result.user_id,
        purchase_propensity=result.purchase_propensity,
        items=[_ranked_item(item, rank) for rank, item in enumerate(result.items, start=1)],
        model_version=result.model_version,
        feature_service=result.user_feature_service,
        item_feature_service=result.item_feature_service,
        fallback_used=result.fallback.value != 0,
        fallback_reason=result.fallback.value,
        request_id=result.request_id,
    )


def _ranked_item(item: ScoredItem, rank: int) -> pb.RankedItem:
    return pb.RankedItem(
        item_id=item.item_id,
        score=item.score,
        rank=rank,
        contributions=[pb.FeatureContribution(feature=c.feature, value=c.value, contribution=c.contribution) for c in item.contributions],
        raw_score=item.raw_score,
        base_value=item.base_value,
        candidate_source=item.candidate_source,
    )


def _user_scores(result: UserScores) -> pb.ScoreUsersResponse:
    return pb.ScoreUsersResponse(
        scores=[
            pb.UserScore(user_id=u, purchase_propensity=p, unknown_user=unknown)
            for u, p, unknown in zip(result.user_ids, result.propensities, result.unknown)
        ],
        model_version=result.model_version,
        feature_service=result.feature_service,
    )


def _item_scores(result: ItemScores) -> pb.ScoreItemsResponse:
    return pb.ScoreItemsResponse(
        user_id=result.user_id,
        scores=[pb.ItemScore(item_id=i.item_id, score=i.score, known_item=i.known) for i in result.items],
        model_version=result.model_version,
        feature_service=result.feature_service,
        unknown_user=result.unknown_user,
    )


def _models_info(info: ModelsInfo) -> pb.GetModelInfoResponse:
    return pb.GetModelInfoResponse(
        models=[
            pb.ModelInfo(
                name=m.name,
                version=m.version,
                feature_service=m.feature_service,
                feature_names=m.feature_names,
                metrics=[pb.MetricValue(name=k, value=v) for k, v in sorted(m.metrics.items())],
                horizon_days=m.horizon_days,
                train_start=m.train_start,
                train_end=m.train_end,
                trained_at=m.trained_at,
            )
            for m in info.models
        ],
        current_version=info.current_version,
        available_versions=info.available_versions,
        data_as_of=info.data_as_of,
        feature_freshness=[
            pb.FeatureViewFreshness(feature_view=f.feature_view, age_seconds=f.age_seconds, ttl_seconds=f.ttl_seconds) for f in info.freshness
        ],
    )
