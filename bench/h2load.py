"""Drive unary gRPC calls with h2load and read its output: summary counters and per-request log.

h2load knows nothing about gRPC: it posts the same framed body on every stream and counts any
HTTP 200 as a success. Each process therefore sends one user's request, and success is checked
from the bytes received (an error answer carries no DATA, only trailers) against the size of a
verified response.

Processes that run side by side are started together (each waits, stopped, until all exist) and
measured over the interval in which all of them were sending, from their per-request logs: a
process that started late or finished early would otherwise make the others' sum of rates
describe load that never ran at once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
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
    """Rows of an h2load --log-file: start (us since epoch), HTTP status (-1 failed), elapsed (us)."""
    rows = []
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
    """When the side-by-side processes of one round all ran, from their --log-file rows."""

    start_us: int  # the last process's first request start
    end_us: int  # the first process's last answer
    stagger_ms: float  # first request start of the last process - that of the first
    overlap: bool  # False: the processes never all ran at once (the whole round is used instead)

    @property
    def seconds(self) -> float:
        return (self.end_us - self.start_us) / 1e6


def overlap_window(logs: Sequence[Sequence[LogRow]], min_seconds: float) -> Window:
    """The interval in which every process of a round was sending: from the last one's first request to
    the first one's last answer. Shorter than min_seconds (or empty): the whole round, first start to last answer."""
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
    """Merged result of h2load processes that ran side by side (one round, or the rounds of a level)."""

    concurrency: int
    seconds: float  # measured time: the rounds' windows
    requests: int  # every answered request (h2load's done)
    failures: int
    throughput: float  # requests answered inside the windows / their length
    latencies_ms: np.ndarray  # of the requests that started inside the windows
    in_flight_at_stop: int = 0  # sent but cut off when the duration ended: neither counted nor timed
    answered_per_job: tuple[int, ...] = ()  # requests answered with a message, per job (in job order)
    stagger_ms: float = 0.0  # largest start-to-start spread of a round's processes
    windowed: bool = True  # False: in some round the processes never all ran at once

    def stats(self) -> dict[str, float]:
        return {"concurrency": self.concurrency, "requests": self.requests, "failures": self.failures,
                "throughput_rps": round(self.throughput, 1), **{k: round(v, 3) for k, v in percentiles(self.latencies_ms).items()},
                "in_flight_at_stop": self.in_flight_at_stop, "measured_seconds": round(self.seconds, 3),
                "start_stagger_ms": round(self.stagger_ms, 1), "all_processes_overlapped": self.windowed}


# Each process stops itself before exec'ing h2load, and all are continued at once, so their start is
# not spread by starting them one after another (tens of ms each on a busy machine).
_BARRIER = 'kill -STOP $$ && exec "$@"'


def _start_together(commands: Sequence[list[str]]) -> list[subprocess.Popen]:
    procs = [subprocess.Popen(["sh", "-c", _BARRIER, "h2load-barrier", *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in commands]
    for proc in procs:  # stopped (or already dead), without reaping it: Popen still owns its exit status
        os.waitid(os.P_PID, proc.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
    for proc in procs:
        try:
            os.kill(proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    return procs


def run_parallel(jobs: Sequence[Job], timeout_slack: float = 15.0) -> PhaseResult:
    """Start every job at once, wait (bounded), and merge counts and latencies over the interval in which all ran."""
    procs = _start_together([command(job) for job in jobs])
    outputs = []
    try:
        deadline = time.monotonic() + max(job.seconds for job in jobs) + timeout_slack
        for proc in procs:
            out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    summaries = [parse_summary(out) for out in outputs]
    logs = [read_log(job.log_file) for job in jobs]
    duration = max(job.seconds for job in jobs)
    window = overlap_window(logs, min_seconds=duration / 2)
    done_in_window, latencies = in_window(logs, window)
    per_job = [(s.done - s.succeeded) + grpc_failures(s, job.expected_response_bytes) for s, job in zip(summaries, jobs)]
    concurrency = sum(job.clients * job.streams for job in jobs)
    throughput = done_in_window / window.seconds if window.seconds > 0 else 0.0
    in_flight = sum(max(0, s.started - s.done) for s in summaries)
    answered = tuple(max(0, s.done - f) for s, f in zip(summaries, per_job))
    return PhaseResult(concurrency, window.seconds, sum(s.done for s in summaries), sum(per_job), throughput, latencies,
                       in_flight, answered, window.stagger_ms, window.overlap)
