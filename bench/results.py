"""results.json: one schema, built from measured phases, with the three issue targets evaluated."""

from __future__ import annotations

import math
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata

SCHEMA_VERSION = 1
RATIO_TARGET = 10.0  # our max throughput / naive max throughput
TAIL_TARGET = 3.0  # p99 / p50 at half of max throughput
FLOOR_FACTOR, FLOOR_SLACK_MS = 1.5, 0.5  # server time <= 1.5 x compute floor + 0.5 ms


def best_level(levels: Sequence[Mapping[str, float]]) -> Mapping[str, float]:
    """The concurrency level with the highest throughput."""
    if not levels:
        raise ValueError("no load levels measured")
    return max(levels, key=lambda level: level["throughput_rps"])


def _finite(value: float) -> bool:
    return value is not None and not math.isnan(value)


def evaluate_targets(ratio: float, half_load_p50: float, half_load_p99: float, server_time_ms: float, floor_ms: float) -> dict[str, dict]:
    """The issue's targets, each with its value, the target and met true/false."""
    tail = half_load_p99 / half_load_p50 if _finite(half_load_p50) and half_load_p50 > 0 else float("nan")
    floor_limit = FLOOR_FACTOR * floor_ms + FLOOR_SLACK_MS
    return {
        "throughput_ratio_vs_naive": {
            "value": round(ratio, 2), "target": f">= {RATIO_TARGET:g}", "met": bool(_finite(ratio) and ratio >= RATIO_TARGET),
        },
        "p99_over_p50_at_half_max": {
            "value": round(tail, 2), "p50_ms": round(half_load_p50, 3), "p99_ms": round(half_load_p99, 3),
            "target": f"< {TAIL_TARGET:g}", "met": bool(_finite(tail) and tail < TAIL_TARGET),
        },
        "server_time_vs_compute_floor": {
            "value_ms": round(server_time_ms, 3), "floor_ms": round(floor_ms, 3), "limit_ms": round(floor_limit, 3),
            "target": f"<= {FLOOR_FACTOR:g} x floor + {FLOOR_SLACK_MS:g} ms",
            "met": bool(_finite(server_time_ms) and server_time_ms <= floor_limit),
        },
    }


def versions(packages: Sequence[str] = ("grpcio", "lightgbm", "feast", "numpy", "pandas", "protobuf", "lleaves")) -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def build_results(
    *,
    machine: Mapping[str, object],
    settings: Mapping[str, object],
    ours: Sequence[Mapping[str, float]],
    naive: Sequence[Mapping[str, float]],
    health_c1: Mapping[str, float],
    half_load: Mapping[str, float],
    floor: Mapping[str, float],
    score_users: Sequence[Mapping[str, float]],
    candidates: Mapping[str, float],
    package_versions: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
) -> dict:
    """The whole results document; targets are derived here so README and JSON never disagree."""
    ours_best, naive_best = best_level(ours), best_level(naive)
    ratio = ours_best["throughput_rps"] / naive_best["throughput_rps"] if naive_best["throughput_rps"] > 0 else float("nan")
    ours_c1 = min(ours, key=lambda level: level["concurrency"])
    server_time = ours_c1["p50"] - health_c1["p50"]
    floor_ms = floor["with_feast_user_read_p50_ms"]
    return {
        "schema_version": SCHEMA_VERSION,
        "machine": dict(machine),
        "versions": dict(package_versions or versions()),
        "settings": dict(settings),
        "candidates": dict(candidates),
        "recommend": {"ours": list(ours), "naive": list(naive), "ours_max": dict(ours_best), "naive_max": dict(naive_best)},
        "health_check_c1": dict(health_c1),
        "half_load": dict(half_load),
        "compute_floor": dict(floor),
        "server_time": {
            "value_ms": round(server_time, 3),
            "how": "p50 of Recommend at concurrency 1 minus p50 of grpc.health.v1.Health/Check at concurrency 1, both from h2load --log-file against the same server",
        },
        "score_users": list(score_users),
        "throughput_ratio_vs_naive": round(ratio, 2),
        "targets": evaluate_targets(ratio, half_load.get("p50", float("nan")), half_load.get("p99", float("nan")), server_time, floor_ms),
        "notes": list(notes),
    }
