"""Property-based tests (hypothesis) against a real running server: arbitrary Recommend, ScoreItems and IngestEvents
requests never crash it, never get INTERNAL (or UNKNOWN) for a client's mistake, get exactly the status the
request rules predict, and a valid call made afterwards still succeeds.

Examples are derandomized (the same 150 per RPC on every run): CI stays reproducible.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import grpc
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from propensity.realtime import InvalidEvent, parse_event
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from tests.conftest import Pipeline, RunningServer, private_env, running_server, users

pytestmark = pytest.mark.slow

EXAMPLES = settings(
    max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
ITEMS = [f"i{k:05d}" for k in range(1, 40)]
USERS: list[str] = []  # filled from the pipeline by the fixture (strategies are built at import time)


@dataclass(frozen=True)
class Served:
    server: RunningServer
    stub: pb_grpc.RecommendationServiceStub
    current_version: str


@pytest.fixture(scope="module")
def served(pipeline: Pipeline) -> Iterator[Served]:
    # Its own event log and online store: accepted arbitrary events must not reach the shared pipeline's.
    env, work = private_env(pipeline, "property", copy_repo=True)
    USERS[:] = users(pipeline, 5)
    items = pd.read_parquet(work / "prepared" / "items.parquet", columns=["item_id"])["item_id"].astype(str)
    ITEMS[:] = items.head(40).tolist()
    with running_server(env, pipeline.root / "property.log") as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommendationServiceStub(channel)
        yield Served(server, stub, stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).current_version)


# --- the request rules, restated independently of server/validation.py ------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def bad_id(value: str) -> bool:
    return not value.strip() or len(value) > 128 or bool(_CONTROL.search(value))


def first_bad_list(values: list[str], field: str, limit: int, required: bool = False) -> str | None:
    if (required and not values) or len(values) > limit:
        return field
    return next((f"{field}[{k}]" for k, v in enumerate(values) if bad_id(v)), None)


def recommend_problem(request: pb.RecommendRequest) -> str | None:
    """The field the server must name, in its order of checks; None for a valid request."""
    if bad_id(request.user_id):
        return "user_id"
    if not 0 <= request.num_items <= 100:
        return "num_items"
    return (
        first_bad_list(list(request.exclude_item_ids), "exclude_item_ids", 1000)
        or first_bad_list(list(request.candidate_item_ids), "candidate_item_ids", 1000)
        or ("model_version" if request.model_version and bad_id(request.model_version) else None)
    )


def score_items_problem(request: pb.ScoreItemsRequest) -> str | None:
    if bad_id(request.user_id):
        return "user_id"
    return first_bad_list(list(request.item_ids), "item_ids", 1000, required=True) or (
        "model_version" if request.model_version and bad_id(request.model_version) else None
    )


# --- strategies ------------------------------------------------------------------------------------------------------------

def mostly(valid: st.SearchStrategy, hostile: st.SearchStrategy) -> st.SearchStrategy:
    """Four in five draws valid: each field is broken often, and about a third of whole requests are valid.

    (st.one_of flattens nested alternatives and would not keep these weights.)
    """
    return st.integers(0, 4).flatmap(lambda k: hostile if k == 0 else valid)


hostile_text = st.text(max_size=140) | st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(["", " ", "\x00", "x" * 129, "a\nb"])
# Any printable Unicode: unknown ids are valid requests (an unknown user gets the fallback, an unknown item known_item=False).
fine_text = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=128).filter(str.strip)
user_ids = mostly(st.deferred(lambda: st.sampled_from(USERS)) | fine_text, hostile_text)
valid_items = st.deferred(lambda: st.sampled_from(ITEMS)) | fine_text
item_lists = mostly(st.lists(valid_items, max_size=8), st.lists(valid_items | hostile_text, min_size=1, max_size=8))
versions = mostly(st.just(""), hostile_text | st.sampled_from(["v1", "../CURRENT", "CURRENT"]))
counts = mostly(st.integers(0, 100), st.integers(-(2**31), 2**31 - 1) | st.integers(-2, 102))

recommend_requests = st.builds(
    pb.RecommendRequest,
    user_id=user_ids,
    num_items=counts,
    exclude_item_ids=item_lists,
    candidate_item_ids=st.just([]) | item_lists,
    model_version=versions,
    explain=st.booleans(),
)
score_items_requests = st.builds(
    pb.ScoreItemsRequest, user_id=user_ids, item_ids=mostly(st.lists(valid_items, min_size=1, max_size=8), item_lists), model_version=versions
)

_now = datetime.now(timezone.utc)
recent = st.datetimes(min_value=(_now - timedelta(days=30)).replace(tzinfo=None), max_value=_now.replace(tzinfo=None))
times = mostly(
    recent.map(datetime.isoformat) | recent.map(lambda t: str(int(t.replace(tzinfo=timezone.utc).timestamp() * 1000))),
    st.datetimes(min_value=datetime(1960, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(timezone.utc)).map(datetime.isoformat)
    | st.integers(-(10**15), 10**15).map(str)
    | hostile_text,
)
numbers = mostly(st.none() | st.floats(0.0, 1000.0) | st.floats(0.01, 10.0), st.floats(allow_nan=True, allow_infinity=True))

def _event(**fields: object) -> pb.Event:
    return pb.Event(**{k: v for k, v in fields.items() if v is not None})


_sequence = itertools.count()
valid_events = st.builds(
    _event,
    event_id=st.uuids().map(lambda u: f"{u}-{next(_sequence)}"),  # hypothesis repeats uuids: these would be duplicates
    event_time=recent.map(datetime.isoformat),
    user_id=st.sampled_from(["prop-user-1", "prop-user-2"]) | fine_text,
    item_id=valid_items,
    event_type=st.sampled_from(["view", "add_to_cart", "purchase", "return"]),
    session_id=st.just("") | fine_text,
    price=st.none() | st.floats(0.0, 1000.0),
    quantity=st.none() | st.floats(0.01, 10.0),
)
# Each field of a hostile event is broken one time in five (several may be at once).
hostile_events = st.builds(
    _event,
    event_id=mostly(st.uuids().map(str), hostile_text),
    event_time=times,
    user_id=mostly(st.sampled_from(["prop-user-1", "prop-user-2"]) | fine_text, hostile_text),
    item_id=mostly(valid_items, hostile_text),
    event_type=mostly(st.sampled_from(["view", "add_to_cart", "purchase", "return"]), hostile_text),
    session_id=mostly(st.just("") | fine_text, hostile_text),
    price=numbers,
    quantity=mostly(st.none() | st.floats(0.01, 10.0), st.floats(allow_nan=True, allow_infinity=True)),
)
events = st.integers(0, 1).flatmap(lambda k: hostile_events if k else valid_events)
# Small streams: each message with a valid event costs a Feast push (~50-250 ms here), and the file must stay under a minute.
ingest_streams = st.lists(st.builds(pb.IngestEventsRequest, events=st.lists(events, max_size=4)), max_size=2)


def _field_of(details: str) -> str:
    return details.split(":", 1)[0]


# --- properties ------------------------------------------------------------------------------------------------------------


@EXAMPLES
@given(request=recommend_requests)
def test_any_recommend_request_gets_the_predicted_status(served: Served, request: pb.RecommendRequest) -> None:
    expected = recommend_problem(request)
    try:
        response = served.stub.Recommend(request, timeout=10)
    except grpc.RpcError as error:
        code, details = error.code(), error.details()
        event(f"{code.name} {_field_of(details).split('[')[0]}")
        if expected:
            assert (code, _field_of(details)) == (grpc.StatusCode.INVALID_ARGUMENT, expected), details
        else:  # a well-formed version that does not exist
            assert (code, _field_of(details)) == (grpc.StatusCode.NOT_FOUND, "model_version"), details
            assert request.model_version not in ("", served.current_version)
        return
    event("OK fallback" if response.fallback_used else "OK ranked")
    assert expected is None, f"accepted a request with a bad {expected}"
    wanted = request.num_items or 10
    assert len(response.items) <= wanted
    assert [i.rank for i in response.items] == list(range(1, len(response.items) + 1))
    assert not {i.item_id for i in response.items} & set(request.exclude_item_ids)
    if request.candidate_item_ids and not response.fallback_used:
        assert {i.item_id for i in response.items} <= set(request.candidate_item_ids)
    scores = [i.score for i in response.items]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)


@EXAMPLES
@given(request=score_items_requests)
def test_any_score_items_request_gets_the_predicted_status(served: Served, request: pb.ScoreItemsRequest) -> None:
    expected = score_items_problem(request)
    try:
        response = served.stub.ScoreItems(request, timeout=10)
    except grpc.RpcError as error:
        code, details = error.code(), error.details()
        event(f"{code.name} {_field_of(details).split('[')[0]}")
        if expected:
            assert (code, _field_of(details)) == (grpc.StatusCode.INVALID_ARGUMENT, expected), details
        else:
            assert (code, _field_of(details)) == (grpc.StatusCode.NOT_FOUND, "model_version"), details
        return
    event("OK")
    assert expected is None, f"accepted a request with a bad {expected}"
    assert [s.item_id for s in response.scores] == list(request.item_ids)
    assert all(0.0 <= s.score <= 1.0 for s in response.scores)


def _rejected_by_rules(stream: list[pb.IngestEventsRequest]) -> dict[int, str]:
    """Stream index -> field, as the shared event rules (propensity.realtime.parse_event) judge each event."""
    verdicts, index = {}, 0
    for message in stream:
        for e in message.events:
            try:
                parse_event(e.event_id, e.event_time, e.user_id, e.item_id, e.event_type, e.session_id,
                            e.price if e.HasField("price") else None, e.quantity if e.HasField("quantity") else None)
            except InvalidEvent as error:
                verdicts[index] = error.field
            index += 1
    return verdicts


@EXAMPLES
@given(stream=ingest_streams)
def test_any_ingest_stream_is_answered_ok_with_every_bad_event_reported(served: Served, stream: list[pb.IngestEventsRequest]) -> None:
    total = sum(len(m.events) for m in stream)
    response = served.stub.IngestEvents(iter(stream), timeout=30)
    expected = _rejected_by_rules(stream)
    event(f"accepted {min(response.accepted, 3)}+, rejected {min(response.rejected, 3)}+")
    assert {r.index: r.field for r in response.rejections} == expected
    assert response.rejected == len(expected)
    assert response.accepted + response.duplicates == total - len(expected)
    assert all(r.reason for r in response.rejections)


def test_after_all_that_the_server_is_alive_and_a_valid_call_succeeds(served: Served) -> None:
    """Runs after the properties (file order): the same process, SERVING, answering valid calls of every RPC."""
    assert served.server.process.poll() is None
    with grpc.insecure_channel(served.server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    user = USERS[0]
    assert served.stub.Recommend(pb.RecommendRequest(user_id=user, num_items=5), timeout=5).items
    assert served.stub.ScoreItems(pb.ScoreItemsRequest(user_id=user, item_ids=ITEMS[:3]), timeout=5).scores
    assert served.stub.ScoreUsers(pb.ScoreUsersRequest(user_ids=USERS), timeout=5).scores
    now = datetime.now(timezone.utc).isoformat()
    ok = served.stub.IngestEvents(iter([pb.IngestEventsRequest(events=[pb.Event(
        event_id="property-final", event_time=now, user_id=user, item_id=ITEMS[0], event_type="view")])]), timeout=10)
    assert (ok.accepted, ok.rejected) == (1, 0)
    assert "Traceback" not in served.server.log.read_text()  # no handler failed on the way
