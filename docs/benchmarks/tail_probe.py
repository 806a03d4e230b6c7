"""Probe the open-loop tail at a fixed rate: the bench's open-loop phase only, several variants alternating.

docs/benchmarks/tail.md has the method and the findings. Starts `propensity serve` on a bench shop exactly
as bench/run.py does (same environment, periodic overrides, workers), verifies the payloads, warms up,
and runs bench.open_loop.run_phase --repeat times per variant, the variants alternating within each round.
A server variant is a directory put first on the server's PYTHONPATH (e.g. holding a sitecustomize.py);
each round starts every server variant afresh. A generator variant sets how the h2load processes are
scheduled (`normal`, `batch`: SCHED_BATCH, which never preempts a running task on wake-up), or `sleep4ms`: the
generator's parent polling its h2load processes every 4 ms, as before it blocked on their pidfds.

    .venv/bin/python docs/benchmarks/tail_probe.py --state /tmp/h2/bench --rate 485 --seconds 15 --repeat 3 \
        --gen normal --gen batch --out /tmp/h2/out/gen.jsonl

One JSON line per run: the phase summary (p50/p99/max, lateness), bench.open_loop.ServerWatch's report
(run-queue wait, CPU per worker and of the generator), the event-loop lag between scrapes and the
server CPU ms per answered request.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import h2load, open_loop, prom  # noqa: E402
from bench.cpu import GroupCpu  # noqa: E402
from bench.processes import ServerProcess, free_port  # noqa: E402
from bench.rotation import UserRotation  # noqa: E402
from bench.run import PERIODIC_OVERRIDES, PROJECT_ROOT, SERVE_OVERRIDES, Payloads, recommend_calls, warm_up  # noqa: E402
from bench.state import ensure_state  # noqa: E402


def batch_scheduling() -> None:
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def fifo_scheduling() -> None:
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))


GENERATORS: dict[str, Callable[[], None] | None] = {"normal": None, "batch": batch_scheduling, "sleep4ms": None, "fifo": fifo_scheduling}


def thread_stats(pids: list[int]) -> dict[str, list[int]]:
    """Per thread, over pids: [CPU ns, run-queue wait ns, times it was put on a CPU] (schedstat), and voluntary /
    involuntary context switches. Named by comm, `main` for a worker's loop thread, with the worker's index."""
    out: dict[str, list[int]] = {}
    for i, pid in enumerate(sorted(pids)):
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                name = "main" if task.name == str(pid) else f"{(task / 'comm').read_text().strip()}:{task.name}"
                name = f"w{i}:{name}"
                status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if "ctxt_switches" in line)
                values = [int(x) for x in (task / "schedstat").read_text().split()]
                values += [int(status["voluntary_ctxt_switches"]), int(status["nonvoluntary_ctxt_switches"])]
            except (OSError, ValueError):
                continue
            total = out.setdefault(name, [0] * 5)
            for k in range(5):
                total[k] += values[k]
    return out


def set_autogroup_nice(pid: int, nice: int) -> None:
    """The CPU share of pid's session against the other sessions (with autogroups, nice acts only inside a session)."""
    Path(f"/proc/{pid}/autogroup").write_text(str(nice))


def users_of(state_root: Path, n: int, cache: Path) -> list[str]:
    """The bench's sampled users (bench.shop.sample_users), cached: opening the shop costs ~20 s."""
    if cache.exists():
        return json.loads(cache.read_text())
    from bench.shop import open_shop, sample_users

    state = ensure_state(state_root)
    users = [str(u) for u in sample_users(state, open_shop(state, SERVE_OVERRIDES), n)[0]]
    cache.write_text(json.dumps(users))
    return users


def one_phase(server: ServerProcess, metrics_port: int, payloads: Payloads, users: list[str], rate: float, seconds: float,
              gen: str, work: Path, poll: float) -> dict:
    cpu = GroupCpu(server.pid)
    scrape_before = prom.scrape(metrics_port)
    served_before, before, wall0 = recommend_calls(metrics_port), cpu.mark(), time.monotonic()
    watch = open_loop.ServerWatch(server.pid)
    t0 = time.time()
    watch.start()
    workers = [pid for pid, p in watch.before.items() if p.role == "worker"]
    threads_before = thread_stats(workers)
    rotation = UserRotation(users)
    segments = max(1, round(seconds / 2.0))
    # sleep4ms: the generator's parent as it was before it blocked on pidfds (bench.h2load._wait_for_an_exit).
    wait = h2load._wait_for_an_exit
    if gen == "sleep4ms":
        h2load._wait_for_an_exit = lambda procs, poll_seconds, longest=1.0: time.sleep(poll_seconds)
    result = open_loop.run_phase(f"http://{server.target}/propensity.v1.RecommendationService/Recommend", lambda: rotation.take(1)[0],
                                 lambda u: (payloads.files[u], payloads.response_bytes[u]), rate, seconds, 16, segments, work,
                                 watch=watch, preexec=GENERATORS[gen], poll_seconds=poll)
    h2load._wait_for_an_exit = wait
    after, wall, served_after = cpu.mark(), time.monotonic() - wall0, recommend_calls(metrics_port)
    handled = int(served_after - served_before)
    threads_after = thread_stats(workers)
    per_thread = {name: {"cpu_us_per_request": round((v[0] - threads_before.get(name, [0] * 5)[0]) / 1e3 / handled, 1),
                         "wait_us_per_request": round((v[1] - threads_before.get(name, [0] * 5)[1]) / 1e3 / handled, 1),
                         "runs_per_request": round((v[2] - threads_before.get(name, [0] * 5)[2]) / handled, 2),
                         "voluntary_per_request": round((v[3] - threads_before.get(name, [0] * 5)[3]) / handled, 2),
                         "involuntary_per_request": round((v[4] - threads_before.get(name, [0] * 5)[4]) / handled, 2)}
                  for name, v in threads_after.items()}
    result.pop("users_answered", None)
    lag = prom.lag_report(scrape_before, prom.scrape(metrics_port))
    result.update(cpu.phase(before, handled, wall, after=after), worker_threads=per_thread, sharing=watch.report(handled, wall),
                  lag={k: lag.get(k) for k in ("samples_during_load", "samples_over_limit_during_load", "max_bucket_bound_ms_during_load", "periodic")},
                  loadavg=os.getloadavg()[0], wall_clock=(round(t0, 3), round(time.time(), 3)),
                  server_pids=sorted(pid for pid, p in watch.after.items() if p.role == "worker"))
    return result


def main() -> int:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", required=True, help="a copy of the bench shop (var/bench)")
    parser.add_argument("--rate", required=True, help="req/s; several, comma-separated, are variants too")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--gen", action="append", choices=sorted(GENERATORS), help="generator variants (default: normal)")
    parser.add_argument("--server", action="append", default=[], help="name=DIR: a server variant with DIR first on PYTHONPATH; "
                        "name=: the server as it is (default: one such)")
    parser.add_argument("--poll", type=float, default=0.004, help="run_slots' poll interval")
    parser.add_argument("--out", required=True, help="JSON lines, appended")
    parser.add_argument("--prio", type=int, default=None, help="autogroup niceness for the probe's session (h2load included) and the "
                        "server's: on a machine shared with other sessions, -15 lets the bench have the cores (root only)")
    args = parser.parse_args()
    if args.prio is not None:
        if os.getsid(0) != os.getpid():
            os.setsid()
        set_autogroup_nice(os.getpid(), args.prio)
    gens = args.gen or ["normal"]
    servers = [tuple(s.split("=", 1)) for s in args.server] or [("as-is", "")]
    state = ensure_state(Path(args.state))
    work = state.root / "probe"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    users = users_of(state.root, args.users, state.root / "probe_users.json")
    payloads = Payloads(work / "payloads", users)
    cli = str(Path(sys.executable).with_name("propensity"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for round_ in range(args.repeat):
        for name, path in servers if round_ % 2 == 0 else servers[::-1]:  # no variant always runs first
            metrics_port, port = free_port(), free_port()
            env = {**state.env(), **SERVE_OVERRIDES, **PERIODIC_OVERRIDES, "PROPENSITY_SERVER__WORKERS": str(args.workers),
                   "PROPENSITY_SERVER__LOG_FORMAT": "json", "PROPENSITY_SERVER__METRICS_PORT": str(metrics_port),
                   "PROPENSITY_SERVER__HOST": "127.0.0.1"}
            if path:
                env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
            with ServerProcess(name, [cli, "serve", "--port", str(port)], env, port, work / f"server_{name}.log", PROJECT_ROOT) as server:
                if args.prio is not None:
                    set_autogroup_nice(server.pid, args.prio)
                server.wait_serving()
                payloads.verify(server.target, users, require_personalised=True)
                warm_up(server.target, payloads, work, UserRotation(users[::-1]))
                variants = [(float(rate), gen) for rate in args.rate.split(",") for gen in gens]
                for rate, gen in variants if round_ % 2 == 0 else variants[::-1]:
                    result = one_phase(server, metrics_port, payloads, users, rate, args.seconds, gen, work, args.poll)
                    row = {"round": round_, "server": name, "gen": gen, **result}
                    with out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    s = row["sharing"]
                    print(f"r{round_} {name:>8} {gen:>7} {rate:.0f}/s: p50 {row['p50']:.2f} p99 {row['p99']:.2f} max {row['max']:.1f} ms; "
                          f"late p99 {row['lateness_p99_ms']:.2f}; achieved {row['achieved_rps']:.0f}; cpu/req {row.get('server_cpu_ms_per_request')}; "
                          f"rq wait {s['worker_run_queue_wait_share']:.2f}; workers {s['worker_cpu_seconds']}; gen cpu {s['generator_cpu_seconds']}; "
                          f"busy {s['machine_cores_busy']}; lag>5ms {row['lag']['samples_over_limit_during_load']}/{row['lag']['samples_during_load']}; "
                          f"load {row['loadavg']:.1f}", flush=True)
                    for thread, v in sorted(row["worker_threads"].items(), key=lambda kv: -kv[1]["cpu_us_per_request"])[:8]:
                        print(f"      {thread:>24}: {v}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
