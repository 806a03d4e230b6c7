"""The firehose against a real server (one process, a private copy of the pipeline's stores):

- freshness: while 1,000-event IngestEvents messages flow as fast as the server takes them, an add-to-cart for
  (user, item) raises that item's score for that user in the next Recommend, within 1 s of sending it;
- `propensity replay FILE --rate N` paces the events at N per second over several streams, with progress lines.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pandas as pd
import pytest

from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from tests.conftest import BIN, Pipeline, RunningServer, private_env, running_server, users

pytestmark = pytest.mark.slow

FIREHOSE_STREAMS = 2
MESSAGE_EVENTS = 1000
MESSAGES_PER_STREAM = 3


def _firehose_messages(pipeline: Pipeline, exclude: set[str], count: int) -> list[bytes]:
    """count pre-serialised 1,000-event messages of the pipeline's own events (other users than `exclude`), fresh ids."""
    events = pd.read_parquet(pipeline.work_dir / "prepared" / "events.parquet", columns=["user_id", "item_id", "event_type"])
    events = events[~events["user_id"].isin(list(exclude))].sample(count * MESSAGE_EVENTS, replace=True, random_state=7)
    now = str(int(time.time() * 1000))
    rows = list(events.itertuples(index=False))
    return [
        pb.IngestEventsRequest(events=[
            pb.Event(event_id=f"firehose-{m}-{k}", event_time=now, user_id=str(r.user_id), item_id=str(r.item_id), event_type=str(r.event_type))
            for k, r in enumerate(rows[m * MESSAGE_EVENTS : (m + 1) * MESSAGE_EVENTS])
        ]).SerializeToString()
        for m in range(count)
    ]


@pytest.fixture(scope="module")
def firehose_server(pipeline: Pipeline) -> Iterator[tuple[RunningServer, dict[str, str], Path]]:
    env, work = private_env(pipeline, "firehose", copy_repo=True, workers=1)
    with running_server(env, pipeline.root / "firehose.log") as server:
        yield server, env, work


def test_an_add_to_cart_raises_the_item_in_the_next_recommend_within_a_second_at_full_ingestion_load(pipeline: Pipeline, firehose_server) -> None:
    server, _, work = firehose_server
    probes = users(pipeline, 40)[32:35]
    messages = _firehose_messages(pipeline, set(probes), 60)
    items = pd.read_parquet(work / "prepared" / "items.parquet", columns=["item_id", "available"])
    catalog = items.loc[items["available"].astype(bool), "item_id"].astype(str).tolist()[:300]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommendationServiceStub(channel)
        send = channel.stream_unary("/propensity.v1.RecommendationService/IngestEvents", request_serializer=None,
                                    response_deserializer=pb.IngestEventsResponse.FromString)
        stop = threading.Event()
        accepted = [0] * FIREHOSE_STREAMS
        failures: list[BaseException] = []

        def firehose(worker: int) -> None:  # back to back, never waiting: the server takes them as fast as it can
            mine = messages[worker::FIREHOSE_STREAMS]
            k = 0
            try:
                while not stop.is_set() and k < len(mine):
                    accepted[worker] += send(iter(mine[k : k + MESSAGES_PER_STREAM]), timeout=60).accepted
                    k += MESSAGES_PER_STREAM
            except BaseException as error:  # noqa: BLE001 - reported by the test thread
                failures.append(error)

        def score(user: str, item: str) -> float:
            reply = stub.Recommend(pb.RecommendRequest(user_id=user, num_items=1, candidate_item_ids=[item]), timeout=10)
            return next(i.score for i in reply.items if i.item_id == item)

        chosen = {}
        for user in probes:  # chosen before the load: the item this user scores lowest
            scored = stub.ScoreItems(pb.ScoreItemsRequest(user_id=user, item_ids=catalog), timeout=10)
            chosen[user] = min((s for s in scored.scores if s.known_item), key=lambda s: s.score).item_id
        threads = [threading.Thread(target=firehose, args=(w,), daemon=True) for w in range(FIREHOSE_STREAMS)]
        for thread in threads:
            thread.start()
        assert _wait(lambda: sum(accepted) >= MESSAGE_EVENTS or failures, 60), "the firehose never got going"
        results = []
        for n, user in enumerate(probes):
            item = chosen[user]
            during = sum(accepted)
            before = score(user, item)
            now = str(int(time.time() * 1000))
            sent = time.monotonic()
            reply = stub.IngestEvents(iter([pb.IngestEventsRequest(events=[
                pb.Event(event_id=f"probe-{n}-{kind}", event_time=now, user_id=user, item_id=item, event_type=kind)
                for kind in ("view", "add_to_cart")])]), timeout=30)
            after = score(user, item)
            results.append((user, item, reply.accepted, before, after, time.monotonic() - sent, all(t.is_alive() for t in threads), during))
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not failures, failures
    for user, item, ok, before, after, seconds, loaded, during in results:
        assert loaded and during > 0, "the probe ran without the firehose"
        assert ok == 2
        assert after > before, f"{user}/{item}: score {before} -> {after} in the next Recommend"
        assert seconds < 1.0, f"{user}/{item}: {seconds:.2f} s from sending the add-to-cart to the answer that shows it"
    assert sum(accepted) >= 2 * MESSAGE_EVENTS


def _wait(condition, timeout: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_replay_paces_the_events_over_several_streams_and_reports_progress(pipeline: Pipeline, firehose_server) -> None:
    server, env, work = firehose_server
    rate, count = 1500, 4500
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "propensity"), "replay", str(work / "prepared" / "events.parquet"), "--rate", str(rate), "--limit", str(count),
         "--batch", "100", "--streams", "3", "--messages-per-stream", "5", "--target", server.target],
        env=env, capture_output=True, text=True, timeout=300,
    )
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.replace(",", "")
    accepted, duplicates, rejected = (int(out.split(f"{word} ")[-1].split()[0]) for word in ("accepted", "duplicates", "rejected"))
    assert (accepted + duplicates, rejected) == (count, 0), out
    assert seconds >= count / rate, f"{count} events at {rate}/s took {seconds:.1f} s: not paced"
    assert any(" sent, " in line and "acknowledged" in line for line in result.stdout.splitlines()), out  # progress lines
