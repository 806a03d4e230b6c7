"""Tests for the servicer's status codes over a real in-process grpc.aio server and the generated stub."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pandas as pd
import pytest

from propensity.assembly import RANKER_FEATURES, USER_MODEL_FEATURES
from propensity.catalog import Catalog
from propensity.model_registry import RANKER_MODEL, USER_MODEL, promote, save_version
from propensity.settings import CandidateSettings, ServerSettings
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from server.errors import IngestionUnavailable, InvalidArgument, ModelUnavailable, RecommendationError, UnknownModelVersion
from server.item_cache import StaticCatalog
from server.model_pool import ModelPool
from server.queries import ItemScores, ModelsInfo, Recommendation, RecommendQuery, ScoredItem, UserScores
from server.recommender import Recommender
from server.servicer import RecommendationServicer
from tests.aio_server import ThreadedAioServer
from tests.tiny_models import tiny_booster

LIMITS = ServerSettings()  # max_num_items 100, max_request_ids 1000, max_score_users 10_000
NOW = 1_700_000_000


def _Server(servicer: RecommendationServicer) -> ThreadedAioServer:
    """The servicer on a real grpc.aio server (no interceptors)."""
    return ThreadedAioServer(lambda server: pb_grpc.add_RecommendationServiceServicer_to_server(servicer, server))


class _Scripted:
    """A data plane that answers with fixed results, or raises the error it was told to."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.queries: list[object] = []

    def _answer(self, query: object) -> None:
        self.queries.append(query)
        if self.error is not None:
            raise self.error

    def recommend(self, query: RecommendQuery) -> Recommendation:
        self._answer(query)
        return Recommendation(query.user_id, 0.5, [ScoredItem("i1", 0.9), ScoredItem("i2", 0.4)], "v1", "users_v1", "items_v1")

    async def score_users(self, user_ids: list[str], model_version: str = "") -> UserScores:
        self._answer((user_ids, model_version))
        return UserScores(user_ids, [0.1] * len(user_ids), [False] * len(user_ids), "v1", "users_v1")

    def score_items(self, user_id: str, item_ids: list[str], model_version: str = "") -> ItemScores:
        self._answer((user_id, item_ids, model_version))
        return ItemScores(user_id, [ScoredItem(i, 0.2) for i in item_ids], False, "v1", "users_v1")

    def model_info(self) -> ModelsInfo:
        self._answer(None)
        return ModelsInfo(current_version="v1", available_versions=["v1"])


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[tuple[_Scripted, pb_grpc.RecommendationServiceStub]]:
    plane = _Scripted()
    server = _Server(RecommendationServicer(plane, LIMITS))  # type: ignore[arg-type]
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield plane, pb_grpc.RecommendationServiceStub(channel)
    finally:
        channel.close()
        server.stop()


@pytest.fixture()
def plane(scripted_server: tuple[_Scripted, pb_grpc.RecommendationServiceStub]) -> _Scripted:
    plane = scripted_server[0]
    plane.error = None
    plane.queries.clear()
    return plane


@pytest.fixture()
def stub(scripted_server: tuple[_Scripted, pb_grpc.RecommendationServiceStub], plane: _Scripted) -> pb_grpc.RecommendationServiceStub:
    return scripted_server[1]


def _status(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call(request, timeout=5)
    return error.value


def test_valid_recommend_reaches_the_data_plane(stub: pb_grpc.RecommendationServiceStub, plane: _Scripted) -> None:
    response = stub.Recommend(pb.RecommendRequest(user_id="u1", exclude_item_ids=["x"]), timeout=5)
    [query] = plane.queries
    assert (query.user_id, query.num_items, query.exclude_item_ids, query.candidate_item_ids, query.model_version) == ("u1", 10, ("x",), (), "")  # num_items 0 -> default 10
    assert not query.explain
    # The client's 5 s deadline reaches the data plane. grpc re-derives it on the server from the grpc-timeout header
    # against the server's clock, so it can read a few ms above 5 (5.009 s seen in CI).
    assert 4 < query.deadline_seconds <= 5.1
    assert [(i.item_id, i.rank) for i in response.items] == [("i1", 1), ("i2", 2)]
    assert response.feature_service == "users_v1"
    assert response.item_feature_service == "items_v1"
    assert not response.fallback_used


def test_empty_user_id(stub: pb_grpc.RecommendationServiceStub, plane: _Scripted) -> None:
    error = _status(stub.Recommend, pb.RecommendRequest(user_id=""))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("user_id: ")
    assert plane.queries == []


def test_too_many_items(stub: pb_grpc.RecommendationServiceStub) -> None:
    error = _status(stub.Recommend, pb.RecommendRequest(user_id="u1", num_items=101))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("num_items: ")
    assert "101" in error.details()


def test_too_many_excluded_items(stub: pb_grpc.RecommendationServiceStub) -> None:
    request = pb.RecommendRequest(user_id="u1", exclude_item_ids=[f"i{k}" for k in range(1001)])
    error = _status(stub.Recommend, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "exclude_item_ids: at most 1000 ids per request, got 1001"


def test_empty_candidate_id(stub: pb_grpc.RecommendationServiceStub) -> None:
    error = _status(stub.Recommend, pb.RecommendRequest(user_id="u1", candidate_item_ids=["a", ""]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "candidate_item_ids[1]: empty id"


def test_score_users_without_ids(stub: pb_grpc.RecommendationServiceStub) -> None:
    error = _status(stub.ScoreUsers, pb.ScoreUsersRequest(user_ids=[]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("user_ids: ")


def test_score_users_with_an_empty_id(stub: pb_grpc.RecommendationServiceStub, plane: _Scripted) -> None:
    error = _status(stub.ScoreUsers, pb.ScoreUsersRequest(user_ids=["a", ""]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "user_ids[1]: empty id"
    assert plane.queries == []


def test_score_items_checks_user_and_items(stub: pb_grpc.RecommendationServiceStub) -> None:
    error = _status(stub.ScoreItems, pb.ScoreItemsRequest(user_id="", item_ids=["a"]))
    assert (error.code(), error.details().split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "user_id")
    error = _status(stub.ScoreItems, pb.ScoreItemsRequest(user_id="u1"))
    assert (error.code(), error.details().split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "item_ids")


@pytest.mark.parametrize(
    ("raised", "code"),
    [
        (UnknownModelVersion("model_version: no model version 'v9'"), grpc.StatusCode.NOT_FOUND),
        (ModelUnavailable("model_version v2: broken"), grpc.StatusCode.FAILED_PRECONDITION),
        (InvalidArgument("model_version", "bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (RecommendationError("something domain-specific"), grpc.StatusCode.INTERNAL),
    ],
)
def test_domain_errors_map_to_status_codes_with_their_message(
    stub: pb_grpc.RecommendationServiceStub, plane: _Scripted, raised: Exception, code: grpc.StatusCode
) -> None:
    plane.error = raised
    for call, request in (
        (stub.Recommend, pb.RecommendRequest(user_id="u1")),
        (stub.ScoreUsers, pb.ScoreUsersRequest(user_ids=["u1"])),
        (stub.ScoreItems, pb.ScoreItemsRequest(user_id="u1", item_ids=["a"])),
        (stub.GetModelInfo, pb.GetModelInfoRequest()),
    ):
        error = _status(call, request)
        assert error.code() == code
        assert error.details() == str(raised)


def test_unexpected_exception_is_internal_without_details(stub: pb_grpc.RecommendationServiceStub, plane: _Scripted) -> None:
    plane.error = KeyError("secret column /srv/feast/registry.db")
    error = _status(stub.ScoreUsers, pb.ScoreUsersRequest(user_ids=["u1"]))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "ScoreUsers: internal error (see server log)"
    assert "secret" not in error.details()
    assert "Traceback" not in error.details()


# --- The real data plane: Recommender over a real ModelPool of tiny LightGBM models in tmp_path. ---


class _UserRows:
    """User feature rows by id, the shape OnlineUserFeatures.fetch returns (unknown users get an empty row)."""

    def __init__(self, rows: dict[str, dict[str, object]]) -> None:
        self._rows = rows

    def fetch(self, user_ids: list[str]) -> list[dict[str, object]]:
        return [self._rows.get(u, {}) for u in user_ids]

    def fetch_columns(self, user_ids: list[str]) -> dict[str, list[object]]:
        names = sorted({name for row in self._rows.values() for name in row})
        return {name: [self._rows.get(u, {}).get(name) for u in user_ids] for name in names}

    fetch_arrays = fetch_columns  # UserBatch takes plain lists as well as the real read's Arrow columns


def _metadata(user_features: list[str]) -> dict:
    return {
        "trained_at": "2024-01-01T00:00:00+00:00",
        "horizon_days": 7,
        "train_window": {"start": "2023-12-01", "end": "2023-12-22"},
        "feature_services": {"user": {"name": "users_v1", "fingerprint": "f1"}, "item": {"name": "items_v1", "fingerprint": "f2"}},
        "models": {
            USER_MODEL: {"feature_names": user_features, "metrics": {"auc": 0.7}, "base_rate": 0.125},
            RANKER_MODEL: {"feature_names": list(RANKER_FEATURES), "metrics": {"auc": 0.8}, "base_rate": 0.05},
        },
    }


@pytest.fixture(scope="module")
def real_stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.RecommendationServiceStub]:
    root: Path = tmp_path_factory.mktemp("models")
    ranker = tiny_booster(RANKER_FEATURES, 1)
    save_version(root, "v1", {USER_MODEL: tiny_booster(USER_MODEL_FEATURES, 0), RANKER_MODEL: ranker}, _metadata(list(USER_MODEL_FEATURES)))
    stale = [*USER_MODEL_FEATURES[:-1], "legacy_feature"]
    save_version(root, "v2", {USER_MODEL: tiny_booster(stale, 0), RANKER_MODEL: ranker}, _metadata(stale))
    promote(root, "v1")
    catalog = Catalog.from_frame(
        pd.DataFrame({"item_id": ["a", "b", "c", "d"], "category_id": ["c1", "c1", "c2", "c2"], "item_purchases_7d": [4, 3, 2, 1]})
    )
    rows = {"u1": {"last_event_ts": NOW, "signup_ts": NOW - 86_400 * 30, "recent_item_ids": ["c"], "top_category_ids": ["c1"]}}
    recommender = Recommender(ModelPool(root, lambda bundle: None), _UserRows(rows), StaticCatalog(catalog), CandidateSettings(), LIMITS, "2024-01-01")
    server = _Server(RecommendationServicer(recommender, LIMITS))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield pb_grpc.RecommendationServiceStub(channel)
    finally:
        channel.close()
        server.stop()


def test_real_recommend_answers_with_the_current_model(real_stub: pb_grpc.RecommendationServiceStub) -> None:
    response = real_stub.Recommend(pb.RecommendRequest(user_id="u1", num_items=2, exclude_item_ids=["a"]), timeout=5)
    assert response.model_version == "v1"
    assert [i.rank for i in response.items] == [1, 2]
    assert {i.item_id for i in response.items} < {"b", "c", "d"}
    assert len({i.item_id for i in response.items}) == 2
    scores = [i.score for i in response.items]
    assert scores == sorted(scores, reverse=True)
    assert 0.0 < response.purchase_propensity < 1.0
    assert not response.fallback_used


def test_real_unknown_user_gets_the_base_rate(real_stub: pb_grpc.RecommendationServiceStub) -> None:
    response = real_stub.ScoreUsers(pb.ScoreUsersRequest(user_ids=["nobody"]), timeout=5)
    assert [(s.user_id, s.purchase_propensity, s.unknown_user) for s in response.scores] == [("nobody", 0.125, True)]


def test_real_unknown_model_version_is_not_found(real_stub: pb_grpc.RecommendationServiceStub) -> None:
    error = _status(real_stub.Recommend, pb.RecommendRequest(user_id="u1", model_version="v9"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details().startswith("model_version: ")
    assert "'v9'" in error.details()


def test_real_version_with_a_stale_feature_layout_is_failed_precondition(real_stub: pb_grpc.RecommendationServiceStub) -> None:
    error = _status(real_stub.ScoreUsers, pb.ScoreUsersRequest(user_ids=["u1"], model_version="v2"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "legacy_feature" in error.details()


def test_real_model_info(real_stub: pb_grpc.RecommendationServiceStub) -> None:
    info = real_stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert info.current_version == "v1"
    assert list(info.available_versions) == ["v1", "v2"]
    assert info.data_as_of == "2024-01-01"
    by_name = {m.name: m for m in info.models}
    assert list(by_name[USER_MODEL].feature_names) == list(USER_MODEL_FEATURES)
    assert by_name[RANKER_MODEL].feature_service == "users_v1+items_v1"
    assert [(m.name, m.value) for m in by_name[USER_MODEL].metrics] == [("auc", pytest.approx(0.7))]


@pytest.mark.parametrize(
    ("ingestor", "expected"),
    [
        (None, "without an event log"),
        (IngestionUnavailable("IngestEvents: the Feast registry has no push source 'user_activity_push'; run `feast apply`"), "push source"),
    ],
)
def test_ingest_events_says_why_ingestion_is_off(ingestor, expected: str) -> None:
    server = _Server(RecommendationServicer(_Scripted(), LIMITS, ingestor))  # type: ignore[arg-type]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.RecommendationServiceStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.IngestEvents(iter([pb.IngestEventsRequest(events=[pb.Event(event_id="e1")])]), timeout=5)
    finally:
        server.stop()
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert expected in error.value.details()
