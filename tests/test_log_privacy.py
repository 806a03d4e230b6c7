"""Logs without personal data: traffic and ingestion against a real server logging JSON at DEBUG; no INFO+ line holds a
raw user id, a bearer token or a feature value."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time

import grpc
import pytest

from propensity import pseudonyms
from propensity.model_registry import current_version
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from tests.conftest import SHOPPER, Pipeline, private_env, running_server, users

READ_TOKEN, INGEST_TOKEN, ADMIN_TOKEN = "logs-read-token-91ac", "logs-ingest-token-2f7e", "logs-admin-token-c4d8"
WRONG_TOKEN = "logs-wrong-token-0000"
NEW_SHOPPER = "log-privacy-new-shopper"
SHADOW = "v29990303T000000"
FORGOTTEN = "log-privacy-forgotten-shopper"
INFO_AND_ABOVE = {"INFO", "WARNING", "ERROR", "CRITICAL"}


def _callers() -> str:
    digest = lambda token: hashlib.sha256(token.encode()).hexdigest()  # noqa: E731
    return json.dumps([
        {"name": "reader", "roles": ["read"], "token_sha256": digest(READ_TOKEN)},
        {"name": "ingester", "roles": ["ingest"], "token_sha256": digest(INGEST_TOKEN)},
        {"name": "ops", "roles": ["admin"], "token_sha256": digest(ADMIN_TOKEN)},
    ])


def _bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def _traffic(stub: pb_grpc.RecommendationServiceStub, shoppers: list[str], item: str) -> list[float]:
    """Every kind of call, good and bad; returns the feature values the server used (from explain)."""
    values: list[float] = []
    for user in shoppers:
        answer = stub.Recommend(pb.RecommendRequest(user_id=user, num_items=5, explain=True), metadata=_bearer(READ_TOKEN), timeout=10)
        values += [c.value for i in answer.items for c in i.contributions]
        stub.ScoreItems(pb.ScoreItemsRequest(user_id=user, item_ids=[item, "no-such-item"]), metadata=_bearer(READ_TOKEN), timeout=10)
    stub.ScoreUsers(pb.ScoreUsersRequest(user_ids=[*shoppers, NEW_SHOPPER]), metadata=_bearer(READ_TOKEN), timeout=10)
    now = int(time.time() * 1000)
    events = [pb.Event(event_id=f"logs-{u}-{i}", event_time=str(now - 1000 + i), user_id=u, item_id=item, event_type=kind)
              for i, (u, kind) in enumerate([(NEW_SHOPPER, "view"), (shoppers[0], "add_to_cart"), (FORGOTTEN, "view")])]
    events.append(pb.Event(event_id="logs-bad", event_time=str(now), user_id=shoppers[1], item_id=item, event_type="click"))
    ingested = stub.IngestEvents(iter([pb.IngestEventsRequest(events=events)]), metadata=_bearer(INGEST_TOKEN), timeout=20)
    assert ingested.accepted == 3 and ingested.rejected == 1
    # Refusals: wrong token, wrong role, bad arguments that name the user.
    for call, request, token in [
        (stub.Recommend, pb.RecommendRequest(user_id=shoppers[0]), WRONG_TOKEN),
        (stub.IngestEvents, iter([pb.IngestEventsRequest(events=events[:1])]), READ_TOKEN),
        (stub.Recommend, pb.RecommendRequest(user_id=shoppers[0], num_items=10_000), READ_TOKEN),
        (stub.ScoreItems, pb.ScoreItemsRequest(user_id=shoppers[0]), READ_TOKEN),
    ]:
        with pytest.raises(grpc.RpcError):
            call(request, metadata=_bearer(token), timeout=10)
    forgot = stub.ForgetUsers(pb.ForgetUsersRequest(user_ids=[FORGOTTEN]), metadata=_bearer(ADMIN_TOKEN), timeout=120)
    assert forgot.users == 1
    return values


@pytest.mark.slow
def test_info_and_above_log_lines_carry_no_ids_tokens_or_feature_values(pipeline: Pipeline) -> None:
    env, work = private_env(pipeline, "log-privacy", copy_repo=True, log_format="json", log_level="DEBUG")
    # A shadow version (a copy of the current one): its INFO line is about one user, and must name them by pseudonym.
    versions = work / "models" / "versions"
    served = current_version(work / "models")
    shutil.copytree(versions / served, versions / SHADOW)
    metadata = json.loads((versions / SHADOW / "metadata.json").read_text())
    (versions / SHADOW / "metadata.json").write_text(json.dumps({**metadata, "version": SHADOW}))
    env.update({"PROPENSITY_SECURITY__AUTH": "on", "PROPENSITY_SECURITY__CALLERS": _callers(), "PROPENSITY_SERVER__SHADOW_VERSION": SHADOW})
    shoppers = [SHOPPER, *users(pipeline, 3)]
    log_file = pipeline.root / "log-privacy-server.log"
    with running_server(env, log_file) as server, grpc.insecure_channel(server.target) as channel:
        values = _traffic(pb_grpc.RecommendationServiceStub(channel), shoppers, pipeline.shopper_item)
    lines = [json.loads(line) for line in log_file.read_text().splitlines() if line.startswith("{")]
    kept = [line for line in lines if line.get("level") in INFO_AND_ABOVE]
    # The capture is real: DEBUG lines were written, and the INFO+ lines include the RPCs' own (refusals, erasure).
    assert any(line["level"] == "DEBUG" for line in lines)
    assert any(line.get("caller") == "reader" and "denied" in line["message"] for line in kept)
    assert any("ForgetUsers: forgot 1 user(s)" in line["message"] for line in kept)
    key = (work / "privacy" / "key").read_text().encode()
    shadowed = {line.get("user") for line in kept if line["message"] == "shadow scoring"}
    assert "u:" + pseudonyms.keyed_hash(key, SHOPPER)[: pseudonyms.LOG_HASH_CHARS] in shadowed

    text = "\n".join(json.dumps(line) for line in kept)
    for secret in [*shoppers, NEW_SHOPPER, FORGOTTEN, READ_TOKEN, INGEST_TOKEN, ADMIN_TOKEN, WRONG_TOKEN]:
        assert secret not in text, f"{secret!r} in an INFO+ log line"
    # Feature values: the explained inputs with enough digits to be unmistakable (small integers appear in any log).
    telling = {repr(v) for v in values if math.isfinite(v) and v != round(v, 3)}
    assert telling, "explain returned no distinctive feature values to look for"
    leaked = [value for value in telling if value in text]
    assert not leaked, f"feature values in INFO+ log lines: {leaked[:5]}"


def test_pseudonymise_is_a_keyed_hash_without_the_id() -> None:
    pseudonyms.set_log_key(b"key-one")
    first = pseudonyms.pseudonymise("u000123")
    assert first.startswith("u:") and "u000123" not in first and first == pseudonyms.pseudonymise("u000123")
    pseudonyms.set_log_key(b"key-two")
    assert pseudonyms.pseudonymise("u000123") != first  # the key, not the id alone, decides
