"""Open-loop Recommend load at a fixed rate with h2load's rate mode (--rps), its lateness measured from its own log.

In rate mode, request k of an h2load connection is due at (its first request) + k / rps whatever
happened to the earlier ones: open loop, as long as fewer than `streams` answers are outstanding on
the connection (beyond that h2load holds the send back, and the hold shows as lateness). Its
--log-file says when each request actually started and how long it took, so per request:

- lateness = started - due: how far behind its own schedule the generator was;
- latency = max(lateness, 0) + elapsed, i.e. from when the request was due: a late send counts
  against the result (no coordinated omission).

h2load is C: 0.08 cores at 350 req/s with one process per connection, 0.15 with a new process per
user every 2 s (docs/benchmarks/tail.md; ServerWatch reports it for every phase). The Python grpc.aio generator this
replaces needed most of a core at 800 req/s on the 2 cores it shared with the server, and its own
sends were up to 190 ms late at p99, so it measured itself rather than the server.

The generator runs on the server's cores, which a real client would not: its processes are scheduled as
the bench is (`generator_scheduling` says how, per phase), and the Python parent that hands the slots
over blocks on the processes' pidfds instead of polling every 4 ms. Running h2load under SCHED_BATCH
(no wake-up preemption) was tried: the tail got longer, not shorter, since h2load then also reads the
answers late, which counts in the latency (docs/benchmarks/tail.md, 2026-12-02).

Users rotate: `slots` processes side by side, each sending one user's request at rate / slots and
handing over to the next user on h2load.timetable's schedule (the slots never all change at once).
When lateness is a large part of the latency tail, or the rate offered was not achieved, the tail is
not judged (`generator_limited`, `rate_kept`).

What else shared the cores is measured beside it (`ServerWatch`, docs/benchmarks/tail.md): how long the
serving workers waited in the run queue for a CPU (/proc/<pid>/task/*/schedstat), the catalog build
processes' CPU and the latency of the requests due while a build ran, each worker's CPU (SO_REUSEPORT
spreads connections by hash, not evenly), and the h2load processes' own CPU.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import h2load

# The generator, not the server, limits the tail when its p99 lateness is at least this long and this share of the latency p99.
LATENESS_LIMIT_MS, LATENESS_SHARE = 1.0, 0.2
# A tail is judged only if the phase achieved at least this share of the offered rate.
RATE_KEPT_SHARE = 0.95
STREAMS_PER_CONNECTION = 64
BUILD_MARK = "server.build_process"  # in the command line of a worker's catalog build process
WATCH_SECONDS = 0.1  # how often ServerWatch looks whether a build process is using CPU
RESCAN_SECONDS = 2.0  # ... and looks for new build processes


def generator_limited(lateness_p99_ms: float, latency_p99_ms: float) -> bool:
    """True when the generator's own lateness explains a large part of the measured latency tail."""
    if not np.isfinite(lateness_p99_ms):
        return True  # it could not even send: nothing it measured is about the server
    return bool(lateness_p99_ms >= LATENESS_LIMIT_MS and lateness_p99_ms >= LATENESS_SHARE * latency_p99_ms)


def schedule_lateness_ms(starts_us: Sequence[int], rps: float) -> np.ndarray:
    """Per request in start order: actual start - due, where request k is due at the first start + k / rps."""
    starts = np.sort(np.asarray(starts_us, dtype=float))
    if not len(starts):
        return starts
    return (starts - (starts[0] + np.arange(len(starts)) * 1e6 / rps)) / 1000.0


def _pct(values: np.ndarray, p: float) -> float:
    return round(float(np.percentile(values, p)), 3) if len(values) else float("nan")


def summarise(rate: float, runs: Sequence[h2load.SlotRun]) -> dict:
    """The phase's figures from its h2load processes (each in rate mode: run.job.rps)."""
    lateness, latency, service = [], [], []
    first, last = float("inf"), float("-inf")
    for run in runs:
        rows = sorted(run.rows, key=lambda r: r.start_us)
        if not rows:
            continue
        late = schedule_lateness_ms([r.start_us for r in rows], run.job.rps)
        ok = np.array([r.status in (200, 0) for r in rows])
        elapsed = np.array([r.elapsed_us for r in rows], dtype=float) / 1000.0
        lateness.append(late)
        latency.append(np.maximum(late, 0.0)[ok] + elapsed[ok])
        service.append(elapsed[ok])
        first = min(first, rows[0].start_us)
        last = max(last, max(r.start_us + r.elapsed_us for r in rows))
    late_all = np.concatenate(lateness) if lateness else np.array([])
    lat_all = np.concatenate(latency) if latency else np.array([])
    svc_all = np.concatenate(service) if service else np.array([])
    answered = sum(run.answered for run in runs)
    span = (last - first) / 1e6 if last > first else 0.0
    result = {
        "generator": "h2load --rps",
        "target_rate_rps": round(rate, 1),
        "requests": int(sum(run.summary.done for run in runs)),
        "answered": int(answered),
        "failures": int(sum(run.failures for run in runs)),
        "in_flight_at_stop": int(sum(max(0, run.summary.started - run.summary.done) for run in runs)),
        "achieved_rps": round(answered / span, 1) if span > 0 else 0.0,
        "distinct_users_answered": len({run.tag for run in runs if run.answered > 0}),
        "p50": _pct(lat_all, 50), "p95": _pct(lat_all, 95), "p99": _pct(lat_all, 99),
        "max": round(float(lat_all.max()), 3) if len(lat_all) else float("nan"),
        "service_p50": _pct(svc_all, 50), "service_p99": _pct(svc_all, 99),
        "lateness_p50_ms": _pct(late_all, 50), "lateness_p99_ms": _pct(late_all, 99),
        "lateness_max_ms": round(float(late_all.max()), 3) if len(late_all) else float("nan"),
        "late_over_1ms": int((late_all > 1.0).sum()),
        "h2load_runs": len(runs),
        # On the server's own cores, unlike a real client: how the kernel weighed the generator against the server.
        "generator_scheduling": sorted({run.scheduling for run in runs if run.scheduling}),
    }
    result["generator_limited"] = generator_limited(result["lateness_p99_ms"], result["p99"])
    result["rate_kept"] = bool(rate > 0 and result["achieved_rps"] >= RATE_KEPT_SHARE * rate)
    return result


def _schedstat_ns(pid: int) -> int:
    """Nanoseconds all threads of pid spent runnable but waiting for a CPU (field 2 of schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total


@dataclass(frozen=True)
class ProcessSample:
    role: str  # "parent", "worker", "build" or "other" (e.g. multiprocessing's resource tracker)
    cpu_ticks: int
    wait_ns: int


def sample_group(pgid: int) -> dict[int, ProcessSample]:
    """CPU ticks and run-queue wait of every process of the server, by pid: its process group, plus any
    child of it that left the group (a build process in a session of its own)."""
    from bench.cpu import parse_stat

    stats, parents = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
            stat = parse_stat(text)
        except (OSError, ValueError, IndexError):
            continue
        stats[stat.pid], parents[stat.pid] = stat, int(text.rpartition(")")[2].split()[1])
    members = {pid for pid, stat in stats.items() if stat.pgid == pgid}
    members |= {pid for pid, parent in parents.items() if parent in members}
    out = {}
    for pid in members:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            wait = _schedstat_ns(pid)
        except OSError:
            continue  # exited meanwhile
        role = "parent" if pid == pgid else "build" if BUILD_MARK in cmdline else "worker" if parents[pid] == pgid and _is_server(cmdline) else "other"
        out[pid] = ProcessSample(role, stats[pid].utime + stats[pid].stime, wait)
    return out


def _is_server(cmdline: str) -> bool:
    """A forked serving worker has its parent's command line (`propensity serve`); multiprocessing's helpers do not."""
    return "serve" in cmdline and "multiprocessing" not in cmdline


class ServerWatch:
    """Around a phase: what the server's processes did with the cores, and when its catalog builds ran.

    start() before the load, stop() after it; report() gives the figures. A background thread looks
    every WATCH_SECONDS whether a build process used CPU (its ticks grew), so requests can be split by
    whether one was due while a build ran.
    """

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.before: dict[int, ProcessSample] = {}
        self.after: dict[int, ProcessSample] = {}
        self.build_busy: list[tuple[float, float]] = []  # (from, to), wall-clock seconds
        self._children_cpu = 0.0
        self._machine = (0, 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.before, self._machine = sample_group(self.pgid), _machine_ticks()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._children_cpu = usage.ru_utime + usage.ru_stime
        self._thread = threading.Thread(target=self._watch_builds, name="build-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.after = sample_group(self.pgid)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._children_cpu = usage.ru_utime + usage.ru_stime - self._children_cpu
        busy, total = _machine_ticks()
        self._machine = (busy - self._machine[0], total - self._machine[1])

    def _watch_builds(self) -> None:
        # Reading the whole of /proc costs ~7 ms of CPU: the group is scanned for build processes every
        # RESCAN_SECONDS, and in between only their own stat files are read.
        from bench.cpu import parse_stat

        last: dict[int, int] = {}
        builds: list[int] = []
        previous, rescan = time.time(), 0.0
        while not self._stop.wait(WATCH_SECONDS):
            now = time.time()
            if now >= rescan:
                builds, rescan = [pid for pid, s in sample_group(self.pgid).items() if s.role == "build"], now + RESCAN_SECONDS
            for pid in builds:
                try:
                    stat = parse_stat(Path(f"/proc/{pid}/stat").read_text())
                except (OSError, ValueError):
                    continue
                ticks = stat.utime + stat.stime
                if pid in last and ticks > last[pid]:
                    self.build_busy.append((previous, now))
                last[pid] = ticks
            previous = now

    def report(self, handled: int, seconds: float) -> dict:
        """The phase's attribution: the workers' CPU and run-queue wait, the builds' CPU, the generator's CPU."""
        hz = os.sysconf("SC_CLK_TCK")

        def delta(role: str) -> tuple[list[float], float]:
            cpu, wait = [], 0.0
            for pid, a in self.after.items():
                if a.role != role:
                    continue
                b = self.before.get(pid, ProcessSample(role, 0, 0))
                cpu.append((a.cpu_ticks - b.cpu_ticks) / hz)
                wait += (a.wait_ns - b.wait_ns) / 1e9
            return cpu, wait

        workers, wait = delta("worker")
        builds, _ = delta("build")
        others, _ = delta("other")
        busy, total = self._machine
        machine = busy / total * (os.cpu_count() or 1) if total else float("nan")
        return {
            "worker_cpu_seconds": [round(c, 2) for c in sorted(workers, reverse=True)],
            "worker_run_queue_wait_seconds": round(wait, 3),
            # Of the time the workers wanted a CPU, the share they waited for one: 0 on an idle machine.
            "worker_run_queue_wait_share": round(wait / (wait + sum(workers)), 3) if wait + sum(workers) > 0 else float("nan"),
            "worker_run_queue_wait_ms_per_request": round(wait * 1000 / handled, 3) if handled else float("nan"),
            "build_cpu_seconds": round(sum(builds), 2),
            "other_server_cpu_seconds": round(sum(others), 2),  # the workers' helper processes (multiprocessing)
            "build_busy_seconds": round(sum(b - a for a, b in self.build_busy), 1),
            "generator_cpu_seconds": round(self._children_cpu, 2),
            "machine_cores_busy": round(machine, 2),
            "phase_seconds": round(seconds, 1),
        }


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat (idle and iowait are not busy)."""
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


def split_by_intervals(runs: Sequence[h2load.SlotRun], intervals: Sequence[tuple[float, float]]) -> dict:
    """Latency from the scheduled send of the requests due inside any of `intervals` (wall-clock s) and of the others."""
    inside, outside = [], []
    bounds = sorted(intervals)
    starts = np.array([a for a, _ in bounds])
    ends = np.array([b for _, b in bounds])
    for run in runs:
        rows = sorted(run.rows, key=lambda r: r.start_us)
        if not rows:
            continue
        late = schedule_lateness_ms([r.start_us for r in rows], run.job.rps)
        for row, lateness in zip(rows, late):
            if row.status not in (200, 0):
                continue
            due = row.start_us / 1e6 - lateness / 1000.0
            latency = max(lateness, 0.0) + row.elapsed_us / 1000.0
            k = np.searchsorted(starts, due, side="right") - 1
            (inside if k >= 0 and due <= ends[k] else outside).append(latency)
    a, b = np.array(inside), np.array(outside)
    return {"requests_due_during_builds": len(a), "p99_during_builds": _pct(a, 99), "p50_during_builds": _pct(a, 50),
            "requests_due_otherwise": len(b), "p99_otherwise": _pct(b, 99), "p50_otherwise": _pct(b, 50)}


def run_phase(url: str, next_user: Callable[[], str], body_of: Callable[[str], tuple[Path, int]], rate: float, seconds: float,
              slots: int, segments: int, work: Path, streams: int = STREAMS_PER_CONNECTION, watch: ServerWatch | None = None,
              preexec: Callable[[], None] | None = None, poll_seconds: float = 0.004) -> dict:
    """`slots` h2load processes in rate mode at rate / slots each, every slot handing over to a new user
    about `segments` times; body_of(user) gives the framed request file and its verified answer size.
    With `watch` (started by the caller), the requests due while a catalog build ran are split out."""
    per_slot = rate / slots

    def next_job(slot: int, k: int, job_seconds: float) -> tuple[h2load.Job, str]:
        user = next_user()
        body, answer_bytes = body_of(user)
        log = work / f"open_loop_s{slot}_k{k}.log"
        log.unlink(missing_ok=True)  # h2load appends to an existing log
        return h2load.Job(url, body, 1, streams, job_seconds, log, answer_bytes, rps=per_slot), user

    runs = h2load.run_slots(next_job, h2load.timetable(slots, seconds, segments), poll_seconds=poll_seconds, preexec=preexec)
    during = {}
    if watch is not None:
        watch.stop()
        during = {"during_catalog_builds": split_by_intervals(runs, watch.build_busy)}
    return summarise(rate, runs) | during | {"slots": slots, "segments_per_slot": segments, "streams_per_connection": streams,
                                    "rps_per_connection": round(per_slot, 3), "users_answered": sorted({r.tag for r in runs if r.answered > 0})}
