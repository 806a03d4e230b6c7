"""Drive unary gRPC calls with h2load and read its output: summary counters and per-request log.

h2load knows nothing about gRPC: it posts the same framed body on every stream and counts any
HTTP 200 as a success. Each process therefore sends one user's request, and success is checked
from the bytes received (an error answer carries no DATA, only trailers) against the size of a
verified response.

A phase keeps `slots` h2load processes running side by side, each replaced by the next (another
user) when its time is up, the slots handing over at different moments (`timetable`, `run_slots`).
It is measured over the interval in which every slot was sending, from the per-request logs
(`merge_slots`): requests answered in it / its length, so a process that started late (a new
connection to a saturated server waits its turn) cannot make the others' rates describe load
that never ran at once.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


@dataclass(frozen=True)
class Job:
    """One h2load process: a body file posted on `clients` connections x `streams` streams each."""

    url: str
    body: Path
    clients: int
    streams: int
    seconds: float
    log_file: Path
    expected_response_bytes: int = 0  # DATA bytes of one successful response (0: unknown)
    rps: float = 0.0  # > 0: h2load's rate mode, this many requests per second per connection (open loop up to `streams`)


@dataclass(frozen=True)
class Summary:
    """The counters h2load prints at the end of a run."""

    seconds: float
    done: int
    succeeded: int
    failed: int
    errored: int
    status_2xx: int
    data_bytes: int
    started: int = 0  # requests sent; started - done were in flight when the duration ended (not counted)


@dataclass(frozen=True)
class LogRow:
    start_us: int
    status: int
    elapsed_us: int


def command(job: Job) -> list[str]:
    """The h2load command line of a job (timing-based, no warm-up so byte counts match requests)."""
    cmd = ["h2load", "-c", str(job.clients), "-m", str(job.streams), "-t", "1", "-D", _duration(job.seconds)]
    if job.rps > 0:
        cmd += ["--rps", f"{job.rps:.4f}"]
    for header in GRPC_HEADERS:
        cmd += ["-H", header]
    return cmd + ["-d", str(job.body), "--log-file", str(job.log_file), job.url]


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


_FINISHED = re.compile(r"finished in ([\d.]+)(us|ms|s)\b")
_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored")
_STATUS = re.compile(r"status codes: (\d+) 2xx")
_DATA = re.compile(r"\((\d+)\) data")


def parse_summary(stdout: str) -> Summary:
    """Counters from h2load's closing lines; raises ValueError naming what is missing."""
    found = {name: pattern.search(stdout) for name, pattern in (("finished", _FINISHED), ("requests", _REQUESTS), ("status", _STATUS), ("data", _DATA))}
    missing = [name for name, match in found.items() if match is None]
    if missing:
        raise ValueError(f"h2load output has no {', '.join(missing)} line:\n{stdout[-2000:]}")
    seconds = float(found["finished"].group(1)) / {"us": 1e6, "ms": 1e3, "s": 1.0}[found["finished"].group(2)]
    r = [int(x) for x in found["requests"].groups()]
    return Summary(seconds, r[2], r[3], r[4], r[5], int(found["status"].group(1)), int(found["data"].group(1)), started=r[1])


def read_log(path: Path) -> list[LogRow]:
    """Rows of an h2load --log-file: start (us since epoch), HTTP status (-1 failed), elapsed (us); none if it has no file."""
    rows: list[LogRow] = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[0].strip():
            rows.append(LogRow(int(parts[0]), int(parts[1]), int(parts[2])))
    return rows


def latencies_ms(rows: Sequence[LogRow]) -> np.ndarray:
    """Elapsed times in ms of answered requests (HTTP 200; 0 means headers arrived before logging began)."""
    return np.array([r.elapsed_us / 1000.0 for r in rows if r.status in (200, 0)], dtype=float)


def percentiles(values: Sequence[float] | np.ndarray, points: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    """{'p50': ..., ...} by linear interpolation between closest ranks; NaN for no values."""
    data = np.asarray(values, dtype=float)
    return {f"p{p:g}": (float(np.percentile(data, p)) if len(data) else float("nan")) for p in points}


def grpc_failures(summary: Summary, expected_response_bytes: int) -> int:
    """Requests answered with HTTP 200 but no message (a non-zero grpc-status), from DATA bytes.

    An error answer has trailers only, so every answered request without a full message's worth
    of DATA is a failure. (A response in flight when h2load stops may add DATA without being
    counted as done; that can only hide failures, never invent them.)
    """
    if expected_response_bytes <= 0:
        return 0
    with_message = summary.data_bytes // expected_response_bytes
    return max(0, min(summary.status_2xx, summary.done) - with_message)


@dataclass(frozen=True)
class Window:
    """When every slot of a phase was sending, from the --log-file rows of its processes."""

    start_us: int  # the last slot's first request start
    end_us: int  # the first slot's last answer
    stagger_ms: float  # first request start of the last slot - that of the first
    overlap: bool  # False: the slots never all ran at once (the whole phase is used instead)

    @property
    def seconds(self) -> float:
        return (self.end_us - self.start_us) / 1e6


def overlap_window(logs: Sequence[Sequence[LogRow]], min_seconds: float) -> Window:
    """The interval in which every slot (one list of log rows each) was sending: from the last one's first
    request to the first one's last answer. Shorter than min_seconds (or empty): first start to last answer."""
    spans = [(min(r.start_us for r in rows), max(r.start_us + r.elapsed_us for r in rows)) for rows in logs if rows]
    if not spans:
        return Window(0, 0, 0.0, False)
    starts, ends = [a for a, _ in spans], [b for _, b in spans]
    stagger = (max(starts) - min(starts)) / 1000
    if min(ends) - max(starts) >= min_seconds * 1e6:
        return Window(max(starts), min(ends), stagger, True)
    return Window(min(starts), max(ends), stagger, False)


def in_window(logs: Sequence[Sequence[LogRow]], window: Window) -> tuple[int, np.ndarray]:
    """(requests answered inside the window, latencies in ms of the answered requests that started inside it)."""
    rows = [r for job in logs for r in job if r.status in (200, 0)]
    done = sum(1 for r in rows if window.start_us <= r.start_us + r.elapsed_us <= window.end_us)
    lat = np.array([r.elapsed_us / 1000.0 for r in rows if window.start_us <= r.start_us <= window.end_us], dtype=float)
    return done, lat


@dataclass(frozen=True)
class PhaseResult:
    """Merged result of the h2load processes of one phase."""

    concurrency: int
    seconds: float  # measured time: the rounds' windows
    requests: int  # every answered request (h2load's done)
    failures: int
    throughput: float  # requests answered inside the windows / their length
    latencies_ms: np.ndarray  # of the requests that started inside the windows
    in_flight_at_stop: int = 0  # sent but cut off when the duration ended: neither counted nor timed
    answered_per_job: tuple[int, ...] = ()  # requests answered with a message, per job (in job order)
    stagger_ms: float = 0.0  # spread of the slots' first requests
    windowed: bool = True  # False: the slots never all ran at once (the whole phase was used)

    def stats(self) -> dict[str, float]:
        return {"concurrency": self.concurrency, "requests": self.requests, "failures": self.failures,
                "throughput_rps": round(self.throughput, 1), **{k: round(v, 3) for k, v in percentiles(self.latencies_ms).items()},
                "in_flight_at_stop": self.in_flight_at_stop, "measured_seconds": round(self.seconds, 3),
                "start_stagger_ms": round(self.stagger_ms, 1), "all_slots_overlapped": self.windowed}


def timetable(slots: int, seconds: float, segments: int) -> list[list[float]]:
    """Per slot, the times (s from the phase's start) at which it hands over to its next h2load process.

    Every slot runs from 0 to `seconds` as about `segments` processes of d = seconds / segments each;
    slot i's first hand-over is at d/2 + d*i/slots, so the slots change user at different moments,
    never all at once, and no process runs shorter than d/2. One segment: one process per slot.
    """
    if segments <= 1:
        return [[0.0, seconds] for _ in range(slots)]
    d = seconds / segments
    table = []
    for i in range(slots):
        cuts, t = [0.0], d / 2 + d * i / slots
        while t <= seconds - d / 2 + 1e-9:
            cuts.append(round(t, 6))
            t += d
        table.append(cuts + [seconds])
    return table


_POLICIES = {getattr(os, name): name for name in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR") if hasattr(os, name)}


def scheduling_of(pid: int) -> str:
    """E.g. 'SCHED_OTHER nice 0, autogroup nice 0': how the kernel schedules pid (autogroup: its session's share)."""
    try:
        policy = _POLICIES.get(os.sched_getscheduler(pid), "?")
        text = f"{policy} nice {os.getpriority(os.PRIO_PROCESS, pid)}"
        autogroup = Path(f"/proc/{pid}/autogroup").read_text().split()
        return text + (f", autogroup nice {autogroup[-1]}" if len(autogroup) >= 3 else "")
    except (OSError, IndexError):
        return "unknown (exited)"


def _wait_for_an_exit(procs: Sequence[subprocess.Popen], poll_seconds: float, longest: float = 1.0) -> None:
    """Return when one of procs has exited (or after `longest` s, for the timeout checks).

    Blocks on the processes' pidfds: the generator's parent then wakes only when a process ends, where
    sleeping poll_seconds between checks woke it 250 times a second (4 ms) on the cores the server
    shares with it. Without pidfds (before Linux 5.3) it sleeps poll_seconds.
    """
    fds = []
    try:
        for proc in procs:
            fds.append(os.pidfd_open(proc.pid))
    except (AttributeError, OSError):
        for fd in fds:
            os.close(fd)
        time.sleep(poll_seconds)
        return
    try:
        select.select(fds, [], [], longest)
    finally:
        for fd in fds:
            os.close(fd)


@dataclass(frozen=True)
class SlotRun:
    """One h2load process of a slot: what it ran, its counters and its per-request log rows."""

    slot: int
    job: Job
    summary: Summary
    rows: tuple[LogRow, ...]
    tag: object = None  # the caller's (e.g. the user)
    launched_us: int = 0  # wall clock (us since epoch, as the log's) when the process was started
    exited_us: int = 0  # ... and when it was seen to have exited
    scheduling: str = ""  # how the process was scheduled, read from it once started (scheduling_of)

    @property
    def failures(self) -> int:
        return (self.summary.done - self.summary.succeeded) + grpc_failures(self.summary, self.job.expected_response_bytes)

    @property
    def answered(self) -> int:
        return max(0, self.summary.done - self.failures)


def merge_slots(runs: Sequence[SlotRun], concurrency: int, min_seconds: float) -> PhaseResult:
    """A phase's result from its processes: measured over the interval in which every slot was sending."""
    by_slot: dict[int, list[LogRow]] = {}
    for run in runs:
        by_slot.setdefault(run.slot, []).extend(run.rows)
    logs = list(by_slot.values())
    window = overlap_window(logs, min_seconds)
    done_in_window, latencies = in_window(logs, window)
    return PhaseResult(
        concurrency=concurrency, seconds=window.seconds, requests=sum(r.summary.done for r in runs), failures=sum(r.failures for r in runs),
        throughput=done_in_window / window.seconds if window.seconds > 0 else 0.0, latencies_ms=latencies,
        in_flight_at_stop=sum(max(0, r.summary.started - r.summary.done) for r in runs),
        answered_per_job=tuple(r.answered for r in runs), stagger_ms=window.stagger_ms, windowed=window.overlap,
    )


def run_slots(next_job: Callable[[int, int, float], tuple[Job, object]], table: Sequence[Sequence[float]],
              poll_seconds: float = 0.004, min_job_seconds: float = 0.1, timeout_slack: float = 15.0,
              preexec: Callable[[], None] | None = None) -> list[SlotRun]:
    """Keep one h2load process running per slot, each replaced by the next when it ends, on `table`'s timetable.

    next_job(slot, k, seconds) gives the process for segment k of a slot (and a tag); it runs until the
    slot's next hand-over time. A hand-over that leaves less than min_job_seconds is skipped, and a
    slot stops when no time is left. `preexec` runs in each h2load process before it starts (its scheduling).
    """
    t0 = time.monotonic()
    running: dict[int, tuple[subprocess.Popen, Job, object, int, float, int, str]] = {}
    runs: list[SlotRun] = []

    def start(slot: int, k: int) -> None:
        # A process that ended late (slow start on a busy machine) skips its slot ahead to the next
        # hand-over that leaves enough time, instead of ending the slot.
        while k + 1 < len(table[slot]):
            seconds = t0 + table[slot][k + 1] - time.monotonic()
            if seconds >= min_job_seconds:
                break
            k += 1
        else:
            return
        job, tag = next_job(slot, k, seconds)
        launched = int(time.time() * 1e6)
        proc = subprocess.Popen(command(job), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=preexec)
        running[slot] = (proc, job, tag, k, time.monotonic() + seconds + timeout_slack, launched, scheduling_of(proc.pid))

    try:
        for slot in range(len(table)):
            start(slot, 0)
        while running:
            _wait_for_an_exit([entry[0] for entry in running.values()], poll_seconds)
            for slot, (proc, job, tag, k, deadline, launched, scheduling) in list(running.items()):
                if proc.poll() is None:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"h2load still running {timeout_slack:.0f}s after its duration: {' '.join(command(job))}")
                    continue
                del running[slot]
                out, _ = proc.communicate()
                runs.append(SlotRun(slot, job, parse_summary(out), tuple(read_log(job.log_file)), tag, launched, int(time.time() * 1e6), scheduling))
                job.log_file.unlink(missing_ok=True)
                if k + 2 < len(table[slot]):
                    start(slot, k + 1)
    finally:
        for proc, *_ in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return runs
