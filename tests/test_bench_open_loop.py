"""bench.open_loop's bookkeeping over h2load rate-mode logs: lateness against the schedule, latency from the
due time (no coordinated omission), failures, and when a tail may be judged (synthetic h2load rows); and
ServerWatch, which says who had the cores, on real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.h2load import Job, LogRow, SlotRun, Summary, command
from bench.open_loop import ServerWatch, generator_limited, schedule_lateness_ms, split_by_intervals, summarise

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


def test_requests_due_while_a_build_ran_are_split_out_by_their_due_time():
    # 10 req/s for 1 s. The generator stalls: requests 4-6 (due at +400, +500, +600 ms) all go out at +650 ms.
    starts = [T0 + k * 100_000 if k not in (4, 5, 6) else T0 + 650_000 for k in range(10)]
    rows = [LogRow(start, 200, 50_000 if k == 3 else 1_000) for k, start in enumerate(starts)]
    build = [((T0 + 250_000) / 1e6, (T0 + 450_000) / 1e6)]  # requests 3 and 4 were due inside it; 4 was sent after it
    split = split_by_intervals([_run(rows, 10.0, "u1")], build)
    assert split["requests_due_during_builds"] == 2 and split["requests_due_otherwise"] == 8
    assert split["p50_during_builds"] == pytest.approx((50.0 + 251.0) / 2)  # 4: 250 ms late + 1 ms, from its due time
    assert split["p50_otherwise"] == pytest.approx(1.0)
    assert split_by_intervals([_run(rows, 10.0, "u1")], [])["requests_due_during_builds"] == 0


# Burns argv[1] seconds of CPU, then waits to be killed (so its counters can still be read).
_BURN = "import sys, time\nwhile time.process_time() < float(sys.argv[1]): pass\ntime.sleep(120)"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_server_watch_tells_the_workers_the_build_processes_and_the_generator_apart(tmp_path: Path):
    # A stand-in server: a group leader that, once told to go, starts one "worker", one "build process" (named
    # like server.build_process, in a session of its own) and one helper, each burning a known amount of CPU.
    go, pids = tmp_path / "go", tmp_path / "pids"
    leader = tmp_path / "leader.py"
    leader.write_text(
        "import os, subprocess, sys, time\n"
        f"burn = {_BURN!r}\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        "procs = [subprocess.Popen([sys.executable, '-c', burn, '0.5', 'propensity', 'serve']),\n"  # a forked worker's command line
        "         subprocess.Popen([sys.executable, '-c', burn, '0.7', '-m', 'server.build_process'], start_new_session=True),\n"
        "         subprocess.Popen([sys.executable, '-c', burn, '0.2', 'multiprocessing helper'])]\n"
        f"open({str(pids)!r}, 'w').write(' '.join(str(p.pid) for p in procs))\n"
        "time.sleep(120)\n"
    )
    server = subprocess.Popen([sys.executable, str(leader)], start_new_session=True)
    try:
        watch = ServerWatch(server.pid)
        watch.start()
        go.touch()
        subprocess.run([sys.executable, "-c", _BURN.replace("time.sleep(120)", "pass"), "0.3"], check=True)  # the "generator"
        deadline = time.monotonic() + 120
        while not pids.exists() or not pids.read_text():
            time.sleep(0.05)
        worker, build, _ = map(int, pids.read_text().split())
        while _cpu_seconds(worker) < 0.45 or _cpu_seconds(build) < 0.65:
            assert time.monotonic() < deadline, "the stand-in processes did not burn their CPU in 2 minutes"
            time.sleep(0.05)
        watch.stop()
        report = watch.report(handled=100, seconds=1.0)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    assert len(report["worker_cpu_seconds"]) == 1 and 0.4 <= report["worker_cpu_seconds"][0] <= 1.0
    assert 0.6 <= report["build_cpu_seconds"] <= 1.2 and 0.1 <= report["other_server_cpu_seconds"] <= 0.6
    assert report["generator_cpu_seconds"] >= 0.25  # children of the bench process: h2load
    assert report["worker_run_queue_wait_seconds"] >= 0 and 0 <= report["worker_run_queue_wait_share"] < 1
    assert report["build_busy_seconds"] >= 0.3  # the watch saw the build process burning (in 0.1 s steps)


def test_the_report_says_who_had_the_cores_and_the_tail_during_builds():
    from bench.report import _sharing

    sharing = {"worker_cpu_seconds": [8.3, 4.9], "worker_run_queue_wait_seconds": 3.2, "worker_run_queue_wait_share": 0.2,
               "worker_run_queue_wait_ms_per_request": 0.61, "build_cpu_seconds": 4.2, "build_busy_seconds": 2.7,
               "generator_cpu_seconds": 2.3, "machine_cores_busy": 2.0, "phase_seconds": 15.0}
    during = {"requests_due_during_builds": 900, "p50_during_builds": 9.1, "p99_during_builds": 198.4,
              "requests_due_otherwise": 4000, "p50_otherwise": 5.0, "p99_otherwise": 30.2}
    text = _sharing({"sharing": sharing, "during_catalog_builds": during})
    assert "8.3, 4.9 CPU seconds" in text and "20% of the time" in text and "4.2 CPU seconds" in text
    assert "p99 198.40 ms" in text and "p99 30.20 ms" in text
    assert "mostly CPU contention" in text  # 20 % of their runnable time waiting for a core
    assert "contention" not in _sharing({"sharing": sharing | {"worker_run_queue_wait_share": 0.02}})
    assert _sharing({}) == ""  # results from before ServerWatch
