"""The pure parts of bench/: gRPC frames for h2load, h2load output parsing, percentiles, user rotation,
server CPU accounting, /metrics parsing, the open-loop summary, results, targets and the report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bench.frames import decode_frame, encode_frame, write_frame
from bench.h2load import Job, LogRow, SlotRun, Summary, command, grpc_failures, in_window, latencies_ms, merge_slots, overlap_window, parse_summary, percentiles, read_log, run_slots, timetable
from bench.cpu import cpu_ms_per_request, group_ticks, parse_stat
from bench.open_loop import generator_limited
from bench.prom import LAG_HISTOGRAM, LAG_MAX, above, buckets, lag_report, max_value, method_calls, parse, upper_bound
from bench.report import readme, targets_table
from bench.results import best_level, build_results, periodic_stall_free, previous_max
from bench.rotation import UserRotation, segments_per_slot, split
from propensity.v1 import recommendation_service_pb2 as pb

H2LOAD_STDOUT = """
finished in 3.01s, 222.67 req/s, 94.71KB/s
requests: 668 total, 669 started, 668 done, 668 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 669 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 284.13KB (290949) total, 32.74KB (33525) headers (space savings 59.91%), 214.62KB (219772) data
"""


def test_frame_round_trip_decodes_with_generated_message(tmp_path):
    request = pb.RecommendRequest(user_id="u000123", num_items=10, exclude_item_ids=["i00042"])
    frame = encode_frame(request)
    assert frame[0] == 0 and int.from_bytes(frame[1:5], "big") == len(frame) - 5
    assert decode_frame(frame, pb.RecommendRequest) == request
    path = tmp_path / "body.bin"
    assert write_frame(path, request) == len(frame) and path.read_bytes() == frame


def test_decode_frame_refuses_truncated_and_compressed():
    frame = encode_frame(pb.RecommendRequest(user_id="u1"))
    with pytest.raises(ValueError):
        decode_frame(frame[:-1], pb.RecommendRequest)
    with pytest.raises(ValueError):
        decode_frame(b"\x01" + frame[1:], pb.RecommendRequest)


def test_command_has_grpc_headers_body_and_log(tmp_path):
    job = Job("http://127.0.0.1:1/p.S/M", tmp_path / "b.bin", clients=4, streams=2, seconds=2.5, log_file=tmp_path / "l.tsv")
    cmd = command(job)
    assert cmd[0] == "h2load" and "content-type: application/grpc" in cmd and "te: trailers" in cmd
    assert cmd[cmd.index("-c") + 1] == "4" and cmd[cmd.index("-m") + 1] == "2" and cmd[cmd.index("-D") + 1] == "2500ms"
    assert cmd[cmd.index("-d") + 1].endswith("b.bin") and cmd[-1] == job.url


def test_parse_summary_and_grpc_failures_from_data_bytes():
    summary = parse_summary(H2LOAD_STDOUT)
    assert summary == Summary(seconds=3.01, done=668, succeeded=668, failed=0, errored=0, status_2xx=669, data_bytes=219772, started=669)
    assert grpc_failures(summary, 329) == 0  # 219772 / 329 = 668 messages
    half_failed = Summary(3.0, 100, 100, 0, 0, 100, 50 * 329)  # errors carry trailers only
    assert grpc_failures(half_failed, 329) == 50
    with pytest.raises(ValueError, match="requests"):
        parse_summary("finished in 1.00s\n")
    # h2load 1.52 on a loaded machine, timing-based: "finished in" may be microseconds (rates use the duration instead).
    odd = H2LOAD_STDOUT.replace("finished in 3.01s, 222.67 req/s", "finished in 9us, 41.21 req/s")
    assert parse_summary(odd).seconds == pytest.approx(9e-6)
    assert parse_summary(H2LOAD_STDOUT.replace("3.01s", "364.12ms")).seconds == pytest.approx(0.36412)


def test_percentiles_from_h2load_log_file(tmp_path):
    # h2load --log-file: start time (us since epoch) <TAB> HTTP status (-1 failed) <TAB> elapsed (us).
    elapsed = [1000 * (i + 1) for i in range(100)]  # 1..100 ms
    lines = [f"{1795843085580469 + i * 1000}\t200\t{e}" for i, e in enumerate(elapsed)]
    lines += ["1795843085999999\t-1\t5000000", "1795843086000000\t0\t2000"]  # a failed stream; headers before logging
    log = tmp_path / "h2load.log"
    log.write_text("\n".join(lines) + "\n")
    rows = read_log(log)
    assert len(rows) == 102 and rows[0].status == 200 and rows[100].status == -1
    values = latencies_ms(rows)
    assert len(values) == 101  # the failed stream is not a latency
    p = percentiles(values)
    assert p["p50"] == pytest.approx(float(np.percentile(values, 50)))
    assert p["p99"] == pytest.approx(99.0, abs=0.01)
    assert math.isnan(percentiles([])["p50"])


def _rows(start_ms, n, every_ms, elapsed_ms, status=200):
    return [LogRow(int((start_ms + i * every_ms) * 1000), status, int(elapsed_ms * 1000)) for i in range(n)]


def test_overlap_window_is_when_every_process_of_a_round_was_sending():
    early = _rows(0, 40, 10, 5)  # requests start 0..390 ms, last answer at 395 ms
    late = _rows(100, 40, 10, 5)  # started 100 ms later: 100..495 ms
    window = overlap_window([early, late], min_seconds=0.2)
    assert window.overlap and window.start_us == 100_000 and window.end_us == 395_000 and window.stagger_ms == 100.0
    done, latencies = in_window([early, late], window)
    # answers inside [100, 395] ms: early's from start 100 (ends 105) to 390 (ends 395) = 30; late's from 100 to 390 = 30
    assert done == 60 and len(latencies) == 60 and set(latencies) == {5.0}
    # Processes that hardly overlap: the whole round from first start to last answer instead.
    apart = _rows(400, 40, 10, 5)
    window = overlap_window([early, apart], min_seconds=0.2)
    assert not window.overlap and window.start_us == 0 and window.end_us == 795_000
    failed = _rows(0, 10, 10, 5, status=-1)
    assert in_window([failed], overlap_window([failed], 0.01))[0] == 0  # failed streams are no answers
    assert overlap_window([[], []], 0.1).seconds == 0


def test_timetable_hands_over_at_different_moments():
    table = timetable(slots=4, seconds=8.0, segments=4)  # d = 2 s; first hand-overs at 1.0, 1.5, 2.0, 2.5 s
    assert [row[1] for row in table] == [1.0, 1.5, 2.0, 2.5]
    for row in table:
        assert row[0] == 0.0 and row[-1] == 8.0
        gaps = np.diff(row)
        assert gaps.min() >= 1.0 - 1e-9 and gaps.max() <= 3.0 + 1e-9  # every process between d/2 and 3d/2
    assert {len(row) - 1 for row in table} <= {4, 5}
    assert timetable(1, 2.0, 1) == [[0.0, 2.0]]
    hand_overs = [t for row in table for t in row[1:-1]]
    assert len(hand_overs) == len(set(hand_overs))  # never two slots at once


def _run(slot, rows, done=None, data=329, expected=329, tag=None):
    done = len(rows) if done is None else done
    summary = Summary(1.0, done, done, 0, 0, done, data * done, started=done + 1)
    return SlotRun(slot, Job("u", Path("b"), 1, 1, 1.0, Path("l"), expected), summary, tuple(rows), tag)


def test_merge_slots_measures_while_every_slot_was_sending():
    # slot 0: two processes (users a, b) back to back; slot 1 starts 100 ms late.
    runs = [_run(0, _rows(0, 20, 10, 5), tag="a"), _run(0, _rows(210, 19, 10, 5), tag="b"), _run(1, _rows(100, 40, 10, 5), tag="c")]
    merged = merge_slots(runs, concurrency=2, min_seconds=0.2)
    assert merged.windowed and merged.seconds == pytest.approx(0.295)  # 100 ms .. 395 ms (slot 0's last answer)
    assert merged.requests == 79 and merged.failures == 0 and merged.in_flight_at_stop == 3
    assert merged.answered_per_job == (20, 19, 40)
    # errors: answered without a message (no DATA for it) count as failures of their process
    failing = _run(0, _rows(0, 10, 10, 5), data=329, expected=329 * 2)
    assert failing.failures == 5 and failing.answered == 5


def test_run_slots_keeps_each_slot_busy_and_hands_over(tmp_path, monkeypatch):
    # A stand-in for h2load: prints a summary and writes a log row per "request", for its given duration.
    import bench.h2load as h2

    fake = tmp_path / "h2load"
    fake.write_text("""#!/bin/sh
log=""; for a in "$@"; do [ "$prev" = "--log-file" ] && log="$a"; prev="$a"; done
now=$(date +%s%6N); printf "%s\t200\t1000\n" "$now" > "$log"; printf "%s\t200\t1000\n" "$((now + 1000))" >> "$log"
echo "finished in 1.00s, 2.00 req/s, 1KB/s"
echo "requests: 2 total, 2 started, 2 done, 2 succeeded, 0 failed, 0 errored, 0 timeout"
echo "status codes: 2 2xx, 0 3xx, 0 4xx, 0 5xx"
echo "traffic: 1KB (1000) total, 100B (100) headers (space savings 50%), 658B (658) data"
""")
    fake.chmod(0o755)
    monkeypatch.setattr(h2, "command", lambda job: [str(fake), "--log-file", str(job.log_file)])
    given = []

    def next_job(slot, k, seconds):
        given.append((slot, k))
        return Job("u", Path("b"), 1, 1, seconds, tmp_path / f"{slot}_{k}.log", 329), f"user{slot}{k}"

    runs = run_slots(next_job, [[0.0, 5.0, 10.0], [0.0, 10.0]], poll_seconds=0.001, min_job_seconds=0.0)  # the stand-in exits at once
    assert sorted(given) == [(0, 0), (0, 1), (1, 0)]
    assert sorted(r.tag for r in runs) == ["user00", "user01", "user10"] and all(r.answered == 2 for r in runs)
    assert not list(tmp_path.glob("*.log"))  # logs are read and removed


# --- user rotation -------------------------------------------------------------------------------


def test_rotation_continues_through_the_list_and_wraps():
    rotation = UserRotation(["a", "b", "c", "d", "e"])
    assert rotation.take(2) == ["a", "b"]
    assert rotation.take(2) == ["c", "d"]
    assert rotation.take(3) == ["e", "a", "b"]  # wraps around, continuing where it stopped
    rotation.record([("a", 3), ("b", 0), ("e", 1)])  # b's process answered nothing
    assert rotation.touched == {"a", "e"}
    with pytest.raises(ValueError):
        UserRotation([])


def test_split_gives_one_process_per_user_up_to_the_cap():
    assert split(1, 16) == (1, 1, 1)
    assert split(8, 16) == (8, 1, 1)
    assert split(32, 16) == (16, 2, 1)
    assert split(32, 4) == (4, 4, 2)  # 4 processes x 4 connections x 2 streams
    for c in (1, 2, 4, 8, 16, 32):
        procs, clients, streams = split(c, 16)
        assert procs * clients * streams == c


def test_segments_per_slot_reach_every_user_unless_processes_get_too_short():
    levels = [1, 2, 4, 8, 16, 32]  # 1+2+4+8+16+16 = 47 slots across the levels
    assert segments_per_slot(levels, 8.0, 1000, 16, 0.35) == 22  # ceil(1000 / 47); 8 / 22 = 0.36 s
    assert segments_per_slot(levels, 8.0, 5000, 16, 0.35) == 22  # capped: 8 / 0.35 = 22.9
    assert segments_per_slot(levels, 8.0, 10, 16, 0.35, at_least=2) == 2
    assert segments_per_slot([1], 0.2, 1000, 16, 0.35) == 1
    # A whole sweep on those timetables takes users in sequence, one per process: >= 1000 distinct.
    rotation = UserRotation([f"u{i}" for i in range(1000)])
    for c in levels:
        for row in timetable(split(c, 16)[0], 8.0, 22):
            users = rotation.take(len(row) - 1)
            rotation.record((u, 1) for u in users)
    assert len(rotation.touched) == 1000


# --- server CPU from /proc -----------------------------------------------------------------------


def _stat_line(pid, comm, pgid, utime, stime, cutime=0, cstime=0):
    # pid (comm) state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime ...
    return f"{pid} ({comm}) S 1 {pgid} {pgid} 0 -1 4194560 100 0 0 0 {utime} {stime} {cutime} {cstime} 20 0 3 0 100 0 0"


def test_parse_stat_handles_spaces_and_parentheses_in_the_command():
    stat = parse_stat(_stat_line(4242, "propensity (worker) 1", 4200, 150, 30, 7, 3))
    assert (stat.pid, stat.pgid, stat.utime, stat.stime, stat.cutime, stat.cstime) == (4242, 4200, 150, 30, 7, 3)
    assert stat.ticks == 190
    with pytest.raises(ValueError):
        parse_stat("garbage")


def test_group_ticks_sums_the_process_group_children_included(tmp_path):
    for pid, comm, pgid, u, s, cu, cs in [(100, "propensity", 100, 10, 5, 40, 10),  # parent; cutime: a reaped worker
                                          (101, "propensity-worker-0", 100, 300, 50, 0, 0),
                                          (102, "propensity-worker-1", 100, 280, 60, 0, 0),
                                          (200, "h2load", 200, 999, 999, 0, 0)]:  # another group: not counted
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(_stat_line(pid, comm, pgid, u, s, cu, cs) + "\n")
    (tmp_path / "self").mkdir()  # non-numeric entries are ignored
    (tmp_path / "103").mkdir()  # a process that vanished: no stat file
    assert group_ticks(100, tmp_path) == 15 + 50 + 350 + 340
    # 755 ticks at 100 Hz over 1,000 requests = 7.55 ms each
    assert cpu_ms_per_request(0, 755, 1000, 100) == pytest.approx(7.55)
    assert math.isnan(cpu_ms_per_request(0, 755, 0, 100))


# --- /metrics and the event-loop lag -------------------------------------------------------------

METRICS_BEFORE = f"""# HELP {LAG_MAX} max lag
# TYPE {LAG_MAX} gauge
{LAG_MAX} 0.0031
{LAG_HISTOGRAM}_bucket{{le="0.001"}} 90.0
{LAG_HISTOGRAM}_bucket{{le="0.005"}} 100.0
{LAG_HISTOGRAM}_bucket{{le="0.01"}} 100.0
{LAG_HISTOGRAM}_bucket{{le="+Inf"}} 100.0
{LAG_HISTOGRAM}_count 100.0
"""
METRICS_AFTER = f"""# TYPE {LAG_MAX} gauge
{LAG_MAX}{{worker="0"}} 0.0042
{LAG_MAX}{{worker="1"}} 0.0071
{LAG_HISTOGRAM}_bucket{{le="0.001",worker="0"}} 180.0
{LAG_HISTOGRAM}_bucket{{le="0.005",worker="0"}} 195.0
{LAG_HISTOGRAM}_bucket{{le="0.01",worker="0"}} 198.0
{LAG_HISTOGRAM}_bucket{{le="+Inf",worker="0"}} 198.0
propensity_requests_total{{method="Recommend",code="OK"}} 1.5e+04
"""


def test_parse_metrics_and_read_the_lag():
    samples = parse(METRICS_AFTER)
    assert max_value(samples, LAG_MAX) == pytest.approx(0.0071)  # the worst worker
    assert max_value(samples, "propensity_requests_total") == 15000.0
    assert max_value(samples, "absent") is None
    cumulative = buckets(samples, LAG_HISTOGRAM)
    assert cumulative == {0.001: 180.0, 0.005: 195.0, 0.01: 198.0, math.inf: 198.0}
    assert above(cumulative, 0.005) == 3 and above(cumulative, 0.002) is None
    assert upper_bound(cumulative) == 0.01 and upper_bound({math.inf: 0.0}) is None
    report = lag_report(METRICS_BEFORE, METRICS_AFTER)
    assert report["exported"] and report["max_ms"] == pytest.approx(7.1) and report["max_ms_before_load"] == pytest.approx(3.1)
    assert report["samples_during_load"] == 98 and report["samples_over_limit_during_load"] == 3
    assert report["max_bucket_bound_ms_during_load"] == pytest.approx(10.0)
    assert report["max_ms_per_worker"] == {"0": pytest.approx(4.2), "1": pytest.approx(7.1)}
    assert report["stalls_over_limit"] is True  # 3 samples above 5 ms between the scrapes
    quiet = METRICS_AFTER.replace('le="0.005",worker="0"} 195.0', 'le="0.005",worker="0"} 198.0')
    assert lag_report(METRICS_BEFORE, quiet)["stalls_over_limit"] is False  # the 7.1 ms max happened before the load


def _periodic_scrape(all_total: int, all_over: int, periodic_total: int, periodic_over: int, step_over: int = 0) -> str:
    """A /metrics text with the lag histograms' 0.005 and +Inf buckets (worker 0) and one periodic task's steps."""
    return f"""{LAG_HISTOGRAM}_bucket{{le="0.005",worker="0"}} {all_total - all_over}
{LAG_HISTOGRAM}_bucket{{le="+Inf",worker="0"}} {all_total}
propensity_event_loop_lag_during_periodic_work_seconds_bucket{{le="0.005",task="any",worker="0"}} {periodic_total - periodic_over}
propensity_event_loop_lag_during_periodic_work_seconds_bucket{{le="+Inf",task="any",worker="0"}} {periodic_total}
propensity_event_loop_lag_during_periodic_work_seconds_bucket{{le="0.005",task="freshness read",worker="0"}} {periodic_total - periodic_over}
propensity_event_loop_lag_during_periodic_work_seconds_bucket{{le="+Inf",task="freshness read",worker="0"}} {periodic_total}
propensity_periodic_loop_step_seconds_bucket{{le="0.0005",task="freshness read",worker="0"}} {20 - step_over}
propensity_periodic_loop_step_seconds_bucket{{le="0.005",task="freshness read",worker="0"}} {20 - step_over}
propensity_periodic_loop_step_seconds_bucket{{le="+Inf",task="freshness read",worker="0"}} 20
"""


def test_periodic_work_stalls_only_when_its_samples_are_over_the_limit_more_often_than_the_rest():
    before = _periodic_scrape(100, 0, 10, 0)
    # The load's own lag: 1 % of samples over 5 ms, during periodic work as much as outside it.
    same_rate = lag_report(before, _periodic_scrape(100 + 6000, 60, 10 + 300, 3))["periodic"]
    assert same_rate["samples_during_periodic"] == 300 and same_rate["samples_over_limit_during_periodic"] == 3
    assert same_rate["samples_outside_periodic"] == 5700 and same_rate["samples_over_limit_outside_periodic"] == 57
    assert same_rate["steps_per_task"] == {"freshness read": 0} and same_rate["steps_over_limit"] == 0
    assert same_rate["samples_during_task"] == {"freshness read": 300}
    assert same_rate["excess_p_value"] > 0.5 and periodic_stall_free(same_rate)
    # 15 % of periodic work's samples over the limit against 1 % otherwise: periodic work stalls the loop.
    excess = lag_report(before, _periodic_scrape(100 + 6000, 102, 10 + 300, 45))["periodic"]
    assert excess["excess_p_value"] < 0.001 and not periodic_stall_free(excess)
    # One periodic step that held the loop over 5 ms is a stall whatever the samples say.
    held = lag_report(_periodic_scrape(100, 0, 10, 0), _periodic_scrape(6100, 60, 310, 3, step_over=1))["periodic"]
    assert held["steps_over_limit"] == 1 and held["step_max_bucket_bound_ms_per_task"] == {"freshness read": None}
    assert not periodic_stall_free(held)
    assert lag_report(METRICS_BEFORE, METRICS_AFTER)["periodic"]["exported"] is False  # an older server: judged as before


def test_the_lag_target_is_judged_on_periodic_work_when_the_server_reports_it(tmp_path):
    lag = lag_report(_periodic_scrape(100, 0, 10, 0), _periodic_scrape(6100, 60, 310, 3))
    lag.update(max_ms=40.0, max_ms_before_load=12.0)
    row = {t["name"]: t for t in _results(tmp_path, event_loop_lag=lag)["targets"]}["event_loop_lag_max_ms"]
    assert row["met"] is True and row["samples_over_limit_during_load"] == 60  # the load's lag is reported, not judged
    text = readme(_results(tmp_path, event_loop_lag=lag))
    assert "60 of 6,000 lag samples over 5 ms during the load" in text and "While periodic work ran: 3 of 300" in text
    stalled = lag_report(_periodic_scrape(100, 0, 10, 0), _periodic_scrape(6100, 102, 310, 45))
    stalled.update(max_ms=40.0, max_ms_before_load=12.0)
    assert {t["name"]: t for t in _results(tmp_path, event_loop_lag=stalled)["targets"]}["event_loop_lag_max_ms"]["met"] is False


def test_method_calls_sums_every_status_code():
    text = """propensity_requests_total{code="OK",method="Recommend"} 1200.0
propensity_requests_total{code="CANCELLED",method="Recommend"} 4.0
propensity_requests_total{code="OK",method="/propensity.v1.RecommendationService/ScoreUsers"} 9.0
propensity_requests_created{code="OK",method="Recommend"} 1.7e9
"""
    assert method_calls(parse(text), "Recommend") == 1204.0
    assert method_calls(parse(text), "ScoreUsers") == 9.0
    assert method_calls(parse(text), "GetModelInfo") is None


def test_lag_report_says_not_exported_instead_of_failing():
    plain = 'propensity_requests_total{method="Recommend",code="OK"} 3.0\n'
    assert lag_report(plain, plain) == {"exported": False, "why": f"{LAG_MAX} and {LAG_HISTOGRAM} not in /metrics"}
    assert lag_report(None, None)["exported"] is False


# --- the open-loop summary -----------------------------------------------------------------------


def test_generator_limited_when_lateness_is_a_large_part_of_the_tail():
    assert generator_limited(lateness_p99_ms=5.0, latency_p99_ms=12.0)
    assert not generator_limited(lateness_p99_ms=5.0, latency_p99_ms=200.0)  # the server's tail dwarfs it
    assert not generator_limited(lateness_p99_ms=0.3, latency_p99_ms=0.9)  # sub-millisecond lateness never counts
    assert generator_limited(float("nan"), 10.0)


# --- results, targets and the report -------------------------------------------------------------


def _level(c, rps, p50, p99, cpu=2.0):
    return {"concurrency": c, "requests": int(rps * 8), "failures": 0, "throughput_rps": rps, "p50": p50, "p95": p99 * 0.8, "p99": p99,
            "users": 100, "server_cpu_ms_per_request": cpu, "server_cores_busy": 1.8,
            "processes": 16, "in_flight_at_stop": 40, "segments_per_slot": 22, "segment_seconds": 0.364, "h2load_runs": 352}


HALF = {"target_rate_rps": 600.0, "achieved_rps": 598.0, "requests": 4800, "answered": 4800, "failures": 0, "fallbacks": 0,
        "p50": 3.0, "p95": 6.0, "p99": 7.5, "max": 20.0, "service_p50": 2.8, "service_p99": 7.0, "lateness_p50_ms": 0.1,
        "lateness_p99_ms": 0.5, "lateness_max_ms": 3.0, "late_over_1ms": 4, "generator_limited": False, "rate_kept": True,
        "slots": 16, "segments_per_slot": 10, "streams_per_connection": 64, "rps_per_connection": 37.5, "distinct_users_answered": 160}


def _results(tmp_path, **overrides):
    ours = [_level(1, 400.0, 2.4, 5.0), _level(8, 1200.0, 6.0, 14.0, cpu=1.6), _level(32, 1100.0, 25.0, 60.0)]
    naive = [_level(1, 15.0, 60.0, 120.0, cpu=130.0), _level(8, 12.0, 600.0, 900.0)]
    previous = tmp_path / "previous.json"
    previous.write_text('{"machine": {"date": "2026-12-01"}, "candidates": {"users": 32}, "recommend": {"ours_max": {"throughput_rps": 600.0}}}')
    arguments = dict(
        machine={"cpus": 2, "date": "2026-12-02"}, settings={"server_workers": 2, "demo_items": 1500, "demo_users": 5000, "seconds_per_level": 8,
                                                             "user_feature_service": "propensity_user_v2"},
        ours=ours, naive=naive, health_c1={"p50": 0.4}, half_load=HALF,
        floor={"with_feast_user_read_p50_ms": 1.5, "with_feast_user_read_p99_ms": 2.5, "scoring_p50_ms": 1.0, "scoring_p99_ms": 2.0, "requests_per_variant": 1000},
        user_read={"sqlite": {"store": "SQLite", "user_read_p50_ms": 0.2, "user_read_p99_ms": 0.4, "reads": 1000},
                   "redis": {"store": "Redis", "not_measured": "Redis at 127.0.0.1:6379 is not accepting connections", "user_read_p50_ms": None}},
        score_users=[{"concurrency": 1, "batch_size": 1000, "calls": 10, "users_per_second": 9000.0, "call_p50_ms": 100.0},
                     {"concurrency": 2, "batch_size": 1000, "calls": 30, "users_per_second": 25000.0, "call_p50_ms": 80.0}],
        candidates={"users": 1000, "mean": 200.0, "min": 200, "max": 200, "share_at_cap": 1.0, "cap": 200},
        users={"sampled_with_history": 1000, "touched_by_closed_loop_sweep": 900, "touched_by_open_loop": 1000, "touched_by_any_recommend_load": 1000, "naive_sweep": 38},
        event_loop_lag={"exported": False, "why": "not in /metrics"}, previous=previous_max(previous), package_versions={"python": "3.11"},
    )
    arguments.update(overrides)
    return build_results(**arguments)


def test_previous_max_reads_the_old_results_and_tolerates_absence(tmp_path):
    assert previous_max(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{}")
    assert previous_max(tmp_path / "bad.json") is None
    (tmp_path / "ok.json").write_text('{"machine": {"date": "d"}, "recommend": {"ours_max": {"throughput_rps": 1219.6}}}')
    assert previous_max(tmp_path / "ok.json")["max_rps"] == 1219.6


def test_build_results_evaluates_every_issue_target(tmp_path):
    results = _results(tmp_path)
    assert best_level(results["recommend"]["ours"])["concurrency"] == 8
    assert results["throughput_ratio_vs_naive"] == pytest.approx(80.0)  # 1200 / 15
    assert results["throughput_ratio_vs_previous"] == pytest.approx(2.0)  # 1200 / 600
    assert results["cpu_ms_per_request_at_saturation"]["ours"] == 1.6  # at the max-throughput level
    assert results["server_time"]["value_ms"] == pytest.approx(2.0)  # 2.4 - 0.4
    targets = {t["name"]: t for t in results["targets"]}
    assert set(targets) >= {"user_read_p50_sqlite", "user_read_p50_redis", "max_recommend_rps", "throughput_ratio_vs_naive",
                            "throughput_ratio_vs_previous", "cpu_ms_per_request", "open_loop_p99_over_p50", "open_loop_p99_ms",
                            "event_loop_lag_max_ms", "score_users_per_s"}
    assert targets["user_read_p50_sqlite"]["met"] is True
    assert targets["user_read_p50_redis"]["met"] is False and targets["user_read_p50_redis"]["value"] is None
    assert targets["max_recommend_rps"]["met"] is True and targets["throughput_ratio_vs_naive"]["met"] is True
    assert targets["throughput_ratio_vs_previous"]["met"] is None and targets["cpu_ms_per_request"]["met"] is None
    assert targets["open_loop_p99_over_p50"]["met"] is True  # 7.5 / 3.0 = 2.5
    assert targets["open_loop_p99_ms"]["met"] is True
    assert targets["event_loop_lag_max_ms"]["met"] is False and targets["event_loop_lag_max_ms"]["exported"] is False
    assert targets["score_users_per_s"]["value"] == 25000.0 and targets["score_users_per_s"]["met"] is True


def test_tail_targets_short_and_generator_limited(tmp_path):
    slow = {**HALF, "p50": 4.0, "p99": 20.0, "lateness_p99_ms": 9.0, "generator_limited": True}
    targets = {t["name"]: t for t in _results(tmp_path, half_load=slow)["targets"]}
    assert targets["open_loop_p99_over_p50"]["met"] is False and targets["open_loop_p99_ms"]["met"] is False
    assert "generator-limited" in targets_table({"targets": list(targets.values())})


def test_an_overloaded_tail_is_not_judged_met(tmp_path):
    # Low latencies, but the server took only half of the offered rate: the tail describes an overload.
    overloaded = {**HALF, "achieved_rps": 300.0, "rate_kept": False}
    targets = {t["name"]: t for t in _results(tmp_path, half_load=overloaded)["targets"]}
    assert targets["open_loop_p99_over_p50"]["met"] is False and targets["open_loop_p99_ms"]["met"] is False
    assert "not achieved" in targets_table({"targets": list(targets.values())})


def test_report_renders_with_absent_lag_and_unmeasured_redis(tmp_path):
    results = _results(tmp_path)
    text = readme(results)
    assert "not exported" in text and "not measured" in text and "| reported |" in text
    assert "previous max 600.0 req/s" in text
    lag = {"exported": True, "max_ms": 7.2, "max_ms_before_load": 7.2, "limit_ms": 5.0, "samples_during_load": 900,
           "samples_over_limit_during_load": 0, "max_bucket_bound_ms_during_load": 5.0, "stalls_over_limit": False,
           "verdict_from": "histogram", "max_ms_per_worker": {"0": 7.2, "1": 1.0}}
    results = _results(tmp_path, event_loop_lag=lag, previous=None)
    assert {t["name"]: t for t in results["targets"]}["event_loop_lag_max_ms"]["met"] is True
    text = readme(results)
    assert "0 of 900 lag samples over 5 ms during the load (all <= 5 ms)" in text and "no previous results.json" in text


def test_run_slots_skips_hand_overs_a_late_process_missed(tmp_path, monkeypatch):
    import bench.h2load as h2

    fake = tmp_path / "h2load"  # takes 0.3 s whatever its duration: overruns two 0.1 s hand-overs
    fake.write_text("""#!/bin/sh
sleep 0.3
echo "finished in 1.00s, 0 req/s, 0B/s"
echo "requests: 0 total, 0 started, 0 done, 0 succeeded, 0 failed, 0 errored, 0 timeout"
echo "status codes: 0 2xx, 0 3xx, 0 4xx, 0 5xx"
echo "traffic: 0B (0) total, 0B (0) headers (space savings 0%), 0B (0) data"
""")
    fake.chmod(0o755)
    monkeypatch.setattr(h2, "command", lambda job: [str(fake)])
    given = []

    def next_job(slot, k, seconds):
        given.append(k)
        return Job("u", Path("b"), 1, 1, seconds, tmp_path / f"{k}.log", 0), k

    run_slots(next_job, [[0.0, 0.1, 0.2, 0.3, 0.4, 5.0]], poll_seconds=0.001, min_job_seconds=0.05)
    assert given[0] == 0 and given[1] >= 3  # segments 1 and 2 were over by the time segment 0 ended
    assert given[-1] == 4  # the last segment (to 5 s) ran: the slot did not stop early


def test_wait_for_an_exit_wakes_when_a_process_ends_not_on_a_poll(tmp_path):
    # poll_seconds 10: returning well before it proves the wait blocked on the processes, not on a sleep.
    import subprocess
    import time

    from bench.h2load import _wait_for_an_exit

    quick, slow = subprocess.Popen(["sleep", "0.3"]), subprocess.Popen(["sleep", "30"])
    try:
        t0 = time.monotonic()
        _wait_for_an_exit([quick, slow], poll_seconds=10.0, longest=20.0)
        assert 0.25 <= time.monotonic() - t0 < 5.0 and quick.poll() == 0
        t0 = time.monotonic()
        _wait_for_an_exit([slow], poll_seconds=10.0, longest=0.2)  # nothing ends: back after `longest`
        assert time.monotonic() - t0 < 5.0 and slow.poll() is None
    finally:
        slow.kill()
        slow.wait()


def test_scheduling_of_reads_how_the_process_runs():
    import os
    import subprocess

    from bench.h2load import scheduling_of

    batch = subprocess.Popen(["sleep", "5"], preexec_fn=lambda: os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0)))
    try:
        assert scheduling_of(batch.pid).startswith(f"SCHED_BATCH nice {os.getpriority(os.PRIO_PROCESS, 0)}")
        assert scheduling_of(os.getpid()).startswith(("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE"))
    finally:
        batch.kill()
        batch.wait()
