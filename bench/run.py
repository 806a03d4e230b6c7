"""`python -m bench.run`: build the bench shop, measure ours vs the naive server, write docs/benchmarks/.

Every server and load generator it starts is stopped before it returns, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from bench import h2load, prom
from bench import open_loop as bench_open_loop
from bench.cpu import GroupCpu
from bench.frames import write_frame
from bench.processes import ServerProcess, free_port
from bench.report import table, targets_table, write_report
from bench.results import build_results, previous_max
from bench.rotation import UserRotation, segments_per_slot, split
from bench.state import N_ITEMS, N_USERS, PROJECT_ROOT, BenchState, ensure_state
from propensity.settings import CandidateSettings
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc

# Serving-time settings for both servers and the in-process floor. The candidate generator fills its
# budget from the whole catalog by retrieval score, so every Recommend scores max_candidates=200 items as is.
SERVE_OVERRIDES: dict[str, str] = {}
# Periodic work more often than the defaults (60 s, 5 s), so every phase contains catalog refreshes and
# registry polls: the lag verdict is about them. It costs the sweep a little throughput.
PERIODIC_OVERRIDES = {"PROPENSITY_SERVER__ITEM_CACHE_REFRESH_SECONDS": "10", "PROPENSITY_SERVER__MODEL_POLL_SECONDS": "1"}
RECOMMEND = "/propensity.v1.RecommendationService/Recommend"
HEALTH = "/grpc.health.v1.Health/Check"
OURS_MAX_PROCS = 16  # h2load slots side by side for our server: one user per process
NAIVE_MAX_PROCS = 4  # the naive server is ~100x slower: few long processes, few users
SETTLE_SECONDS = 0.3  # after a level, before reading the server's CPU and request count
OPEN_LOOP_SEGMENT_SECONDS = 2.0  # each open-loop h2load process sends one user's request for about this long
_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[bench {time.monotonic() - _T0:6.1f}s] {message}", flush=True)


class Payloads:
    """One framed RecommendRequest file per user, with the verified size of its answer per server."""

    def __init__(self, directory: Path, users: Sequence[str]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.users = list(users)
        self.files = {u: directory / f"recommend_{u}.bin" for u in users}
        for user, path in self.files.items():
            write_frame(path, pb.RecommendRequest(user_id=user, num_items=10))
        self.health = directory / "health_check.bin"
        write_frame(self.health, health_pb2.HealthCheckRequest(service=""))
        self.response_bytes: dict[str, int] = {}

    def verify(self, target: str, users: Sequence[str], require_personalised: bool, concurrency: int = 16) -> None:
        """Send each user's payload once through the generated stub (several at a time); record each answer's framed size."""
        asyncio.run(self._verify(target, list(users), require_personalised, concurrency))

    async def _verify(self, target: str, users: list[str], require_personalised: bool, concurrency: int) -> None:
        channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(min(4, concurrency))]
        stubs = [pb_grpc.RecommendationServiceStub(c) for c in channels]
        queue = list(reversed(users))
        problems: list[str] = []

        async def worker(w: int) -> None:
            while queue:
                user = queue.pop()
                request = pb.RecommendRequest.FromString(self.files[user].read_bytes()[5:])
                reply = await stubs[w % len(stubs)].Recommend(request, timeout=60)
                if not reply.items or (require_personalised and reply.fallback_used):
                    problems.append(f"Recommend({user}) gave {len(reply.items)} items, fallback {reply.fallback_reason}")
                self.response_bytes[user] = reply.ByteSize() + 5

        try:
            await asyncio.gather(*(worker(w) for w in range(concurrency)))
        finally:
            for c in channels:
                await c.close()
        if problems:
            raise RuntimeError(f"{target}: {len(problems)} of {len(users)} payloads not answered as required, e.g. {problems[:3]}")


def _fresh(path: Path) -> Path:
    """h2load appends to an existing --log-file; every phase gets an empty one."""
    path.unlink(missing_ok=True)
    return path


def recommend_level(target: str, payloads: Payloads, concurrency: int, seconds: float, segments: int, work: Path,
                    rotation: UserRotation, tag: str, max_procs: int, cpu: GroupCpu | None = None,
                    served: Callable[[], float | None] | None = None) -> dict:
    """One concurrency level: slots of h2load processes side by side, each slot handing over to the next user
    about `segments` times (never all slots at once); measured while every slot was sending.

    Server CPU per request divides by the Recommend calls the server itself counted (`served`, from
    its /metrics) when it can: requests cut off when an h2load process's time is up are mostly
    still served, at a cost, without h2load counting them. Otherwise by h2load's answered + cut off.
    """
    procs, clients, streams = split(concurrency, max_procs)
    url = f"http://{target}{RECOMMEND}"

    def next_job(slot: int, k: int, job_seconds: float) -> tuple[h2load.Job, str]:
        user = rotation.take(1)[0]
        log = _fresh(work / f"h2load_{tag}_c{concurrency}_s{slot}_k{k}.log")
        return h2load.Job(url, payloads.files[user], clients, streams, job_seconds, log, payloads.response_bytes[user]), user

    served_before = served() if served else None
    before, wall0 = (cpu.mark() if cpu else 0), time.monotonic()
    runs = h2load.run_slots(next_job, h2load.timetable(procs, seconds, segments))
    if cpu:
        time.sleep(SETTLE_SECONDS)  # let the server finish what the last processes left in flight
    wall = time.monotonic() - wall0
    after = cpu.mark() if cpu else 0
    served_after = served() if served else None
    rotation.record((run.tag, run.answered) for run in runs)
    merged = h2load.merge_slots(runs, procs * clients * streams, min_seconds=seconds / 2)
    stats = merged.stats()
    answered = sum(run.answered for run in runs)
    stats.update(processes=procs, connections=procs * clients, streams_per_connection=streams, segments_per_slot=segments,
                 segment_seconds=round(seconds / segments, 3), h2load_runs=len(runs), users=len({run.tag for run in runs if run.answered > 0}),
                 answered=answered)
    if cpu:
        if served_before is not None and served_after is not None:
            handled, how = int(served_after - served_before), "Recommend calls the server counted (its /metrics)"
        else:
            handled, how = answered + merged.in_flight_at_stop, "h2load's answered + cut off in flight"
        stats.update(cpu.phase(before, handled, wall, after=after), server_handled=handled, cpu_per=how)
    return stats


def health_c1(target: str, payloads: Payloads, seconds: float, work: Path) -> dict:
    expected = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING).ByteSize() + 5
    job = h2load.Job(f"http://{target}{HEALTH}", payloads.health, 1, 1, seconds, _fresh(work / "h2load_health_c1.log"), expected)
    runs = h2load.run_slots(lambda slot, k, s: (replace(job, seconds=s), None), [[0.0, seconds]])
    return h2load.merge_slots(runs, 1, min_seconds=seconds / 2).stats()


def sweep(name: str, target: str, payloads: Payloads, levels: Sequence[int], seconds: float, segments: int, work: Path,
          rotation: UserRotation, max_procs: int, cpu: GroupCpu, served: Callable[[], float | None] | None = None) -> list[dict]:
    out = []
    for c in levels:
        stats = recommend_level(target, payloads, c, seconds, segments, work, rotation, name, max_procs, cpu, served)
        say(f"{name:5s} c={c:<3d} {stats['throughput_rps']:9.1f} req/s  p50 {stats['p50']:8.2f} ms  p95 {stats['p95']:8.2f} ms  "
            f"p99 {stats['p99']:8.2f} ms  failures {stats['failures']}  users {stats['users']}  "
            f"CPU {stats['server_cpu_ms_per_request']:.3f} ms/req ({stats['server_cores_busy']:.2f} cores)")
        if stats["failures"]:
            say(f"WARNING: {name} c={c}: {stats['failures']} requests answered without a message (grpc-status != 0?)")
        out.append(stats)
    return out


def warm_up(target: str, payloads: Payloads, work: Path, rotation: UserRotation, max_seconds: float = 24.0) -> None:
    """Load until throughput settles (start-up work such as model compilation may still be running)."""
    previous, t0 = 0.0, time.monotonic()
    while time.monotonic() - t0 < max_seconds:
        stats = recommend_level(target, payloads, 4, 2.0, 2, work, rotation, "warmup", OURS_MAX_PROCS)
        say(f"  warm-up: {stats['throughput_rps']:.0f} req/s")
        if previous and abs(stats["throughput_rps"] - previous) / previous < 0.1:
            return
        previous = stats["throughput_rps"]


def open_loop(target: str, payloads: Payloads, rotation: UserRotation, rate: float, seconds: float, slots: int, work: Path,
              watch: bench_open_loop.ServerWatch | None = None) -> dict:
    """Open loop at `rate` with h2load's rate mode (bench/open_loop.py); `watch`, started by the caller, is stopped when the load ends."""
    segments = max(1, round(seconds / OPEN_LOOP_SEGMENT_SECONDS))
    return bench_open_loop.run_phase(f"http://{target}{RECOMMEND}", lambda: rotation.take(1)[0],
                                     lambda user: (payloads.files[user], payloads.response_bytes[user]), rate, seconds, slots, segments, work,
                                     watch=watch)


def recommend_calls(port: int) -> float | None:
    """Recommend calls our server finished so far (any status), from its /metrics; None if unreadable."""
    text = try_scrape(port)
    return prom.method_calls(prom.parse(text), "Recommend") if text is not None else None


def try_scrape(port: int) -> str | None:
    try:
        return prom.scrape(port)
    except OSError as error:
        say(f"  /metrics on port {port} not readable: {error}")
        return None


def group_processes(pgid: int) -> int:
    """Processes in a process group (the server and any workers it forked)."""
    from bench.cpu import group_stats

    return len(group_stats(pgid))


def machine_info() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), "0")
    h2 = subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(int(mem) / 2**20, 1), "kernel": platform.release(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "h2load": h2}


def ensure_h2load() -> None:
    if shutil.which("h2load") is None:
        raise SystemExit("h2load not found: apt-get install -y nghttp2-client (make bench does this)")


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--state", default=str(PROJECT_ROOT / "var" / "bench"), help="bench shop directory (default var/bench)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the bench shop even if it exists")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "docs" / "benchmarks"))
    parser.add_argument("--previous", default=str(PROJECT_ROOT / "docs" / "benchmarks" / "results.json"),
                        help="results.json of the previous run, read before anything is written (throughput_ratio_vs_previous)")
    parser.add_argument("--levels", default="1,2,4,8,16,32", help="concurrency levels (streams x connections)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per concurrency level (and of the open-loop phase)")
    parser.add_argument("--users", type=int, default=1000, help="sampled users with history that the load rotates over")
    parser.add_argument("--min-segment-seconds", type=float, default=2.0,
                        help="shortest h2load process (one user each) in the sweep; 0.35 makes the sweep alone reach ~1,000 users, "
                             "but every process opens new connections, which costs the server CPU and leaves its slot idle while "
                             "it starts (up to ~0.5 s against a saturated server on a busy machine) and drains")
    parser.add_argument("--workers", type=int, default=2, help="PROPENSITY_SERVER__WORKERS for the real server")
    parser.add_argument("--open-loop-seconds", type=float, default=20.0, help="length of the open-loop phase (it spans catalog refreshes)")
    parser.add_argument("--open-loop-slots", type=int, default=16, help="h2load processes (connections) side by side in the open loop; SO_REUSEPORT spreads connections")
    parser.add_argument("--no-firehose", action="store_true", help="skip the IngestEvents section (bench/firehose.py, about 2 minutes)")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.levels.split(",")]
    ensure_h2load()
    previous = previous_max(Path(args.previous))  # before anything is written: the numbers this run is compared with
    if previous:
        say(f"previous results ({previous['path']}, {previous['date']}): max {previous['max_rps']:,.1f} req/s")

    state = ensure_state(Path(args.state), args.rebuild, progress=say)
    work = state.root / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    from bench.floor import measure_floor, measure_user_read, user_reader
    from bench.redis_store import ensure_redis_store
    from bench.shop import candidate_counts, open_shop, sample_users

    say("opening the bench shop in-process (store, catalog, models)")
    shop = open_shop(state, SERVE_OVERRIDES)
    users, rows = sample_users(state, shop, args.users)
    users = [str(u) for u in users]
    if len(users) < args.users:
        say(f"WARNING: only {len(users)} users with history in the bench shop (asked for {args.users})")
    counts = candidate_counts(shop, users, rows)
    # Without serving overrides the server's candidate settings are the defaults: one count is enough.
    default_counts = candidate_counts(shop, users, rows, CandidateSettings()) if SERVE_OVERRIDES else counts
    cap = shop.settings.candidates.max_candidates
    candidates = {"users": len(users), "mean": round(float(counts.mean()), 1), "min": int(counts.min()), "max": int(counts.max()),
                  "share_at_cap": round(float((counts >= cap).mean()), 3), "cap": cap, "catalog_items": shop.catalog.size,
                  "mean_with_default_settings": round(float(default_counts.mean()), 1), "serve_overrides": SERVE_OVERRIDES}
    say(f"{len(users)} users with history; candidates per request mean {candidates['mean']}, min {candidates['min']}, max {candidates['max']}")

    service = shop.settings.user_feature_service
    read_sqlite = user_reader(shop.store, service)
    floor = measure_floor(shop, users, read_sqlite)
    say(f"compute floor: scoring {floor['scoring_p50_ms']:.3f} ms, with the user read {floor['with_feast_user_read_p50_ms']:.3f} ms (p50)")
    user_read: dict[str, dict] = {"sqlite": {"store": f"SQLite ({state.feature_repo / 'data' / 'online_store.db'})", **measure_user_read(read_sqlite, users)}}
    try:
        redis_store, how = ensure_redis_store(state, service, users[:3], read_sqlite, progress=say)
    except Exception as error:  # noqa: BLE001 - the Redis figure is one row of the report, not a reason to lose the run
        redis_store, how = None, f"publishing to Redis failed: {type(error).__name__}: {error}"
    if redis_store is None:
        user_read["redis"] = {"store": "Redis", "not_measured": how, "user_read_p50_ms": None, "user_read_p99_ms": None}
        say(f"user read, Redis: not measured: {how}")
    else:
        user_read["redis"] = {"store": f"Redis ({how})", **measure_user_read(user_reader(redis_store, service), users)}
    for profile, r in user_read.items():
        if r.get("user_read_p50_ms") is not None:
            say(f"user read + decode, {profile}: p50 {r['user_read_p50_ms']:.3f} ms, p99 {r['user_read_p99_ms']:.3f} ms ({r['reads']} reads)")
    settings_used = {
        "server_workers": args.workers, "log_format": "json", "metrics": "on (PROPENSITY_SERVER__METRICS_PORT, scraped before and after the load)",
        "scoring_backend": os.environ.get("PROPENSITY_SERVER__SCORING_BACKEND", "auto (default)"),
        "demo_items": N_ITEMS, "demo_users": N_USERS, "levels": levels, "seconds_per_level": args.seconds, "naive_threads": 8,
        "candidates": shop.settings.candidates.model_dump(), "model_version": shop.model_dir.name, "user_feature_service": service,
        "open_loop_slots": args.open_loop_slots, "open_loop_seconds": args.open_loop_seconds, "periodic_work": PERIODIC_OVERRIDES,
    }
    del shop, rows, redis_store
    payloads = Payloads(work / "payloads", users)
    notes: list[str] = [
        "Naive server: 8 threads, Feast feature services resolved once at start-up (resolving them per request would add ~17 ms each "
        "in Feast 0.67 and make the reference unfairly slow); everything else per request.",
    ]
    cli = str(Path(sys.executable).with_name("propensity"))
    ours_segments = segments_per_slot(levels, args.seconds, len(users), OURS_MAX_PROCS, args.min_segment_seconds, at_least=2)
    rotation = UserRotation(users)

    metrics_port = free_port()
    env = {**state.env(), **SERVE_OVERRIDES, **PERIODIC_OVERRIDES, "PROPENSITY_SERVER__WORKERS": str(args.workers), "PROPENSITY_SERVER__LOG_FORMAT": "json",
           "PROPENSITY_SERVER__METRICS_PORT": str(metrics_port), "PROPENSITY_SERVER__HOST": "127.0.0.1"}
    port = free_port()
    say(f"starting propensity serve on 127.0.0.1:{port} (workers={args.workers}, json logs, metrics on port {metrics_port})")
    with ServerProcess("propensity serve", [cli, "serve", "--port", str(port)], env, port, work / "server.log", PROJECT_ROOT) as ours:
        say(f"  SERVING after {ours.wait_serving():.1f}s")
        t0 = time.monotonic()
        payloads.verify(ours.target, users, require_personalised=True)
        say(f"  {len(users)} payloads verified through the stub in {time.monotonic() - t0:.1f}s (all personalised)")
        warm_up(ours.target, payloads, work, UserRotation(users[::-1]))
        processes = group_processes(ours.pid)
        say(f"  server processes: {processes}")
        settings_used["server_processes_observed"] = processes
        if processes < args.workers:
            notes.append(f"PROPENSITY_SERVER__WORKERS={args.workers} was set but only {processes} server process(es) ran: "
                         "multi-process serving had not taken effect in this build.")
        cpu = GroupCpu(ours.pid)
        metrics_before = try_scrape(metrics_port)
        health = health_c1(ours.target, payloads, 4.0, work)
        say(f"health check c=1: p50 {health['p50']:.3f} ms, {health['throughput_rps']:.0f} req/s")
        say(f"sweep: up to {OURS_MAX_PROCS} h2load slots side by side per level, each handing over to the next user about {ours_segments} times")
        served = lambda: recommend_calls(metrics_port)  # noqa: E731
        ours_levels = sweep("ours", ours.target, payloads, levels, args.seconds, ours_segments, work, rotation, OURS_MAX_PROCS, cpu, served)
        sweep_users = rotation.touched
        best = max(level["throughput_rps"] for level in ours_levels)
        metrics_sweep = try_scrape(metrics_port)
        served_before, before, wall0 = served(), cpu.mark(), time.monotonic()
        watch = bench_open_loop.ServerWatch(ours.pid)  # run queue waits, catalog builds, generator CPU (docs/benchmarks/tail.md)
        watch.start()
        half = open_loop(ours.target, payloads, UserRotation(users[len(users) // 2:] + users[: len(users) // 2]), rate=best / 2,
                         seconds=args.open_loop_seconds, slots=args.open_loop_slots, work=work, watch=watch)
        after, wall, served_after = cpu.mark(), time.monotonic() - wall0, served()
        handled = int(served_after - served_before) if served_before is not None and served_after is not None else half["answered"]
        # The window includes the generator's own start-up and connection warm-up, when the server is nearly idle.
        half.update(cpu.phase(before, handled, wall, after=after), server_handled=handled, server_niceness=os.getpriority(os.PRIO_PROCESS, ours.pid),
                    sharing=watch.report(handled, wall))
        say(f"  open loop, who had the cores: {half['sharing']}; {half.get('during_catalog_builds')}")
        open_loop_users = set(half.pop("users_answered", []))
        nearest = min(ours_levels, key=lambda level: abs(level["throughput_rps"] - best / 2))
        half["closed_loop_level_nearest_half_max"] = {k: nearest[k] for k in ("concurrency", "throughput_rps", "p50", "p95", "p99")}
        say(f"open loop at {half['target_rate_rps']:.0f} req/s: achieved {half['achieved_rps']:.0f} req/s, p50 {half['p50']:.2f} ms, "
            f"p99 {half['p99']:.2f} ms, failures {half['failures']}; generator lateness p50 {half['lateness_p50_ms']:.3f} ms, "
            f"p99 {half['lateness_p99_ms']:.3f} ms, max {half['lateness_max_ms']:.1f} ms"
            + (" -> the GENERATOR limits this tail" if half["generator_limited"] else ""))
        metrics_after = try_scrape(metrics_port)
        # The verdict: stalls while the server is not saturated (the open loop, periodic work running
        # PERIODIC_OVERRIDES' intervals). At saturation every request waits behind the queued ones,
        # so lag there measures the queue; it is reported (`sweep`), not judged.
        lag = prom.lag_report(metrics_sweep, metrics_after)
        sweep_lag = prom.lag_report(metrics_before, metrics_sweep)
        if sweep_lag.get("exported"):
            lag["sweep"] = {k: sweep_lag.get(k) for k in ("max_ms", "samples_during_load", "samples_over_limit_during_load", "max_bucket_bound_ms_during_load")}
        say("event-loop lag: " + (f"during the open loop {lag.get('samples_over_limit_during_load')} of {lag.get('samples_during_load')} samples over "
                                  f"{lag['limit_ms']:g} ms (all under {lag.get('max_bucket_bound_ms_during_load')} ms); max since start {lag['max_ms']} ms "
                                  f"(the saturating sweep included)" if lag["exported"] else f"not exported ({lag['why']})"))
        all_users = _all_user_ids(state)
        scores = []
        for c in (1, 2, 4):
            result = score_users(ours.target, all_users, batch=1000, concurrency=c, seconds=4.0)
            say(f"ScoreUsers x1000 c={c}: {result['users_per_second']:,.0f} users/s ({result['calls']} calls, p50 {result['call_p50_ms']} ms/call)")
            scores.append(result)
        after_score = prom.lag_report(metrics_after, try_scrape(metrics_port))
        if after_score.get("exported"):
            lag["after_score_users"] = {k: after_score.get(k) for k in ("max_ms", "samples_during_load", "samples_over_limit_during_load")}

    naive_segments = 1  # answers take up to seconds at high concurrency: one process per slot and level
    naive_users = min(len(users), sum(len(row) - 1 for c in levels for row in h2load.timetable(split(c, NAIVE_MAX_PROCS)[0], args.seconds, naive_segments)))
    port = free_port()
    say(f"starting the naive server on 127.0.0.1:{port}")
    naive_cmd = [sys.executable, "-m", "bench.naive_server", "--port", str(port), "--threads", "8"]
    with ServerProcess("naive server", naive_cmd, {**state.env(), **SERVE_OVERRIDES}, port, work / "naive.log", PROJECT_ROOT) as naive:
        say(f"  SERVING after {naive.wait_serving():.1f}s")
        naive_rotation = UserRotation(users[:naive_users])
        payloads.verify(naive.target, naive_rotation.users, require_personalised=False, concurrency=8)
        naive_levels = sweep("naive", naive.target, payloads, levels, args.seconds, naive_segments, work, naive_rotation, NAIVE_MAX_PROCS, GroupCpu(naive.pid))

    firehose = {"not_measured": "--no-firehose"} if args.no_firehose else measure_firehose(state, payloads, users, work)

    users_summary = {
        "sampled_with_history": len(users),
        "verified_through_stub": len(users),
        "touched_by_closed_loop_sweep": len(sweep_users),
        "touched_by_open_loop": len(open_loop_users),
        "touched_by_any_recommend_load": len(sweep_users | open_loop_users),
        "naive_sweep": len(naive_rotation.touched),
        "how": "a user counts once one of its Recommend requests was answered with a message under load (warm-up and verification excluded)",
    }
    say(f"distinct users under load: {users_summary['touched_by_any_recommend_load']} (sweep {len(sweep_users)}, open loop {len(open_loop_users)})")
    results = build_results(machine=machine_info(), settings=settings_used, ours=ours_levels, naive=naive_levels, health_c1=health,
                            half_load=half, floor=floor, user_read=user_read, score_users=scores, candidates=candidates,
                            users=users_summary, event_loop_lag=lag, previous=previous, notes=notes)
    results["firehose"] = firehose
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, out)
    print("\n" + table(results) + "\n\n" + targets_table(results) + "\n", flush=True)
    say(f"wrote {out / 'results.json'}, README.md and latency_throughput.png")
    return 0


def measure_firehose(state: BenchState, payloads: Payloads, users: Sequence[str], work: Path) -> dict:
    """The IngestEvents section (bench/firehose.py) on its own server: Recommend's open loop rotates over 100 of the
    sampled users, the freshness probes take 6 others; none of them is in the firehose's events."""
    from bench import firehose

    recommend_users, probe_users = list(users[:100]), list(users[100 : 100 + firehose.PROBES])
    rotation = UserRotation(recommend_users)

    def prepare(target: str) -> firehose.OpenLoop:
        payloads.verify(target, recommend_users, require_personalised=True)  # the answer sizes h2load checks, from this server

        def run(target: str, rate: float, seconds: float) -> dict:
            segments = max(1, round(seconds / OPEN_LOOP_SEGMENT_SECONDS))
            return bench_open_loop.run_phase(f"http://{target}{RECOMMEND}", lambda: rotation.take(1)[0],
                                             lambda user: (payloads.files[user], payloads.response_bytes[user]), rate, seconds,
                                             firehose.RECOMMEND_SLOTS, segments, work)
        return run

    say("firehose: IngestEvents into one server process (bench/firehose.py)")
    return firehose.measure(state, recommend_users, probe_users, prepare, progress=lambda message: say(f"  firehose: {message}"))


def score_users(target: str, user_ids: Sequence[str], batch: int, concurrency: int, seconds: float) -> dict:
    from bench.grpc_load import score_users as run

    return run(target, user_ids, batch=batch, concurrency=concurrency, seconds=seconds)


def _all_user_ids(state: BenchState) -> list[str]:
    import pandas as pd

    ids = pd.read_parquet(state.feature_repo / "data" / "offline" / "user_profile.parquet", columns=["user_id"])["user_id"].astype(str)
    return sorted(ids.unique())


if __name__ == "__main__":
    raise SystemExit(main())
