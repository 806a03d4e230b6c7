"""The event firehose section of `make bench`: IngestEvents into ONE server process (workers=1) on a private copy of
the bench shop, with the load generator of bench/ingest.py (processes sending pre-serialised messages; their own
CPU is reported, so it can be seen not to be the limit):

- events/s acknowledged for 10-, 100- and 1,000-event messages, and the server's CPU ms per 1,000 events;
- Recommend at a fixed, modest open-loop rate (h2load --rps, bench/open_loop.py), first alone, then while
  ingestion is offered half the 1,000-event maximum: its p50/p99 with and without the firehose;
- freshness at full ingestion load: for a (user, item), a view and an add-to-cart are sent while 1,000-event
  messages flow as fast as the server takes them; the time to the acknowledgement, and whether the next Recommend
  for that user (candidates: that item) scores the item higher than just before, and how long until it did.

Recommend's users are never in the firehose's events, so only the probes change their features and h2load's
answers keep their verified size.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.ingest import CLI, run_size
from bench.state import PROJECT_ROOT, BenchState

SIZES = (10, 100, 1000)
STREAMS_PER_CLIENT = 4  # x bench.ingest.CLIENTS processes, bench.ingest.STREAMS streams of each at a time
PHASE_SECONDS = 12.0  # Recommend alone, Recommend under half the firehose, and the freshness probes under all of it
RECOMMEND_RATE = 100.0  # req/s: modest, so Recommend's own load does not decide its tail
RECOMMEND_SLOTS = 4  # h2load processes side by side (25 req/s each)
PROBES = 6
FRESH_WITHIN_SECONDS = 1.0
# Messages per stream for the timed phases: enough for ~PHASE_SECONDS at up to 20,000 events/s.
TIMED_MESSAGES_PER_STREAM = 40
# Messages per stream for the maximum-rate phases. 1,000-event messages used bench.ingest's 5: a 5-second phase of
# two rounds of streams, each starting cold and draining to one stream (the feature update then takes one message
# per transaction instead of two merged). make bench of 2026-12-01 measured 7,740 events/s (feature update 115.2 CPU
# ms per 1,000 events) there and 9,177 (97.1) in the same run's 17-second freshness phase of the same messages.
THROUGHPUT_MESSAGES_PER_STREAM = {10: 200, 100: 50, 1000: 20}


def say(message: str) -> None:
    print(f"[firehose] {message}", flush=True)


# (target, rate req/s, seconds) -> bench/open_loop.py's figures for Recommend of the excluded users
OpenLoop = Callable[[str, float, float], dict]


def measure(state: BenchState, recommend_users: list[str], probe_users: list[str], prepare_open_loop: Callable[[str], OpenLoop],
            progress: Callable[[str], None] = say) -> dict:
    """The section's figures; prepare_open_loop(target) readies h2load's Recommend payloads (recommend_users) against
    this server. Neither they nor probe_users are in the firehose's events."""
    from bench.processes import ServerProcess, free_port

    excluded = frozenset(recommend_users) | frozenset(probe_users)
    events_file = state.data_dir / "events.parquet"
    private = Path(tempfile.mkdtemp(prefix="bench-firehose-"))
    try:
        for part in ("feature_repo", "work", "data"):
            shutil.copytree(state.root / part, private / part, ignore=shutil.ignore_patterns("stream", "run"))
        env = {**state.env(), "PROPENSITY_WORK_DIR": str(private / "work"), "PROPENSITY_DATA_DIR": str(private / "data"),
               "PROPENSITY_FEATURE_REPO": str(private / "feature_repo"), "PROPENSITY_SERVER__WORKERS": "1",
               "PROPENSITY_SERVER__HOST": "127.0.0.1", "PROPENSITY_SERVER__LOG_FORMAT": "json"}
        port = free_port()
        with ServerProcess("propensity serve (firehose)", [CLI, "serve", "--port", str(port)], env, port, private / "server.log", PROJECT_ROOT) as server:
            progress(f"propensity serve (workers=1) SERVING after {server.wait_serving():.1f}s on a private copy of the shop")
            target, pid = server.target, server.pid
            run_size(target, pid, events_file, 10, 1, exclude_users=excluded)  # warm-up: connections, caches
            sizes = []
            for size in SIZES:
                result = run_size(target, pid, events_file, size, STREAMS_PER_CLIENT, per_stream=THROUGHPUT_MESSAGES_PER_STREAM[size],
                                  exclude_users=excluded)
                progress(f"{size:>5} events/message: {result['events_per_second']:>8,.0f} events/s, {result['server_cpu_ms_per_1000_events']} "
                         f"server CPU ms per 1,000 events ({result['server_cores_busy']} cores), generator {result['generator_cores_busy']} cores, "
                         f"accepted {result['accepted']:,}/{result['events_sent']:,}, failed streams {result['failed_streams']}; CPU ms per 1,000 "
                         f"events by process {result['server_cpu_ms_per_1000_events_by_process']}")
                sizes.append(result)
            maximum = next(r["events_per_second"] for r in sizes if r["events_per_message"] == 1000)
            open_loop = prepare_open_loop(target)
            alone = open_loop(target, RECOMMEND_RATE, PHASE_SECONDS)
            progress(f"Recommend at {RECOMMEND_RATE:g} req/s alone: p50 {alone['p50']:.2f} ms, p99 {alone['p99']:.2f} ms, failures {alone['failures']}")
            during: dict = {}
            half = run_size(target, pid, events_file, 1000, STREAMS_PER_CLIENT, per_stream=TIMED_MESSAGES_PER_STREAM, rate=maximum / 2,
                            seconds=PHASE_SECONDS + 2.0, exclude_users=excluded,
                            started=lambda: during.update(open_loop(target, RECOMMEND_RATE, PHASE_SECONDS)))
            progress(f"Recommend at {RECOMMEND_RATE:g} req/s with ingestion offered {maximum / 2:,.0f} events/s (took {half['events_per_second']:,.0f}): "
                     f"p50 {during['p50']:.2f} ms, p99 {during['p99']:.2f} ms, failures {during['failures']}")
            probes: list[dict] = []
            full = run_size(target, pid, events_file, 1000, STREAMS_PER_CLIENT, per_stream=TIMED_MESSAGES_PER_STREAM,
                            seconds=PHASE_SECONDS, exclude_users=excluded,
                            started=lambda: probes.extend(freshness_probes(target, probe_users, private / "work")))
            fresh = [p for p in probes if p.get("visible_ms") is not None and p["visible_ms"] <= FRESH_WITHIN_SECONDS * 1000]
            progress(f"freshness at full load ({full['events_per_second']:,.0f} events/s): {len(fresh)}/{len(probes)} add-to-carts raised the "
                     f"item's score within {FRESH_WITHIN_SECONDS:g} s; in the next answer: {sum(p['raised_in_next_answer'] for p in probes)}/{len(probes)}")
        return {
            "server": "propensity serve, workers=1, SQLite online store and event log, private copy of the bench shop",
            "generator": "bench/ingest.py: processes sending pre-serialised IngestEvents messages; h2load --rps for Recommend",
            "sizes": sizes,
            "max_events_per_second_1000": maximum,
            "recommend_rate_rps": RECOMMEND_RATE,
            "recommend_alone": _slim(alone),
            "recommend_under_half_ingestion": {**_slim(during), "ingestion": half},
            "freshness": {"ingestion": full, "probes": probes, "within_seconds": FRESH_WITHIN_SECONDS,
                          "fresh_within": len(fresh), "probes_sent": len(probes),
                          "raised_in_next_answer": sum(p["raised_in_next_answer"] for p in probes),
                          "visible_ms_max": max((p["visible_ms"] for p in probes if p.get("visible_ms") is not None), default=None)},
        }
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _slim(open_loop: dict) -> dict:
    keys = ("target_rate_rps", "achieved_rps", "answered", "failures", "p50", "p95", "p99", "max", "lateness_p99_ms", "generator_limited", "rate_kept")
    return {k: open_loop.get(k) for k in keys}


def freshness_probes(target: str, users: list[str], work: Path, pause_seconds: float = 1.0) -> list[dict]:
    """For each user: the item they score lowest among available items, then a view and an add-to-cart for it;
    the acknowledgement time, the next Recommend's score for the item against the one just before, and the time
    from sending until a Recommend showed it higher (None if not within 3 s)."""
    import grpc
    import pandas as pd

    from propensity.v1 import recommendation_service_pb2 as pb
    from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc

    items = pd.read_parquet(work / "prepared" / "items.parquet", columns=["item_id", "available"])
    catalog = items.loc[items["available"].astype(bool), "item_id"].astype(str).tolist()[:300]
    out = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RecommendationServiceStub(channel)

        def score(user: str, item: str) -> float | None:
            reply = stub.Recommend(pb.RecommendRequest(user_id=user, num_items=1, candidate_item_ids=[item]), timeout=10)
            return next((i.score for i in reply.items if i.item_id == item), None)

        for k, user in enumerate(users):
            scored = stub.ScoreItems(pb.ScoreItemsRequest(user_id=user, item_ids=catalog), timeout=10)
            item = min((s for s in scored.scores if s.known_item), key=lambda s: s.score).item_id
            before = score(user, item)
            now = str(int(time.time() * 1000))
            events = [pb.Event(event_id=f"fresh-{user}-{k}-{kind}-{now}", event_time=now, user_id=user, item_id=item, event_type=kind)
                      for kind in ("view", "add_to_cart")]
            sent = time.perf_counter()
            reply = stub.IngestEvents(iter([pb.IngestEventsRequest(events=events)]), timeout=30)
            acked = time.perf_counter()
            after = score(user, item)
            answered = time.perf_counter()
            raised = before is not None and after is not None and after > before
            visible = answered if raised else None
            while visible is None and time.perf_counter() - sent < 3.0:
                again = score(user, item)
                if before is not None and again is not None and again > before:
                    visible = time.perf_counter()
            out.append({"user": user, "item": item, "accepted": reply.accepted, "score_before": before, "score_next_answer": after,
                        "ack_ms": round((acked - sent) * 1000, 1), "next_answer_ms": round((answered - sent) * 1000, 1),
                        "raised_in_next_answer": raised, "visible_ms": None if visible is None else round((visible - sent) * 1000, 1)})
            time.sleep(pause_seconds)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.firehose`: this section alone (as make bench runs it), its figures printed as JSON."""
    import argparse
    import json

    import pandas as pd

    from bench.run import Payloads, ensure_h2load, measure_firehose
    from bench.state import ensure_state

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--root", type=Path, default=PROJECT_ROOT / "var" / "bench")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    ensure_h2load()
    state = ensure_state(args.root, progress=say)
    work = state.root / "run-firehose"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # Users with a good history, as make bench samples them (bench.shop): the most active ones here, deterministic.
    counts = pd.read_parquet(state.work_dir / "prepared" / "events.parquet", columns=["user_id"])["user_id"].astype(str).value_counts()
    users = sorted(counts.index[:200])
    figures = measure_firehose(state, Payloads(work / "payloads", users), users, work)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
