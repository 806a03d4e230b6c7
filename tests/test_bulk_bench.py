"""bench/bulk.py's report: every figure it renders comes from the results, and the targets are judged, not assumed."""

from pathlib import Path

from bench.bulk import Shop, render

ONLINE = {
    "measured_at": "2026-12-01T10:00:00+00:00", "command": "python -m bench.bulk online --root var/bench", "seconds_per_level": 8.0,
    "shops": [{
        "root": "var/bench", "events": 215_232, "users": 4_302, "items": 1_500, "rotated_users": 4_000, "best_users_per_second": 21_500.0,
        "in_process": {"chunk_users": 1000, "chunks_timed": 40, "distinct_users": 4000, "read_api": "fetch_columns", "predictor": "compiled",
                       "read_ms_p50": 40.1, "assemble_ms_p50": 6.2, "predict_ms_p50": 0.3, "total_ms_p50": 46.6,
                       "users_per_second_in_process": 21_459, "per_user_loop_assemble_predict_ms_p50": 180.0},
        "server": [{"workers": 2, "concurrency": 1, "users_per_second": 12_000.0, "calls": 96, "call_p50_ms": 80.0, "failures": 0},
                   {"workers": 2, "concurrency": 2, "users_per_second": 21_500.0, "calls": 172, "call_p50_ms": 90.0, "failures": 0}],
    }],
}
OFFLINE = {
    "measured_at": "2026-12-01T10:00:00+00:00", "command": "python -m bench.bulk offline --root var/scale", "root": "var/scale",
    "events": 19_918_866, "users": 409_626, "items": 40_000, "as_of": "2026-12-01T00:00:00+00:00", "best_users_per_second": 90_000,
    "runs": [{"command": "propensity score-batch --users-only --out OUT.parquet", "chunk_size": 100_000, "users": 409_626, "wall_seconds": 4.5,
              "command_seconds": 3.1, "users_per_second": 90_000, "users_per_second_after_startup": 132_000, "peak_rss_gb": 1.2,
              "row_groups": 5, "output_mb": 5.0, "progress_lines": ["  scored 100,000/409,626 users (95,000 users/s)", "..."]}],
}


def test_the_offline_verdict_is_given_per_registry_path() -> None:
    recalled = {**OFFLINE["runs"][0], "registry": "recalled", "wall_seconds": 3.9, "users_per_second": 105_000}
    offline = {**OFFLINE, "runs": [{**OFFLINE["runs"][0], "registry": "read through Feast"}, recalled], "best_users_per_second": 105_000}
    text = render({"machine": {"cpus": 2, "platform": "linux", "python": "3.11"}, "online": ONLINE, "offline": offline})
    assert ("whole wall time: **met** (105,000 >= 100,000) (best read through Feast: **short** (90,000 < 100,000); "
            "recalled: **met** (105,000 >= 100,000))") in text
    assert "| `propensity score-batch --users-only --out OUT.parquet` | this code | recalled | 409,626 | 3.9 | 105,000 |" in text
    assert "Baseline" not in text
    base = {**OFFLINE["runs"][0], "code": "commit dffb3fd", "wall_seconds": 7.8, "users_per_second": 52_500}
    offline = {**offline, "runs": [*offline["runs"], base], "baseline_label": "commit dffb3fd"}
    text = render({"machine": {"cpus": 2, "platform": "linux", "python": "3.11"}, "online": ONLINE, "offline": offline})
    assert "commit dffb3fd, median wall 7.80 s against this code's 4.20 s (x1.86 the throughput)" in text
    assert "(best read through Feast: **short** (90,000 < 100,000); recalled: **met** (105,000 >= 100,000))" in text


def test_report_judges_each_target_from_the_figures() -> None:
    text = render({"machine": {"cpus": 2, "platform": "linux", "python": "3.11"}, "online": ONLINE, "offline": OFFLINE})
    assert "**met** (21,500 >= 20,000)" in text
    assert "**short** (90,000 < 100,000)" in text
    assert "| 2 | 2 | 21,500 | 172 | 90.0 | 0 |" in text
    assert "| bulk online read (Feast's online store, TTLs applied; `fetch_columns`) | 40.1 |" in text
    assert "| `propensity score-batch --users-only --out OUT.parquet` | this code | read through Feast | 409,626 | 4.5 | 90,000 | 132,000 | 1.2 | 5 |" in text
    assert "the start-up before it, wall minus that clock, was 1.4-1.4 s here" in text
    assert "scored 100,000/409,626 users" in text
    assert "python -m bench.bulk online --root var/bench" in text and "python -m bench.bulk offline --root var/scale" in text


def test_startup_section_projects_the_scale_rate_from_its_own_parts() -> None:
    startup = {"measured_at": "2026-12-01T18:00:00+00:00", "command": "python -m bench.bulk startup --root var/bench --baseline DIR",
               "root": "var/bench", "users": 4_302, "events": 215_232,
               "variants": {"this commit": {"runs": 3, "wall_seconds_p50": 3.1, "startup_seconds_p50": 2.0, "command_seconds_p50": 1.1},
                            "baseline": {"runs": 3, "wall_seconds_p50": 4.4, "startup_seconds_p50": 3.3, "command_seconds_p50": 1.1}},
               "scale": {"users": 409_626, "wall_seconds": 4.92, "command_seconds": 1.6, "startup_ratio": 0.606, "projected_wall_seconds": 3.61,
                         "projected_users_per_second": 113_470}}
    text = render({"machine": {}, "startup": startup})
    assert "| this commit | 3 | 3.1 | 2.0 | 1.1 |" in text and "| baseline | 3 | 4.4 | 3.3 | 1.1 |" in text
    assert "would be 3.61 s: **met** (113,470 >= 100,000) as a projection, not a measurement" in text


def test_a_section_that_was_not_run_is_not_rendered() -> None:
    text = render({"machine": {}, "online": ONLINE})
    assert "ScoreUsers" in text and "score-batch --users-only on the bench-scale shop" not in text


def test_both_shop_layouts_are_understood(tmp_path: Path) -> None:
    bench, scale = tmp_path / "bench", tmp_path / "scale"
    for path in (bench / "work", bench / "data", scale / "var", scale / "raw"):
        path.mkdir(parents=True)
    assert (Shop(bench).work_dir, Shop(bench).data_dir) == (bench / "work", bench / "data")
    assert (Shop(scale).work_dir, Shop(scale).data_dir) == (scale / "var", scale / "raw")
    env = Shop(scale).env()
    assert env["PROPENSITY_WORK_DIR"] == str(scale / "var") and env["PROPENSITY_FEATURE_REPO"] == str(scale / "feature_repo")
