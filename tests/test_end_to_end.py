"""The whole product against a real server: generated stub, grpcurl (reflection and .proto), the CLI client."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone

import grpc
import pandas as pd
import pytest

from propensity.client import PropensityClient
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from tests.conftest import BIN, HISTORICAL_END, PROJECT_ROOT, SHOPPER, Pipeline, RunningServer

pytestmark = pytest.mark.slow
SERVICE = "propensity.v1.RecommendationService"


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> pb_grpc.RecommendationServiceStub:
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.RecommendationServiceStub(channel)
    channel.close()


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "grpcurl"), "-plaintext", *args], capture_output=True, text=True, timeout=30)


def test_pipeline_reports_each_stage_and_validation_auc(pipeline: Pipeline) -> None:
    out = pipeline.run_output
    for stage in ("prepare", "build features", "feast apply + materialize", "train"):
        assert stage in out
    assert "validation AUC" in out
    manifest = json.loads((pipeline.work_dir / "prepared" / "manifest.json").read_text())
    assert manifest["original_as_of"].startswith("2011-12-10")
    assert manifest["shift_days"] > 5000  # 2011 -> today


def test_historical_log_is_served_with_fresh_features(pipeline: Pipeline, stub: pb_grpc.RecommendationServiceStub) -> None:
    """The log ended in 2011, yet its last shopper is served personally: the rebase kept features servable."""
    response = stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, num_items=10), timeout=5)
    assert not response.fallback_used
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    as_of = datetime.fromisoformat(info.data_as_of)
    assert abs((datetime.now(timezone.utc) - as_of).days) <= 1
    assert as_of > HISTORICAL_END


def test_viewed_and_carted_item_is_ranked_near_the_top(pipeline: Pipeline, stub: pb_grpc.RecommendationServiceStub) -> None:
    response = stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, num_items=10), timeout=5)
    ranked = [item.item_id for item in response.items]
    assert pipeline.shopper_item in ranked[:3], ranked
    assert [item.rank for item in response.items] == list(range(1, len(ranked) + 1))
    scores = [item.score for item in response.items]
    assert scores == sorted(scores, reverse=True)
    assert all(item.candidate_source for item in response.items)
    assert response.purchase_propensity > 0
    assert response.model_version and response.feature_service == "propensity_user_v2"


def test_the_carted_item_scores_higher_for_the_shopper_than_for_a_stranger(pipeline: Pipeline, stub: pb_grpc.RecommendationServiceStub) -> None:
    item = pipeline.shopper_item
    mine = stub.ScoreItems(pb.ScoreItemsRequest(user_id=SHOPPER, item_ids=[item]), timeout=5).scores[0]
    stranger = stub.ScoreItems(pb.ScoreItemsRequest(user_id="never-seen", item_ids=[item]), timeout=5)
    assert stranger.unknown_user
    assert mine.known_item and mine.score > 3 * stranger.scores[0].score


def test_unknown_user_gets_a_popularity_fallback(stub: pb_grpc.RecommendationServiceStub) -> None:
    response = stub.Recommend(pb.RecommendRequest(user_id="someone-new"), timeout=5)
    assert response.fallback_used
    assert response.fallback_reason == pb.FALLBACK_REASON_UNKNOWN_USER
    assert len(response.items) == 10
    scores = [item.score for item in response.items]
    assert scores == sorted(scores, reverse=True)  # ranked for an anonymous shopper, not listed by popularity
    assert {item.candidate_source for item in response.items} == {"popular"}
    info = stub.ScoreUsers(pb.ScoreUsersRequest(user_ids=["someone-new"]), timeout=5).scores[0]
    assert info.unknown_user and info.purchase_propensity == pytest.approx(response.purchase_propensity)


def test_exclusions_and_explicit_candidates(pipeline: Pipeline, stub: pb_grpc.RecommendationServiceStub) -> None:
    item = pipeline.shopper_item
    excluded = stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, exclude_item_ids=[item]), timeout=5)
    assert item not in [i.item_id for i in excluded.items]
    others = [i.item_id for i in excluded.items[:3]]
    chosen = stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, candidate_item_ids=[*others, item, "not-an-item"]), timeout=5)
    assert sorted(i.item_id for i in chosen.items) == sorted([*others, item, "not-an-item"])
    assert chosen.items[0].item_id == item
    assert {i.candidate_source for i in chosen.items} == {"request"}


def test_score_users_keeps_request_order(pipeline: Pipeline, stub: pb_grpc.RecommendationServiceStub) -> None:
    users = pd.read_parquet(pipeline.work_dir / "prepared" / "events.parquet", columns=["user_id"])["user_id"].unique()[:50].tolist()
    response = stub.ScoreUsers(pb.ScoreUsersRequest(user_ids=[*users, "ghost"]), timeout=5)
    assert [s.user_id for s in response.scores] == [*users, "ghost"]
    assert not any(s.unknown_user for s in response.scores[:-1]) and response.scores[-1].unknown_user
    assert len({round(s.purchase_propensity, 6) for s in response.scores}) > 10  # personal, not constant
    assert all(0 < s.purchase_propensity < 1 for s in response.scores)


def test_model_info_names_versions_services_and_metrics(stub: pb_grpc.RecommendationServiceStub) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert {m.name for m in info.models} == {"user_propensity", "item_ranker"}
    assert info.current_version in info.available_versions
    for model in info.models:
        metrics = {m.name: m.value for m in model.metrics}
        assert metrics["auc"] > 0.6, (model.name, metrics)
        assert model.feature_names and model.horizon_days == 7


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        ("Recommend", pb.RecommendRequest(user_id=""), "user_id"),
        ("Recommend", pb.RecommendRequest(user_id="u", num_items=101), "num_items"),
        ("Recommend", pb.RecommendRequest(user_id="u", num_items=-1), "num_items"),
        ("Recommend", pb.RecommendRequest(user_id="u", exclude_item_ids=["x"] * 1001), "exclude_item_ids"),
        ("Recommend", pb.RecommendRequest(user_id="u", candidate_item_ids=["a", ""]), "candidate_item_ids[1]"),
        ("ScoreUsers", pb.ScoreUsersRequest(), "user_ids"),
        ("ScoreItems", pb.ScoreItemsRequest(user_id="u"), "item_ids"),
        ("ScoreItems", pb.ScoreItemsRequest(user_id="x" * 200, item_ids=["a"]), "user_id"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(stub: pb_grpc.RecommendationServiceStub, method: str, request_: object, field: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, method)(request_, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(field + ":"), caught.value.details()


def test_unknown_model_version_is_not_found(stub: pb_grpc.RecommendationServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, model_version="v19990101T000000"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "model_version" in caught.value.details()


def test_pinning_the_current_version_answers_with_it(stub: pb_grpc.RecommendationServiceStub) -> None:
    version = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).current_version
    assert stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, model_version=version), timeout=5).model_version == version


def test_grpcurl_lists_and_describes_through_reflection(server: RunningServer) -> None:
    listed = grpcurl(server.target, "list")
    assert listed.returncode == 0, listed.stderr
    assert SERVICE in listed.stdout.split() and "grpc.health.v1.Health" in listed.stdout.split()
    methods = grpcurl(server.target, "list", SERVICE).stdout.split()
    assert methods == [f"{SERVICE}.{m}" for m in ("ForgetUsers", "GetModelInfo", "IngestEvents", "Recommend", "ScoreItems", "ScoreUsers")]
    described = grpcurl(server.target, "describe", "propensity.v1.RecommendRequest")
    assert "candidate_item_ids" in described.stdout


@pytest.mark.parametrize("use_proto_files", [False, True], ids=["reflection", "proto-files"])
def test_grpcurl_calls_every_rpc(server: RunningServer, pipeline: Pipeline, use_proto_files: bool) -> None:
    schema = ["-import-path", str(PROJECT_ROOT / "protos"), "-proto", "propensity/v1/recommendation_service.proto"] if use_proto_files else []
    calls = {
        "Recommend": {"user_id": SHOPPER, "num_items": 3},
        "ScoreUsers": {"user_ids": [SHOPPER, "ghost"]},
        "ScoreItems": {"user_id": SHOPPER, "item_ids": [pipeline.shopper_item]},
        "GetModelInfo": {},
    }
    for method, body in calls.items():
        result = grpcurl(*schema, "-d", json.dumps(body), server.target, f"{SERVICE}/{method}")
        assert result.returncode == 0, (method, result.stderr)
        answer = json.loads(result.stdout)
        assert answer, method
    bad = grpcurl(*schema, "-d", json.dumps({"user_id": "", "num_items": 3}), server.target, f"{SERVICE}/Recommend")
    assert bad.returncode != 0 and "InvalidArgument" in bad.stderr and "user_id" in bad.stderr


def test_health_check_through_grpcurl(server: RunningServer) -> None:
    result = grpcurl("-d", json.dumps({"service": SERVICE}), server.target, "grpc.health.v1.Health/Check")
    assert json.loads(result.stdout)["status"] == "SERVING"


def test_python_client_and_recommend_command(server: RunningServer, pipeline: Pipeline) -> None:
    with PropensityClient(server.target, timeout=5) as client:
        assert client.recommend(SHOPPER, num_items=4).items[0].rank == 1
        assert client.model_info().current_version
    result = subprocess.run([str(BIN / "propensity"), "recommend", SHOPPER, "--target", server.target, "--num-items", "3"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert SHOPPER in result.stdout and pipeline.shopper_item in result.stdout
    failing = subprocess.run([str(BIN / "propensity"), "recommend", "", "--target", server.target], capture_output=True, text=True, timeout=30)
    assert failing.returncode == 1 and "INVALID_ARGUMENT" in failing.stderr
