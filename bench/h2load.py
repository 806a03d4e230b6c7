"""Drive unary gRPC calls with h2load and read its output: summary counters and per-request log.

h2load knows nothing about gRPC: it posts the same framed body on every stream and counts any
HTTP 200 as a success. Each process therefore sends one user's request, and success is checked
from the bytes received (an error answer carries no DATA, only trailers) against the size of a
verified response.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
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
class PhaseResult:
    """Merged result of h2load processes that ran side by side."""

    concurrency: int
    seconds: float
    requests: int
    failures: int
    throughput: float
    latencies_ms: np.ndarray
    in_flight_at_stop: int = 0  # sent but cut off when the duration ended: neither counted nor timed
    answered_per_job: tuple[int, ...] = ()  # requests answered with a message, per job (in job order)

    def stats(self) -> dict[str, float]:
        return {"concurrency": self.concurrency, "requests": self.requests, "failures": self.failures,
                "throughput_rps": round(self.throughput, 1), **{k: round(v, 3) for k, v in percentiles(self.latencies_ms).items()},
                "in_flight_at_stop": self.in_flight_at_stop}


def run_parallel(jobs: Sequence[Job], timeout_slack: float = 15.0) -> PhaseResult:
    """Start every job at once, wait (bounded), and merge counts and latencies."""
    procs = [subprocess.Popen(command(job), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for job in jobs]
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
    # Timing-based runs (-D): h2load's own req/s is requests / the main duration, while its "finished in"
    # can be anything from microseconds on (seen with 1.52 on a loaded machine); rates use the duration.
    summaries = [replace(parse_summary(out), seconds=job.seconds) for out, job in zip(outputs, jobs)]
    seconds = max(s.seconds for s in summaries)
    latencies = np.concatenate([latencies_ms(read_log(job.log_file)) for job in jobs])
    per_job = [(s.done - s.succeeded) + grpc_failures(s, job.expected_response_bytes) for s, job in zip(summaries, jobs)]
    requests = sum(s.done for s in summaries)
    concurrency = sum(job.clients * job.streams for job in jobs)
    throughput = sum(s.done / s.seconds for s in summaries if s.seconds > 0)
    in_flight = sum(max(0, s.started - s.done) for s in summaries)
    answered = tuple(max(0, s.done - f) for s, f in zip(summaries, per_job))
    return PhaseResult(concurrency, seconds, requests, sum(per_job), throughput, latencies, in_flight, answered)
