"""`python -m bench.ingest`: IngestEvents throughput into ONE real `propensity serve` process (workers=1).

The server runs on a private copy of the bench shop (var/bench, built by bench.state if missing), so its event
log and online store start as the shop's and the shop itself is not changed. The load generator pre-builds
every message's serialised bytes (events sampled from the shop's own events: its users and items, fresh
event_ids, current times), then CLIENTS processes each keep STREAMS client streams busy, sending the bytes as
they are (no protobuf work in the loop). Per message size (10, 100, 1,000 events per message):

- events/s acknowledged (every stream's IngestEventsResponse: accepted must equal events sent, 0 failures);
- the server's CPU ms per 1,000 events (/proc of its process group: bench.cpu) and cores busy;
- the load generator's own CPU seconds per wall second, so it can be seen not to be the bottleneck.

Results: docs/benchmarks/ingest.json and ingest.md. The machine has 2 cores shared with other work: compare
figures within one run and read CPU per 1,000 events alongside events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.state import PROJECT_ROOT, ensure_state

OUT = PROJECT_ROOT / "docs" / "benchmarks"
CLI = str(Path(sys.executable).with_name("propensity"))
METHOD = "/propensity.v1.RecommendationService/IngestEvents"
SIZES = (10, 100, 1000)
CLIENTS = 2  # load generator processes
STREAMS = 2  # concurrent streams per client process
MESSAGES_PER_STREAM = {10: 200, 100: 50, 1000: 5}


def say(message: str) -> None:
    print(f"[ingest] {message}", flush=True)


def build_messages(events_file: Path, size: int, count: int, tag: str, seed: int) -> list[bytes]:
    """count serialised IngestEventsRequest messages of `size` events each (unique event_ids, times just before now)."""
    import numpy as np
    import pandas as pd

    from propensity.v1 import recommendation_service_pb2 as pb

    raw = pd.read_parquet(events_file, columns=["user_id", "item_id", "event_type", "session_id", "price", "quantity"])
    rng = np.random.default_rng(seed)
    pick = raw.iloc[rng.integers(0, len(raw), size * count)]
    now_ms = int(time.time() * 1000)
    messages, k = [], 0
    rows = list(pick.itertuples(index=False))
    for m in range(count):
        events = []
        for row in rows[m * size : (m + 1) * size]:
            k += 1
            events.append(pb.Event(
                event_id=f"{tag}-{k}", event_time=str(now_ms - 1000 * (count * size - k) // max(1, count * size) - 1000),
                user_id=row.user_id, item_id=row.item_id, event_type=row.event_type, session_id=row.session_id or "",
                price=float(row.price) if row.price == row.price else None, quantity=float(row.quantity),
            ))
        messages.append(pb.IngestEventsRequest(events=events).SerializeToString())
    return messages


async def _drive(target: str, streams: list[list[bytes]], start_at: float, concurrency: int) -> dict:
    import grpc

    from propensity.v1 import recommendation_service_pb2 as pb

    channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    call = channel.stream_unary(METHOD, request_serializer=None, response_deserializer=pb.IngestEventsResponse.FromString)
    accepted = duplicates = rejected = pending = failures = 0
    queue = list(reversed(streams))

    async def worker() -> None:
        nonlocal accepted, duplicates, rejected, pending, failures
        while queue:
            messages = queue.pop()
            try:
                reply = await call(iter(messages), timeout=120.0)
            except grpc.aio.AioRpcError as error:
                failures += 1
                print(f"[ingest] stream failed: {error.code().name} {error.details()}", file=sys.stderr, flush=True)
                continue
            accepted += reply.accepted
            duplicates += reply.duplicates
            rejected += reply.rejected
            pending += reply.pushes_pending

    await channel.channel_ready()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    await channel.close()
    return {"accepted": accepted, "duplicates": duplicates, "rejected": rejected, "pushes_pending": pending,
            "failures": failures, "seconds": seconds}


def _client(target: str, events_file: str, size: int, n_streams: int, per_stream: int, tag: str, seed: int,
            ready: mp.Queue, go: mp.Queue, results: mp.Queue) -> None:
    messages = build_messages(Path(events_file), size, n_streams * per_stream, tag, seed)
    streams = [messages[i * per_stream : (i + 1) * per_stream] for i in range(n_streams)]
    sent = sum(len(m) for m in messages)
    ready.put(sent)
    start_at = go.get()
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = asyncio.run(_drive(target, streams, start_at, STREAMS))
    after = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_seconds"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["events_sent"] = size * per_stream * n_streams
    results.put(result)


def run_size(target: str, server_pgid: int, events_file: Path, size: int, streams_per_client: int) -> dict:
    from bench.cpu import GroupCpu

    per_stream = MESSAGES_PER_STREAM[size]
    ctx = mp.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    gos = [ctx.Queue() for _ in range(CLIENTS)]
    tag = uuid.uuid4().hex[:10]
    procs = [ctx.Process(target=_client, args=(target, str(events_file), size, streams_per_client, per_stream, f"{tag}{c}", c,
                                                ready, gos[c], results)) for c in range(CLIENTS)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    cpu = GroupCpu(server_pgid)
    start_at = time.time() + 0.5
    for go in gos:
        go.put(start_at)
    time.sleep(0.5)
    mark, t0 = cpu.mark(), time.perf_counter()
    parts = [results.get(timeout=900) for _ in procs]
    wall = time.perf_counter() - t0
    server = cpu.phase(mark, 1, wall)
    for p in procs:
        p.join(timeout=30)
    sent = sum(p["events_sent"] for p in parts)
    accepted = sum(p["accepted"] for p in parts)
    client_cpu = sum(p["cpu_seconds"] for p in parts)
    return {
        "events_per_message": size, "messages": sent // size, "events_sent": sent, "accepted": accepted,
        "duplicates": sum(p["duplicates"] for p in parts), "rejected": sum(p["rejected"] for p in parts),
        "pushes_pending": sum(p["pushes_pending"] for p in parts), "failed_streams": sum(p["failures"] for p in parts),
        "seconds": round(wall, 3), "events_per_second": round(accepted / wall, 1),
        "server_cpu_ms_per_1000_events": round(server["server_cpu_seconds"] * 1000 / max(accepted, 1) * 1000, 1),
        "server_cores_busy": server["server_cores_busy"],
        "generator_processes": CLIENTS, "generator_cores_busy": round(client_cpu / wall, 3),
    }


def main(argv: list[str] | None = None) -> int:
    from bench.processes import ServerProcess, free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=PROJECT_ROOT / "var" / "bench")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--streams-per-client", type=int, default=8, help="streams each client process sends (STREAMS at a time)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--label", default="", help="stored with the results (e.g. before/after)")
    parser.add_argument("--server-code", type=Path, help="serve from this source tree (e.g. `git archive` of an older commit)")
    args = parser.parse_args(argv)
    state = ensure_state(args.root, progress=say)
    private = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        for part in ("feature_repo", "work", "data"):
            shutil.copytree(state.root / part, private / part, ignore=shutil.ignore_patterns("stream"))
        env = {**state.env(), "PROPENSITY_WORK_DIR": str(private / "work"), "PROPENSITY_DATA_DIR": str(private / "data"),
               "PROPENSITY_FEATURE_REPO": str(private / "feature_repo"), "PROPENSITY_SERVER__WORKERS": "1",
               "PROPENSITY_SERVER__HOST": "127.0.0.1", "PROPENSITY_SERVER__LOG_FORMAT": "json"}
        if args.server_code:
            env["PYTHONPATH"] = str(args.server_code.resolve())
        port = free_port()
        log = private / "server.log"
        results = []
        with ServerProcess("propensity serve", [CLI, "serve", "--port", str(port)], env, port, log, PROJECT_ROOT) as server:
            say(f"propensity serve (workers=1) SERVING after {server.wait_serving():.1f}s; private shop copy {private}")
            run_size(server.target, server.pid, state.data_dir / "events.parquet", 10, 1)  # warm-up: connections, caches
            for size in args.sizes:
                result = run_size(server.target, server.pid, state.data_dir / "events.parquet", size, args.streams_per_client)
                say(f"{size:>5} events/message: {result['events_per_second']:>8,.0f} events/s, server "
                    f"{result['server_cpu_ms_per_1000_events']} CPU ms per 1,000 events ({result['server_cores_busy']} cores), "
                    f"generator {result['generator_cores_busy']} cores; accepted {result['accepted']}/{result['events_sent']}, "
                    f"failed streams {result['failed_streams']}, pending pushes {result['pushes_pending']}")
                results.append(result)
        report = {
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": "python -m bench.ingest",
            "label": args.label, "server_code": str(args.server_code or "working tree"), "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other work: noisy)",
            "server": "propensity serve, workers=1, SQLite online store and event log (WAL, synchronous=FULL)",
            "generator": f"{CLIENTS} processes x {STREAMS} concurrent streams, pre-serialised messages",
            "results": results, "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        }
        write_report(report, args.out)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return 0


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ingest.json"
    history = json.loads(path.read_text()) if path.exists() else {}
    runs = [r for r in history.get("runs", []) if r.get("label") != report["label"]] + [report]
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    (out / "ingest.md").write_text(markdown(runs))
    say(f"wrote {path} and ingest.md")


def markdown(runs: list[dict]) -> str:
    """The results table of every stored run (one per label), then the ratios of the last run to the first."""
    lines = ["# IngestEvents throughput, one server process", "",
             "Generated by `python -m bench.ingest` (bench/ingest.py; raw figures in ingest.json). One `propensity serve` "
             "(workers=1) on a private copy of the bench shop (var/bench: 5,000 users, 1,500 items), SQLite online store and "
             "event log; the load generator sends pre-serialised messages of events sampled from the shop's own log "
             "(about 700 distinct users per 1,000 events). The machine has 2 cores shared with other work: events/s "
             "vary with that load, so CPU ms per 1,000 events (the server's process group, from /proc) is the steadier figure.", "",
             "| run | server code | events/message | events/s | server CPU ms / 1,000 events | server cores busy | generator cores busy | accepted / sent | failed streams |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for r in run["results"]:
            lines.append(f"| {run['label'] or run['measured_at']} ({run['measured_at']}) | {run.get('server_code', '')} | {r['events_per_message']:,} | "
                         f"{r['events_per_second']:,.0f} | {r['server_cpu_ms_per_1000_events']} | {r['server_cores_busy']} | "
                         f"{r['generator_cores_busy']} | {r['accepted']:,} / {r['events_sent']:,} | {r['failed_streams']} |")
    lines += ["", "Machine load (1-minute load average on 2 cores, at the end of each run): "
              + "; ".join(f"{run['label'] or run['measured_at']}: {run.get('load_average_1m_at_end', 'not recorded')}" for run in runs) + "."]
    if len(runs) >= 2:
        first, last = ({r["events_per_message"]: r for r in run["results"]} for run in (runs[0], runs[-1]))
        lines += ["", f"Last run against the first ({runs[-1]['label']} / {runs[0]['label']}):", ""]
        for size in sorted(set(first) & set(last)):
            a, b = first[size], last[size]
            lines.append(f"- {size:,} events/message: events/s x{b['events_per_second'] / max(a['events_per_second'], 1e-9):.1f}, "
                         f"CPU per 1,000 events x{b['server_cpu_ms_per_1000_events'] / max(a['server_cpu_ms_per_1000_events'], 1e-9):.2f}")
    lines += ["", *WHAT_CHANGED.strip().splitlines()]
    return "\n".join(lines) + "\n"


WHAT_CHANGED = """
## Where the time went, and what changed (server/ingest.py, propensity/event_log.py, propensity/realtime.py)

Profiled in process (cProfile on `EventIngestor.ingest`, 1,000-event messages, ~700 users each). Before, about
1.3 s per message went to Feast: `get_online_features` (~0.43 s: registry look-ups, typeguard checks, one
`online_read` per view) and three `store.push` calls (~0.68 s: DataFrame -> Arrow -> protos, then one SQLite
statement per user and feature, one transaction per view). The guarantees are unchanged; the work per message is now:

- event log: one `BEGIN IMMEDIATE` transaction (WAL, `synchronous=FULL`, committed before the answer): one
  `SELECT ... WHERE event_id IN (...)` finds ids already logged (and repeats within the message), one `executemany`
  inserts the new events; the `pushed` mark is one `UPDATE ... IN (...)` per 500 ids instead of one per event, and
  is committed without its own fsync (`synchronous=NORMAL` for that transaction only: safe from a process crash, made
  durable by the next append; a power loss in between means a push repeated after the lease, the known limit of
  docs/reliability/stores.md);
- feature update: events grouped by user; one read of all the message's users over the three views with the
  plan-once SQLite reader of server/store_reads.py; `apply_events` per user; one write per user and view in ONE
  transaction on Feast's own table layout and keys (same upsert, value bytes, `value_text` and `event_ts` as
  Feast's `online_write_batch`): a view's rows are re-stamped with one `UPDATE ... WHERE entity_key = ?`, and only
  features whose value changed (or is null) are upserted. Its connection truncates the rollback journal instead of
  deleting it (same crash safety, `synchronous` unchanged). Other online stores (Redis) get the whole row through
  Feast's `OnlineStore.online_write_batch`, still one call per view per message and no DataFrame;
- validation: ids checked with `str.isprintable()` first (the regexes only for an id that fails it): same messages.

Tested by tests/test_ingest_batching.py (batched vs one event at a time through Feast's push: identical online
features read through Feast; every feature row of a written view carries the new stamp; duplicates within and
across messages) and the streaming, fault and hostile-input suites.

Not met: 10,000 events/s with 1,000-event messages. The server is CPU-bound there (~0.9 cores busy) at about 125 CPU
ms per 1,000 events, so one free core gives at most ~8,000 events/s. What is left per 1,000 events (~700 users, ~24,000
Feast feature rows): reading and decoding every feature row of the three views (~35 %), the write (re-stamp plus
changed rows, ~35 %), `apply_events` and value encoding. Next steps: decode only the features `apply_events` changes
and pass the others through as stored bytes; run the SQLite work off the event loop (sqlite3 releases the GIL).

Not done: ingestion still runs on the worker's event loop (a 1,000-event message holds it for its whole CPU time,
so `Recommend` waits behind it); small messages pay a transaction per message on each of the two SQLite files, so
their rate is bound by commits, not by Python; `Recommend` p99 under ingestion load is not measured here, and this
bench is not part of `make bench` (it takes about 2 minutes).
"""


if __name__ == "__main__":
    raise SystemExit(main())
