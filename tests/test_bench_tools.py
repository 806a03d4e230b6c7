"""The pure parts of bench/: gRPC frames for h2load, h2load output parsing, percentiles, results and targets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.frames import decode_frame, encode_frame, write_frame
from bench.h2load import Job, Summary, command, grpc_failures, latencies_ms, parse_summary, percentiles, read_log
from bench.results import best_level, build_results, evaluate_targets
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
    assert summary == Summary(seconds=3.01, done=668, succeeded=668, failed=0, errored=0, status_2xx=669, data_bytes=219772)
    assert grpc_failures(summary, 329) == 0  # 219772 / 329 = 668 messages
    half_failed = Summary(3.0, 100, 100, 0, 0, 100, 50 * 329)  # errors carry trailers only
    assert grpc_failures(half_failed, 329) == 50
    with pytest.raises(ValueError, match="requests"):
        parse_summary("finished in 1.00s\n")


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


def _level(c, rps, p50, p99):
    return {"concurrency": c, "requests": int(rps * 8), "failures": 0, "throughput_rps": rps, "p50": p50, "p95": p99 * 0.8, "p99": p99}


def test_targets_met_and_short():
    met = evaluate_targets(ratio=12.0, half_load_p50=2.0, half_load_p99=5.0, server_time_ms=2.0, floor_ms=1.2)
    assert all(t["met"] for t in met.values())
    short = evaluate_targets(ratio=9.9, half_load_p50=2.0, half_load_p99=6.0, server_time_ms=2.4, floor_ms=1.2)
    assert not any(t["met"] for t in short.values())  # 6/2 is not < 3; 2.4 > 1.5*1.2+0.5 = 2.3
    assert short["server_time_vs_compute_floor"]["limit_ms"] == pytest.approx(2.3)
    assert not evaluate_targets(float("nan"), float("nan"), float("nan"), float("nan"), 1.0)["throughput_ratio_vs_naive"]["met"]


def test_build_results_schema():
    ours = [_level(1, 400.0, 2.4, 5.0), _level(8, 1200.0, 6.0, 14.0), _level(32, 1100.0, 25.0, 60.0)]
    naive = [_level(1, 30.0, 30.0, 120.0), _level(8, 40.0, 190.0, 400.0)]
    results = build_results(
        machine={"cpus": 2}, settings={"server_workers": 2}, ours=ours, naive=naive,
        health_c1={"p50": 0.4}, half_load={"p50": 3.0, "p99": 7.5, "achieved_rps": 600.0},
        floor={"with_feast_user_read_p50_ms": 1.5, "scoring_p50_ms": 1.0}, score_users=[{"users_per_second": 9000.0}],
        candidates={"mean": 200.0}, package_versions={"python": "3.11"},
    )
    assert best_level(ours)["concurrency"] == 8
    assert results["throughput_ratio_vs_naive"] == pytest.approx(30.0)
    assert results["recommend"]["ours_max"]["throughput_rps"] == 1200.0
    assert results["server_time"]["value_ms"] == pytest.approx(2.0)  # 2.4 - 0.4
    assert set(results["targets"]) == {"throughput_ratio_vs_naive", "p99_over_p50_at_half_max", "server_time_vs_compute_floor"}
    assert results["targets"]["throughput_ratio_vs_naive"]["met"] is True
    assert results["targets"]["p99_over_p50_at_half_max"]["met"] is True  # 7.5 / 3.0 = 2.5
    assert results["targets"]["server_time_vs_compute_floor"]["met"] is True  # 2.0 <= 2.75
    for key in ("machine", "versions", "settings", "candidates", "compute_floor", "score_users", "health_check_c1", "half_load"):
        assert key in results
