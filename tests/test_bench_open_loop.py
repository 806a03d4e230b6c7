"""bench.open_loop's bookkeeping over h2load rate-mode logs: lateness against the schedule, latency from the
due time (no coordinated omission), failures, and when a tail may be judged. Pure: synthetic h2load rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.h2load import Job, LogRow, SlotRun, Summary, command
from bench.open_loop import generator_limited, schedule_lateness_ms, summarise

T0 = 1_700_000_000_000_000  # us since epoch


def _run(rows: list[LogRow], rps: float, user: str, answer_bytes: int = 100, failed_answers: int = 0) -> SlotRun:
    done = len(rows)
    ok = sum(1 for r in rows if r.status == 200)
    job = Job("http://127.0.0.1:1/x", Path("body.bin"), 1, 64, 1.0, Path("log"), answer_bytes, rps=rps)
    summary = Summary(1.0, done, ok, done - ok, 0, ok, (ok - failed_answers) * answer_bytes, started=done)
    return SlotRun(0, job, summary, tuple(rows), tag=user)


def test_rate_mode_is_on_the_h2load_command_line():
    job = Job("http://127.0.0.1:1/x", Path("b"), 1, 64, 2.0, Path("l"), 10, rps=12.5)
    cmd = command(job)
    assert cmd[cmd.index("--rps") + 1] == "12.5000" and cmd[cmd.index("-m") + 1] == "64"
    assert "--rps" not in command(Job("http://127.0.0.1:1/x", Path("b"), 1, 1, 2.0, Path("l")))


def test_lateness_is_measured_against_the_schedule_not_the_previous_send():
    # 10 req/s: due every 100 ms. The third send is 30 ms late; the ones after it are back on time.
    starts = [T0, T0 + 100_000, T0 + 230_000, T0 + 300_000, T0 + 400_000]
    assert schedule_lateness_ms(starts, 10.0).tolist() == pytest.approx([0, 0, 30, 0, 0])
    # A generator that falls behind stays behind: every later send is late by the accumulated delay.
    behind = [T0 + k * 150_000 for k in range(5)]
    assert schedule_lateness_ms(behind, 10.0).tolist() == pytest.approx([0, 50, 100, 150, 200])


def test_latency_counts_from_the_due_time_and_failures_are_counted():
    rows = [LogRow(T0 + k * 100_000 + (40_000 if k == 2 else 0), 200, 2_000) for k in range(10)]
    rows[5] = LogRow(rows[5].start_us, -1, 0)  # a failed stream
    result = summarise(10.0, [_run(rows, 10.0, "u1", failed_answers=1)])  # and one 200 that carried no message
    assert result["requests"] == 10 and result["failures"] == 2 and result["answered"] == 8
    assert result["max"] == pytest.approx(42.0)  # 40 ms late + 2 ms of service
    assert result["service_p50"] == pytest.approx(2.0)
    assert result["lateness_max_ms"] == pytest.approx(40.0) and result["late_over_1ms"] == 1
    assert result["distinct_users_answered"] == 1


def test_rate_kept_and_generator_limited_decide_whether_a_tail_is_judged():
    on_time = [LogRow(T0 + k * 10_000, 200, 1_000) for k in range(100)]  # 100 req/s for ~1 s
    kept = summarise(100.0, [_run(on_time, 100.0, "u1")])
    assert kept["rate_kept"] and not kept["generator_limited"]
    assert not summarise(400.0, [_run(on_time, 100.0, "u1")])["rate_kept"]  # offered 400, achieved ~100
    assert generator_limited(5.0, 10.0) and not generator_limited(0.5, 10.0) and not generator_limited(2.0, 100.0)
    assert generator_limited(float("nan"), 1.0)


def test_runs_of_several_users_merge():
    a = [LogRow(T0 + k * 50_000, 200, 1_000) for k in range(20)]
    b = [LogRow(T0 + 500_000 + k * 50_000, 200, 3_000) for k in range(20)]
    result = summarise(20.0, [_run(a, 20.0, "u1"), _run(b, 20.0, "u2")])
    assert result["answered"] == 40 and result["distinct_users_answered"] == 2
    assert result["p50"] == pytest.approx(float(np.percentile([1.0] * 20 + [3.0] * 20, 50)))
