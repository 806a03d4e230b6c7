"""`python -m bench.scale`: the whole offline pipeline on a large generated log, timed per stage with peak memory.

Each stage runs as its own `propensity` process (exactly what an operator runs), so its peak
resident memory is its own (os.wait4). Writes docs/benchmarks/scale.{md,json,png}.

    python -m bench.scale --users 475000 --items 40000      # ~20 million events (the issue's goal)
    python -m bench.scale --users 20000 --items 4000        # a quick look
    python -m bench.scale --engine spark --users 24000 --items 4000 --out var/scale-spark/report
        # features on Spark local[2], Feast through the spark profile (docs/scale.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from propensity.settings import PROJECT_ROOT
from propensity.feature_store import copy_definitions

STAGES = ("demo-data", "prepare", "build-features", "publish", "train")
OUT = PROJECT_ROOT / "docs" / "benchmarks"
KEEP_MARKER = "<!-- kept by bench.scale: everything below is written by hand -->"


@dataclass(frozen=True)
class StageResult:
    stage: str
    seconds: float
    peak_rss_gb: float
    log_tail: str


def run_stage(stage: str, args: list[str], env: dict[str, str], log: Path) -> StageResult:
    """One `propensity` subcommand with its output teed to log; raises with the log's tail if it fails."""
    started = time.perf_counter()
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "propensity_cli", stage, *args], env=env, stdout=sink,
                                   stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    tail = "\n".join(log.read_text().splitlines()[-12:])
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{stage} failed (see {log}):\n{tail}")
    return StageResult(stage, seconds, usage.ru_maxrss / 1024**2, tail)  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=475_000)
    parser.add_argument("--items", type=int, default=40_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--root", type=Path, default=PROJECT_ROOT / "var" / "scale", help="work directory (data, repo, models)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--resume", action="store_true", help="keep the stages already measured under --root, run the rest")
    parser.add_argument("--engine", choices=("duckdb", "spark"), default="duckdb",
                        help="spark: the feature build on Spark and publish/train through the spark store profile")
    parser.add_argument("--spark-master", default="local[2]", help="Spark master of --engine spark")
    args = parser.parse_args(argv)

    root = args.root.resolve()
    repo = copy_definitions(root / "feature_repo")
    env = {**os.environ, "PROPENSITY_DATA_DIR": str(root / "raw"), "PROPENSITY_WORK_DIR": str(root / "var"),
           "PROPENSITY_FEATURE_REPO": str(repo), "FEAST_USAGE": "False"}
    if args.engine == "spark":
        shutil.copytree(PROJECT_ROOT / "feature_repo" / "profiles", repo / "profiles", dirs_exist_ok=True)
        env.update({
            "PROPENSITY_FEATURES__ENGINE": "spark", "PROPENSITY_FEATURES__SPARK_MASTER": args.spark_master,
            # The driver is the executor in local mode: give it the memory DuckDB would get.
            "PROPENSITY_FEATURES__SPARK_CONF": json.dumps({"spark.sql.shuffle.partitions": "8", "spark.driver.memory": "6g", "spark.ui.enabled": "false"}),
            "PROPENSITY_FEATURE_STORE_YAML": str(repo / "profiles" / "spark.yaml"),
            "PROPENSITY_SPARK_MASTER": args.spark_master, "PROPENSITY_SPARK_SHUFFLE_PARTITIONS": "8",
            "PROPENSITY_SPARK_DRIVER_MEMORY": "6g",  # Feast's retrieval collects the training rows into the driver
        })
    demo = ["--users", str(args.users), "--items", str(args.items), "--days", str(args.days)]
    measured = root / "stages.json"
    done = {r["stage"]: StageResult(**r) for r in json.loads(measured.read_text())} if args.resume and measured.exists() else {}
    results: list[StageResult] = []
    for stage in STAGES:
        if stage in done:
            print(f"[scale] {stage}: kept from the earlier run ({done[stage].seconds:.0f}s)", flush=True)
            results.append(done[stage])
            continue
        print(f"[scale] {stage} ...", flush=True)
        result = run_stage(stage, demo if stage == "demo-data" else [], env, root / f"{stage}.log")
        print(f"[scale] {stage}: {result.seconds:.0f}s, peak RSS {result.peak_rss_gb:.2f} GB\n{result.log_tail}", flush=True)
        results.append(result)
        measured.write_text(json.dumps([asdict(r) for r in results], indent=2))
    manifest = json.loads((root / "var" / "prepared" / "manifest.json").read_text())
    write_report(args.out, results, manifest, args)
    return 0


def write_report(out: Path, results: list[StageResult], manifest: dict, args: argparse.Namespace) -> None:
    """scale.json (numbers), scale.md (table) and scale.png (time and memory per stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    training = [r for r in results if r.stage != "demo-data"]
    total = sum(r.seconds for r in training)
    data = {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "engine": args.engine,
        "log": {"events": manifest["n_events"], "users": manifest["n_users"], "items": manifest["n_items"],
                "generated_users": args.users, "days": args.days},
        "stages": [{k: v for k, v in asdict(r).items() if k != "log_tail"} for r in results],
        "pipeline_seconds": total,
        "pipeline_peak_rss_gb": max(r.peak_rss_gb for r in training),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(data, indent=2) + "\n")

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [r.stage for r in training]
    left.barh(names, [r.seconds / 60 for r in training], color="#4c72b0")
    left.set_xlabel("minutes")
    left.set_title(f"time per stage (total {total / 60:.1f} min)")
    right.barh(names, [r.peak_rss_gb for r in training], color="#dd8452")
    right.set_xlabel("peak resident memory, GB")
    right.set_title("peak memory per stage")
    for axis in (left, right):
        axis.invert_yaxis()
    fig.suptitle(f"{args.engine}: {manifest['n_events']:,} events, {manifest['n_users']:,} users, {manifest['n_items']:,} items")
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=110)
    plt.close(fig)

    rows = "\n".join(f"| {r.stage} | {r.seconds / 60:.1f} | {r.peak_rss_gb:.2f} |" for r in results)
    # Hand-written sections (the small two-engine run, the projection) survive a new measurement.
    previous = (out / "scale.md").read_text() if (out / "scale.md").exists() else ""
    kept = previous[previous.index(KEEP_MARKER):] if KEEP_MARKER in previous else ""
    (out / "scale.md").write_text(
        f"# Offline pipeline at scale ({args.engine})\n\n"
        f"{manifest['n_events']:,} generated events ({manifest['n_users']:,} active users, {manifest['n_items']:,} items, "
        f"{args.days} days) on {os.cpu_count()} cores, measured {data['measured_at']}. Each stage is its own "
        f"`propensity` process; peak memory is that process's peak resident set (`os.wait4`).\n\n"
        f"| stage | minutes | peak RSS, GB |\n|---|---|---|\n{rows}\n\n"
        f"**prepare -> train: {total / 60:.1f} min, peak {data['pipeline_peak_rss_gb']:.2f} GB.**\n\n"
        f"![time and memory per stage](scale.png)\n\n"
        f"Reproduce: `make bench-scale ENGINE={args.engine}` (or `.venv/bin/python -m bench.scale --engine {args.engine} --users {args.users} --items {manifest['n_items']}`).\n"
        + (f"\n{kept}" if kept else "")
    )


if __name__ == "__main__":
    raise SystemExit(main())
