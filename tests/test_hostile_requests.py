"""Hostile input, field by field, against a real server on a real port (its own copy of the demo shop's stores).

Each bad request of every RPC gets the right status and a message that names the field; none gets INTERNAL.
IngestEvents rejects bad events one by one (status OK, a rejection with the event's stream index and field)
and keeps the valid events of the same message.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message

from propensity.event_log import EventLog
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from tests.conftest import Pipeline, private_env, running_server, users

pytestmark = pytest.mark.slow

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
LONG = "x" * 129  # one past the 128-character id limit
MANY = [f"i{k:05d}" for k in range(1001)]  # one past max_request_ids


@dataclass(frozen=True)
class Served:
    stub: pb_grpc.RecommendationServiceStub
    target: str
    work: Path
    user: str  # a known shopper


@pytest.fixture(scope="module")
def served(pipeline: Pipeline) -> Iterator[Served]:
    # Its own stores: the valid events sent alongside bad ones must not reach the shared pipeline's event log.
    env, work = private_env(pipeline, "hostile", copy_repo=True)
    with running_server(env, pipeline.root / "hostile.log") as server, grpc.insecure_channel(server.target) as channel:
        yield Served(pb_grpc.RecommendationServiceStub(channel), server.target, work, users(pipeline, 1)[0])


@dataclass(frozen=True)
class Bad:
    """One bad unary request: the RPC, the request (user "{user}" is replaced by a known shopper), the status and field."""

    rpc: str
    request: Message
    code: grpc.StatusCode
    field: str


def _recommend(**fields: object) -> pb.RecommendRequest:
    return pb.RecommendRequest(**{"user_id": "{user}", **fields})


def _score_items(**fields: object) -> pb.ScoreItemsRequest:
    return pb.ScoreItemsRequest(**{"user_id": "{user}", "item_ids": ["i00001"], **fields})


def _score_users(*user_ids: str, **fields: object) -> pb.ScoreUsersRequest:
    return pb.ScoreUsersRequest(user_ids=list(user_ids), **fields)


BAD_UNARY = {
    # Recommend
    "recommend: empty user_id": Bad("Recommend", pb.RecommendRequest(user_id=""), INVALID, "user_id"),
    "recommend: blank user_id": Bad("Recommend", pb.RecommendRequest(user_id="   "), INVALID, "user_id"),
    "recommend: over-long user_id": Bad("Recommend", pb.RecommendRequest(user_id=LONG), INVALID, "user_id"),
    "recommend: NUL in user_id": Bad("Recommend", pb.RecommendRequest(user_id="u\x00001"), INVALID, "user_id"),
    "recommend: newline in user_id": Bad("Recommend", pb.RecommendRequest(user_id="u1\nX-Admin: 1"), INVALID, "user_id"),
    "recommend: ANSI escape in user_id": Bad("Recommend", pb.RecommendRequest(user_id="\x1b[31mu1"), INVALID, "user_id"),
    "recommend: negative num_items": Bad("Recommend", _recommend(num_items=-1), INVALID, "num_items"),
    "recommend: most negative num_items": Bad("Recommend", _recommend(num_items=-(2**31)), INVALID, "num_items"),
    "recommend: num_items over the cap": Bad("Recommend", _recommend(num_items=101), INVALID, "num_items"),
    "recommend: huge num_items": Bad("Recommend", _recommend(num_items=2**31 - 1), INVALID, "num_items"),
    "recommend: too many exclude_item_ids": Bad("Recommend", _recommend(exclude_item_ids=MANY), INVALID, "exclude_item_ids"),
    "recommend: empty exclude id": Bad("Recommend", _recommend(exclude_item_ids=["i00001", ""]), INVALID, "exclude_item_ids[1]"),
    "recommend: over-long exclude id": Bad("Recommend", _recommend(exclude_item_ids=[LONG]), INVALID, "exclude_item_ids[0]"),
    "recommend: control char in exclude id": Bad("Recommend", _recommend(exclude_item_ids=["a", "b", "c\td"]), INVALID, "exclude_item_ids[2]"),
    "recommend: too many candidate_item_ids": Bad("Recommend", _recommend(candidate_item_ids=MANY), INVALID, "candidate_item_ids"),
    "recommend: empty candidate id": Bad("Recommend", _recommend(candidate_item_ids=[""]), INVALID, "candidate_item_ids[0]"),
    "recommend: blank candidate id": Bad("Recommend", _recommend(candidate_item_ids=["i00001", " \t "]), INVALID, "candidate_item_ids[1]"),
    "recommend: over-long candidate id": Bad("Recommend", _recommend(candidate_item_ids=["i00001", "i00002", LONG]), INVALID, "candidate_item_ids[2]"),
    "recommend: DEL in candidate id": Bad("Recommend", _recommend(candidate_item_ids=["i\x7f1"]), INVALID, "candidate_item_ids[0]"),
    "recommend: C1 control in candidate id": Bad("Recommend", _recommend(candidate_item_ids=["ok", "i\x851"]), INVALID, "candidate_item_ids[1]"),
    "recommend: unknown model_version": Bad("Recommend", _recommend(model_version="v-does-not-exist"), NOT_FOUND, "model_version"),
    "recommend: path in model_version": Bad("Recommend", _recommend(model_version="../../../etc/passwd"), NOT_FOUND, "model_version"),
    "recommend: over-long model_version": Bad("Recommend", _recommend(model_version=LONG), INVALID, "model_version"),
    "recommend: control char in model_version": Bad("Recommend", _recommend(model_version="v1\r\n"), INVALID, "model_version"),
    # ScoreUsers
    "score_users: no user_ids": Bad("ScoreUsers", _score_users(), INVALID, "user_ids"),
    "score_users: too many user_ids": Bad("ScoreUsers", _score_users(*(f"u{k}" for k in range(10_001))), INVALID, "user_ids"),
    "score_users: empty id": Bad("ScoreUsers", _score_users("a", "b", "c", ""), INVALID, "user_ids[3]"),
    "score_users: blank id": Bad("ScoreUsers", _score_users("a", "  "), INVALID, "user_ids[1]"),
    "score_users: over-long id": Bad("ScoreUsers", _score_users("a", LONG), INVALID, "user_ids[1]"),
    "score_users: NUL in id": Bad("ScoreUsers", _score_users("a", "b", "\x00"), INVALID, "user_ids[2]"),
    "score_users: unknown model_version": Bad("ScoreUsers", _score_users("a", model_version="v9"), NOT_FOUND, "model_version"),
    "score_users: control char in model_version": Bad("ScoreUsers", _score_users("a", model_version="\x08"), INVALID, "model_version"),
    # ScoreItems
    "score_items: empty user_id": Bad("ScoreItems", _score_items(user_id=""), INVALID, "user_id"),
    "score_items: over-long user_id": Bad("ScoreItems", _score_items(user_id=LONG), INVALID, "user_id"),
    "score_items: control char in user_id": Bad("ScoreItems", _score_items(user_id="u\x0b1"), INVALID, "user_id"),
    "score_items: no item_ids": Bad("ScoreItems", pb.ScoreItemsRequest(user_id="u1"), INVALID, "item_ids"),
    "score_items: too many item_ids": Bad("ScoreItems", _score_items(item_ids=MANY), INVALID, "item_ids"),
    "score_items: empty item id": Bad("ScoreItems", _score_items(item_ids=["i00001", ""]), INVALID, "item_ids[1]"),
    "score_items: over-long item id": Bad("ScoreItems", _score_items(item_ids=[LONG]), INVALID, "item_ids[0]"),
    "score_items: control char in item id": Bad("ScoreItems", _score_items(item_ids=["a", "b", "i\x1f"]), INVALID, "item_ids[2]"),
    "score_items: unknown model_version": Bad("ScoreItems", _score_items(model_version="2099-01-01T00-00-00"), NOT_FOUND, "model_version"),
    "score_items: over-long model_version": Bad("ScoreItems", _score_items(model_version=LONG), INVALID, "model_version"),
}


def _with_user(request: Message, user: str) -> Message:
    request = type(request).FromString(request.SerializeToString())
    if getattr(request, "user_id", None) == "{user}":
        request.user_id = user
    return request


@pytest.mark.parametrize("case", BAD_UNARY.values(), ids=BAD_UNARY.keys())
def test_a_bad_request_gets_its_status_and_a_message_naming_the_field(served: Served, case: Bad) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        getattr(served.stub, case.rpc)(_with_user(case.request, served.user), timeout=10)
    error = raised.value
    assert error.code() == case.code, error.details()
    assert error.details().startswith(f"{case.field}: "), error.details()
    assert len(error.details()) < 400  # a hostile value is never echoed back in full


def test_the_same_requests_with_the_field_fixed_succeed(served: Served) -> None:
    """The table's requests are one field away from valid: the status comes from that field, not something else."""
    stub, user = served.stub, served.user
    assert stub.Recommend(pb.RecommendRequest(user_id=user, num_items=100), timeout=10).items
    assert stub.Recommend(pb.RecommendRequest(user_id=user, exclude_item_ids=MANY[:1000], candidate_item_ids=["i00001"]), timeout=10)
    assert len(stub.ScoreUsers(_score_users(*(f"u{k}" for k in range(10_000))), timeout=30).scores) == 10_000
    assert len(stub.ScoreItems(pb.ScoreItemsRequest(user_id=user, item_ids=MANY[:1000]), timeout=10).scores) == 1000
    current = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).current_version
    assert stub.ScoreUsers(_score_users("a", model_version=current), timeout=10).model_version == current
    assert stub.Recommend(pb.RecommendRequest(user_id="x" * 128, model_version=current), timeout=10).fallback_used  # 128 is allowed


def test_repeated_ids_follow_the_documented_rules(served: Served) -> None:
    """Duplicates are not errors: a repeated candidate is ranked once, a repeated user or item is scored at each position."""
    stub, user = served.stub, served.user
    ranked = stub.Recommend(pb.RecommendRequest(user_id=user, candidate_item_ids=["i00001", "i00002", "i00001"], num_items=10), timeout=10)
    assert sorted(i.item_id for i in ranked.items) == ["i00001", "i00002"]
    excluded = stub.Recommend(pb.RecommendRequest(user_id=user, candidate_item_ids=["i00001", "i00002"], exclude_item_ids=["i00001"] * 3), timeout=10)
    assert [i.item_id for i in excluded.items] == ["i00002"]
    scores = stub.ScoreUsers(_score_users(user, "nobody", user), timeout=10).scores
    assert [s.user_id for s in scores] == [user, "nobody", user] and scores[0].purchase_propensity == scores[2].purchase_propensity
    items = stub.ScoreItems(pb.ScoreItemsRequest(user_id=user, item_ids=["i00003", "i00001", "i00003"]), timeout=10).scores
    assert [s.item_id for s in items] == ["i00003", "i00001", "i00003"] and items[0].score == items[2].score


def test_get_model_info_ignores_unknown_fields(served: Served) -> None:
    """GetModelInfoRequest has no fields: a newer client's extra fields (unknown to this server) are skipped, as proto3 says."""
    with grpc.insecure_channel(served.target) as channel:
        raw = channel.unary_unary("/propensity.v1.RecommendationService/GetModelInfo")
        answer = pb.GetModelInfoResponse.FromString(raw(b"\x08\x96\x01\x12\x03abc", timeout=10))  # field 1 varint, field 2 string
    assert answer.current_version


@pytest.mark.parametrize(
    ("rpc", "payload", "message", "problem"),
    [
        ("Recommend", b"\xff\xff\xff\xff", "propensity.v1.RecommendRequest", "Wire format was corrupt"),
        ("Recommend", b"\x0a\x03\xff\xfe\xfd", "propensity.v1.RecommendRequest", "String field had bad UTF-8"),
        ("ScoreUsers", b"\x0a\x03\xff\xfe\xfd", "propensity.v1.ScoreUsersRequest", "String field had bad UTF-8"),
    ],
    ids=["not protobuf", "invalid UTF-8 in user_id", "invalid UTF-8 in user_ids"],
)
def test_bytes_that_are_not_a_request_are_invalid_argument_naming_the_message_type(
    served: Served, rpc: str, payload: bytes, message: str, problem: str
) -> None:
    """Parsed leniently (server/registration.py): INVALID_ARGUMENT naming the type and the parser's reason, not grpc's UNKNOWN."""
    with grpc.insecure_channel(served.target) as channel:
        raw = channel.unary_unary(f"/propensity.v1.RecommendationService/{rpc}")
        with pytest.raises(grpc.RpcError) as raised:
            raw(payload, timeout=10)
    assert raised.value.code() == INVALID
    assert raised.value.details() == f"request body is not a valid {message}: {problem}"
    assert served.stub.Recommend(pb.RecommendRequest(user_id=served.user), timeout=10).items  # still serving


def test_a_stream_message_that_is_not_a_message_ends_the_stream_with_invalid_argument_after_keeping_the_ones_before(served: Served) -> None:
    event = pb.Event(event_id="undecodable-neighbour", event_time=datetime.now(timezone.utc).isoformat(), user_id="hostile-shopper",
                     item_id="i00001", event_type="view")
    with grpc.insecure_channel(served.target) as channel:
        raw = channel.stream_unary("/propensity.v1.RecommendationService/IngestEvents")
        with pytest.raises(grpc.RpcError) as raised:
            raw(iter([pb.IngestEventsRequest(events=[event]).SerializeToString(), b"\xff\xff\xff\xff"]), timeout=30)
    assert raised.value.code() == INVALID
    details = raised.value.details()
    assert details.startswith("IngestEvents message 2: request body is not a valid propensity.v1.IngestEventsRequest: Wire format was corrupt."), details
    assert "closed after 1 events, all handled: accepted 1" in details
    assert dict(raised.value.trailing_metadata())["ingest-accepted"] == "1"
    # Kept: sending it again is a duplicate.
    again = served.stub.IngestEvents(iter([pb.IngestEventsRequest(events=[event])]), timeout=30)
    assert (again.accepted, again.duplicates) == (0, 1)


# --- IngestEvents: bad events are rejected one by one, the valid ones around them are kept ---------------------------------


def _event(**fields: object) -> pb.Event:
    base = {"event_time": datetime.now(timezone.utc).isoformat(), "user_id": "hostile-shopper", "item_id": "i00001", "event_type": "view"}
    return pb.Event(**{**base, **fields})


FAR_FUTURE = (datetime.now(timezone.utc) + timedelta(days=3)).isoformat()

BAD_EVENTS = {
    "empty event_id": ({"event_id": ""}, "event_id"),
    "over-long event_id": ({"event_id": LONG}, "event_id"),
    "control char in event_id": ({"event_id": "e\x001"}, "event_id"),
    "empty user_id": ({"user_id": ""}, "user_id"),
    "blank user_id": ({"user_id": "  "}, "user_id"),
    "over-long user_id": ({"user_id": LONG}, "user_id"),
    "newline in user_id": ({"user_id": "u\n1"}, "user_id"),
    "empty item_id": ({"item_id": ""}, "item_id"),
    "over-long item_id": ({"item_id": LONG}, "item_id"),
    "control char in item_id": ({"item_id": "\x1bi"}, "item_id"),
    "over-long session_id": ({"session_id": LONG}, "session_id"),
    "control char in session_id": ({"session_id": "s\x07"}, "session_id"),
    "unknown event_type": ({"event_type": "click"}, "event_type"),
    "empty event_type": ({"event_type": ""}, "event_type"),
    "upper-case event_type": ({"event_type": "VIEW"}, "event_type"),
    "megabyte event_type": ({"event_type": "x" * 1_000_000}, "event_type"),
    "missing event_time": ({"event_time": ""}, "event_time"),
    "unparsable event_time": ({"event_time": "yesterday-ish"}, "event_time"),
    "impossible date": ({"event_time": "2024-13-45T00:00:00Z"}, "event_time"),
    "event_time before 1970": ({"event_time": "1969-12-31T23:59:59Z"}, "event_time"),
    "negative epoch ms": ({"event_time": "-1000"}, "event_time"),
    "event_time days ahead": ({"event_time": FAR_FUTURE}, "event_time"),
    "event_time year 9999": ({"event_time": "9999-12-31T23:59:59Z"}, "event_time"),
    "epoch ms beyond 64 bits": ({"event_time": "9" * 30}, "event_time"),
    "negative price": ({"event_type": "purchase", "price": -0.01}, "price"),
    "NaN price": ({"price": math.nan}, "price"),
    "infinite price": ({"price": math.inf}, "price"),
    "minus infinite price": ({"price": -math.inf}, "price"),
    "zero quantity": ({"quantity": 0.0}, "quantity"),
    "negative quantity": ({"event_type": "purchase", "quantity": -2.0}, "quantity"),
    "NaN quantity": ({"quantity": math.nan}, "quantity"),
    "infinite quantity": ({"quantity": math.inf}, "quantity"),
}


@pytest.mark.parametrize(("fields", "field"), BAD_EVENTS.values(), ids=BAD_EVENTS.keys())
def test_a_bad_event_is_rejected_by_field_and_its_neighbours_are_kept(served: Served, fields: dict, field: str, request: pytest.FixtureRequest) -> None:
    name = request.node.callspec.id
    bad = _event(**{"event_id": f"bad {name}", **fields})
    before, after = _event(event_id=f"before {name}"), _event(event_id=f"after {name}")
    response = served.stub.IngestEvents(iter([pb.IngestEventsRequest(events=[before, bad, after])]), timeout=30)
    assert (response.accepted, response.duplicates, response.rejected) == (2, 0, 1)
    [rejection] = response.rejections
    assert (rejection.index, rejection.field) == (1, field), rejection
    assert rejection.reason and len(rejection.reason) < 400
    assert rejection.event_id == bad.event_id


def test_a_stream_mixing_every_bad_event_with_valid_ones_keeps_exactly_the_valid_ones(served: Served) -> None:
    valid = [_event(event_id=f"mixed-ok-{k}", item_id=f"i{k:05d}", event_type="purchase", price=2.5, quantity=1.0) for k in range(len(BAD_EVENTS) + 1)]
    bad = [_event(**{"event_id": f"mixed-bad-{k}", **fields}) for k, (fields, _) in enumerate(BAD_EVENTS.values())]
    interleaved = [e for pair in zip(valid, bad) for e in pair] + [valid[-1], valid[0]]  # ends with a duplicate
    messages = [pb.IngestEventsRequest(events=interleaved[i : i + 7]) for i in range(0, len(interleaved), 7)]
    response = served.stub.IngestEvents(iter(messages), timeout=60)
    assert (response.accepted, response.duplicates, response.rejected) == (len(valid), 1, len(bad))
    # Stream-wide positions: bad event k sits at 2k + 1.
    assert [(r.index, r.field) for r in response.rejections] == [(2 * k + 1, field) for k, (_, field) in enumerate(BAD_EVENTS.values())]
    logged = EventLog(served.work / "stream").to_frame()
    mixed = logged[logged["event_id"].str.startswith("mixed-")]
    assert sorted(mixed["event_id"]) == sorted(e.event_id for e in valid)  # each valid one exactly once, no bad one
    assert served.stub.Recommend(pb.RecommendRequest(user_id="hostile-shopper"), timeout=10).items  # still serving


def test_an_empty_stream_and_empty_messages_are_answered_with_zero_counts(served: Served) -> None:
    for stream in ([], [pb.IngestEventsRequest()], [pb.IngestEventsRequest()] * 50):
        response = served.stub.IngestEvents(iter(stream), timeout=10)
        assert (response.accepted, response.duplicates, response.rejected, list(response.rejections)) == (0, 0, 0, [])
