"""Open-loop Recommend load at a fixed rate with h2load's rate mode (--rps), its lateness measured from its own log.

In rate mode, request k of an h2load connection is due at (its first request) + k / rps whatever
happened to the earlier ones: open loop, as long as fewer than `streams` answers are outstanding on
the connection (beyond that h2load holds the send back, and the hold shows as lateness). Its
--log-file says when each request actually started and how long it took, so per request:

- lateness = started - due: how far behind its own schedule the generator was;
- latency = max(lateness, 0) + elapsed, i.e. from when the request was due: a late send counts
  against the result (no coordinated omission).

h2load is C and needs a few percent of a core at these rates. The Python grpc.aio generator this
replaces needed most of a core at 800 req/s on the 2 cores it shared with the server, and its own
sends were up to 190 ms late at p99, so it measured itself rather than the server.

Users rotate: `slots` processes side by side, each sending one user's request at rate / slots and
handing over to the next user on h2load.timetable's schedule (the slots never all change at once).
When lateness is a large part of the latency tail, or the rate offered was not achieved, the tail is
not judged (`generator_limited`, `rate_kept`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench import h2load

# The generator, not the server, limits the tail when its p99 lateness is at least this long and this share of the latency p99.
LATENESS_LIMIT_MS, LATENESS_SHARE = 1.0, 0.2
# A tail is judged only if the phase achieved at least this share of the offered rate.
RATE_KEPT_SHARE = 0.95
STREAMS_PER_CONNECTION = 64


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
    }
    result["generator_limited"] = generator_limited(result["lateness_p99_ms"], result["p99"])
    result["rate_kept"] = bool(rate > 0 and result["achieved_rps"] >= RATE_KEPT_SHARE * rate)
    return result


def run_phase(url: str, next_user: Callable[[], str], body_of: Callable[[str], tuple[Path, int]], rate: float, seconds: float,
              slots: int, segments: int, work: Path, streams: int = STREAMS_PER_CONNECTION) -> dict:
    """`slots` h2load processes in rate mode at rate / slots each, every slot handing over to a new user
    about `segments` times; body_of(user) gives the framed request file and its verified answer size."""
    per_slot = rate / slots

    def next_job(slot: int, k: int, job_seconds: float) -> tuple[h2load.Job, str]:
        user = next_user()
        body, answer_bytes = body_of(user)
        log = work / f"open_loop_s{slot}_k{k}.log"
        log.unlink(missing_ok=True)  # h2load appends to an existing log
        return h2load.Job(url, body, 1, streams, job_seconds, log, answer_bytes, rps=per_slot), user

    runs = h2load.run_slots(next_job, h2load.timetable(slots, seconds, segments))
    return summarise(rate, runs) | {"slots": slots, "segments_per_slot": segments, "streams_per_connection": streams,
                                    "rps_per_connection": round(per_slot, 3), "users_answered": sorted({r.tag for r in runs if r.answered > 0})}
