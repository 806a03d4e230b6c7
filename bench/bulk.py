"""`python -m bench.bulk`: bulk scoring measured, online (ScoreUsers x1000) and offline (score-batch --users-only).

    python -m bench.bulk online  --root var/bench [--root var/scale]   # in-process breakdown + a real `propensity serve`
    python -m bench.bulk offline --root var/scale                      # the operator's command on the 20M-event shop

A root is a shop built by `make bench` (var/bench) or `make bench-scale` (var/scale): raw data, work dir
(prepared data, models) and Feast repository (offline tables, registry, online store). Every figure comes
from this run; results go to docs/benchmarks/bulk_scoring.json and .md (a section not run keeps its last figures).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from propensity.settings import PROJECT_ROOT

OUT = PROJECT_ROOT / "docs" / "benchmarks"
CLI = str(Path(sys.executable).with_name("propensity"))
CHUNK = 1000
TARGET_ONLINE, TARGET_OFFLINE = 20_000, 100_000


@dataclass(frozen=True)
class Shop:
    """A shop directory laid out like var/bench and var/scale."""

    root: Path

    @property
    def work_dir(self) -> Path:
        return self.root / ("work" if (self.root / "work").exists() else "var")

    @property
    def feature_repo(self) -> Path:
        return self.root / "feature_repo"

    @property
    def data_dir(self) -> Path:
        return self.root / ("data" if (self.root / "data").exists() else "raw")

    def env(self) -> dict[str, str]:
        return {**os.environ, "PROPENSITY_DATA_DIR": str(self.data_dir), "PROPENSITY_WORK_DIR": str(self.work_dir),
                "PROPENSITY_FEATURE_REPO": str(self.feature_repo), "FEAST_USAGE": "False"}

    def manifest(self) -> dict:
        return json.loads((self.work_dir / "prepared" / "manifest.json").read_text())


def say(message: str) -> None:
    print(f"[bulk] {message}", flush=True)


# -- online: ScoreUsers ---------------------------------------------------------------------------


def active_user_ids(shop: Shop, n: int, seed: int = 0) -> list[str]:
    """n users with an event in the 90 days before the as-of time, in a seeded random order."""
    from training.batch_scoring import active_users

    manifest = shop.manifest()
    users = active_users(shop.work_dir / "prepared", datetime.fromisoformat(manifest["as_of"]))
    rng = np.random.default_rng(seed)
    return [users[i] for i in rng.permutation(len(users))[:n]]


def in_process(shop: Shop, users: list[str], seconds: float = 6.0) -> dict:
    """Per chunk of CHUNK users, what ScoreUsers does: the bulk online read, conversion + assembly, predict; and the per-user loop it replaced."""
    from propensity.assembly import user_matrix, user_vector
    from propensity.feature_store import open_store
    from propensity.model_registry import load_version
    from propensity.user_state import USER_MODEL_INPUTS, UserBatch, UserState
    from propensity.settings import CandidateSettings, ServerSettings
    from server.item_cache import StaticCatalog
    from server.model_pool import ModelPool
    from server.online_features import OnlineUserFeatures, item_ids_in_offline_store, load_catalog
    from server.recommender import Recommender

    store = open_store(shop.feature_repo)
    bundle = load_version(shop.work_dir / "models", num_threads=1)  # the server's policy: one thread per worker
    compiled = bundle.compile() if bundle.has_compiled_cache() else False
    features = OnlineUserFeatures(store, bundle.user_feature_service)
    catalog = load_catalog(store, bundle.item_feature_service, item_ids_in_offline_store(store))
    def read(ids: list[str]) -> object:
        """The bulk read, with the columns the user model uses decoded (fetch_arrays decodes a column on first use)."""
        columns = features.fetch_arrays(ids)
        for name in USER_MODEL_INPUTS:
            columns.get(name)
        return columns
    # What ScoreUsers needs: the user model's inputs only (OnlineUserFeatures reads a subset when asked to).
    subset = OnlineUserFeatures(store, bundle.user_feature_service, only=USER_MODEL_INPUTS)
    chunks = [users[i : i + CHUNK] for i in range(0, len(users) - CHUNK + 1, CHUNK)]
    per_read = inspect.signature(Recommender.score_users).parameters["chunk"].default  # users per online read in ScoreUsers
    recommender = Recommender(ModelPool(shop.work_dir / "models", lambda _: None, scoring_backend="auto"), features, StaticCatalog(catalog),
                              CandidateSettings(), ServerSettings())
    stages: dict[str, list[float]] = {"read": [], "assemble": [], "predict": [], "total": [], "read_subset": [], "read_rows": [], "data_plane": []}
    now = time.time()
    started, k = time.perf_counter(), 0
    while time.perf_counter() - started < seconds or k < 2 * len(chunks):
        ids = chunks[k % len(chunks)]
        k += 1
        t0 = time.perf_counter()
        asyncio.run(recommender.score_users(ids))  # first: the stage timings below read the same ids again
        data_plane = (time.perf_counter() - t0) * 1000
        took = dict.fromkeys(stages, 0.0)
        for part in (ids[i : i + per_read] for i in range(0, len(ids), per_read)):  # as ScoreUsers chunks a call
            t0 = time.perf_counter()
            batch = UserBatch(part, read(part), catalog)
            t1 = time.perf_counter()
            rows = user_matrix(batch, now)
            t2 = time.perf_counter()
            np.where(batch.known, bundle.predict_users(rows), bundle.base_rate)
            t3 = time.perf_counter()
            subset_columns = subset.fetch_arrays(part)
            for name in USER_MODEL_INPUTS:
                subset_columns.get(name)
            t4 = time.perf_counter()
            features.fetch_columns(part)  # the per-row read the bulk read replaced
            t5 = time.perf_counter()
            for name, value in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t3 - t0, t4 - t3, t5 - t4)):
                took[name] += value * 1000
        took["data_plane"] = data_plane
        for name, value in took.items():
            stages[name].append(value)
    # The per-user loop ScoreUsers ran before (a UserState and a user_vector per user, one predict per chunk).
    loop_ms = []
    for ids in chunks[:3]:
        rows_ = features.fetch(ids)
        t0 = time.perf_counter()
        bundle.predict_users(np.vstack([user_vector(UserState.from_row(u, r, catalog), now) for u, r in zip(ids, rows_)]))
        loop_ms.append((time.perf_counter() - t0) * 1000)
    median = {name: float(np.median(values)) for name, values in stages.items()}
    return {
        "chunk_users": CHUNK, "users_per_read": per_read, "chunks_timed": k, "distinct_users": len(chunks) * CHUNK, "read_api": "fetch_arrays",
        "data_plane_read_api": _data_plane_read_api(),
        "predictor": "compiled (lleaves, 1 thread)" if compiled else "LightGBM, num_threads=1",
        **{f"{name}_ms_p50": round(value, 2) for name, value in median.items()},
        "users_per_second_in_process": round(CHUNK / median["total"] * 1000),
        "per_user_loop_assemble_predict_ms_p50": round(float(np.median(loop_ms)), 2),
    }


def _data_plane_read_api() -> str:
    """Which read Recommender.score_users calls (the bulk one once server/recommender.py uses fetch_arrays)."""
    from server.recommender import Recommender

    source = inspect.getsource(Recommender.score_users)
    return "fetch_arrays" if "fetch_arrays" in source else "fetch_columns"


def through_server(shop: Shop, users: list[str], workers: int, seconds: float, concurrency: tuple[int, ...], code_from: Path | None = None) -> list[dict]:
    """ScoreUsers with CHUNK ids per call against a real `propensity serve` on this shop (code_from: the server's code from there)."""
    from bench.grpc_load import score_users
    from bench.processes import ServerProcess, free_port

    port = free_port()
    env = {**shop.env(), "PROPENSITY_SERVER__WORKERS": str(workers), "PROPENSITY_SERVER__HOST": "127.0.0.1",
           "PROPENSITY_SERVER__LOG_FORMAT": "json", **({"PYTHONPATH": str(code_from)} if code_from else {})}
    log = Path(tempfile.mkdtemp(prefix="bulk-serve-")) / "server.log"
    results = []
    with ServerProcess("propensity serve", [CLI, "serve", "--port", str(port)], env, port, log, PROJECT_ROOT) as server:
        say(f"  propensity serve (workers={workers}) SERVING after {server.wait_serving():.1f}s; log {log}")
        score_users(server.target, users, batch=CHUNK, concurrency=max(concurrency), seconds=2.0)  # warm every worker
        for c in concurrency:
            result = score_users(server.target, users, batch=CHUNK, concurrency=c, seconds=seconds)
            say(f"  ScoreUsers x{CHUNK}, {c} concurrent call(s): {result['users_per_second']:,.0f} users/s "
                f"({result['calls']} calls, p50 {result['call_p50_ms']} ms per call, {result['failures']} failures)")
            results.append({"workers": workers, **result})
    return results


def online(roots: list[Path], seconds: float, workers: int, baseline: Path | None = None) -> dict:
    shops = []
    for root in roots:
        shop = Shop(root.resolve())
        manifest = shop.manifest()
        users = active_user_ids(shop, 20 * CHUNK)
        say(f"online, {root}: {manifest['n_events']:,} events, {manifest['n_users']:,} users; rotating over {len(users):,} active users")
        breakdown = in_process(shop, users)
        say(f"  in process per {CHUNK}: read {breakdown['read_ms_p50']} ms, assemble {breakdown['assemble_ms_p50']} ms, "
            f"predict {breakdown['predict_ms_p50']} ms -> {breakdown['users_per_second_in_process']:,} users/s "
            f"(the per-user loop it replaced: {breakdown['per_user_loop_assemble_predict_ms_p50']} ms for assemble + predict)")
        calls = through_server(shop, users, workers, seconds, (1, 2, 4))
        before = through_server(shop, users, workers, seconds, (1, 2, 4), baseline) if baseline else []
        shops.append({"server_baseline": before, "root": _relative(root), "events": manifest["n_events"], "users": manifest["n_users"], "items": manifest["n_items"],
                      "rotated_users": len(users), "in_process": breakdown, "server": calls,
                      "best_users_per_second": max(c["users_per_second"] for c in calls)})
    return {"measured_at": _now(), "command": f"python -m bench.bulk online {' '.join('--root ' + _relative(r) for r in roots)}"
            + (" --baseline DIR" if baseline else ""), "baseline": str(baseline) if baseline else None,
            "seconds_per_level": seconds, "shops": shops}


# -- offline: score-batch --users-only ---------------------------------------------------------------


def run_score_batch(shop: Shop, out: Path, chunk_size: int | None, code_from: Path | None = None) -> dict:
    """The operator's command in its own process: wall time, peak resident memory (os.wait4) and its own rate line.

    code_from: run the project's code from that directory instead (e.g. an earlier commit, for a same-run baseline).
    """
    args = [CLI, "score-batch", "--users-only", "--out", str(out)] + (["--chunk-size", str(chunk_size)] if chunk_size else [])
    log = out.with_suffix(".log")
    memo = shop.work_dir / "cache" / "registry"  # training.registry_memo: an earlier run's record of the same registry
    recalled = memo.is_dir() and any(memo.glob("*.json"))
    env = shop.env() if code_from is None else {**shop.env(), "PYTHONPATH": str(code_from)}
    started = time.perf_counter()
    with log.open("w") as sink:
        process = subprocess.Popen(args, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"score-batch failed:\n{text[-3000:]}")
    final = re.search(r"wrote ([\d,]+) users to .* in ([\d.]+)s", text)
    users, inside = int(final.group(1).replace(",", "")), float(final.group(2))
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(out).metadata
    return {
        "command": "propensity score-batch --users-only --out OUT.parquet" + (f" --chunk-size {chunk_size}" if chunk_size else ""),
        "registry": "recalled" if recalled else "read through Feast",
        "chunk_size": chunk_size or 100_000, "users": users, "wall_seconds": round(wall, 2), "command_seconds": round(inside, 2),
        "users_per_second": round(users / wall), "users_per_second_after_startup": round(users / inside),
        "peak_rss_gb": round(usage.ru_maxrss / 1024**2, 2), "row_groups": meta.num_row_groups, "output_mb": round(out.stat().st_size / 1e6, 1),
        "progress_lines": [line for line in text.splitlines() if "scored" in line][:3] + ["..."],
    }


def offline(root: Path, chunk_sizes: list[int | None], repeats: int, baseline: Path | None = None, baseline_label: str | None = None) -> dict:
    """score-batch --users-only runs on the shop; with a baseline, its code's runs alternate with this code's (same session)."""
    shop = Shop(root.resolve())
    manifest = shop.manifest()
    say(f"offline, {root}: {manifest['n_events']:,} events, {manifest['n_users']:,} users, as of {manifest['as_of']}")
    runs = []
    with tempfile.TemporaryDirectory(prefix="bulk-offline-") as tmp:
        for chunk in chunk_sizes:
            # The first run of each chunk size reads the registry through Feast, as the first run after any
            # `feast apply` or `feast materialize` does (both rewrite the registry); the others recall its record.
            shutil.rmtree(shop.work_dir / "cache" / "registry", ignore_errors=True)
            for r in range(repeats):
                for code_from in [None, baseline] if baseline else [None]:
                    result = run_score_batch(shop, Path(tmp) / f"users-{chunk}-{r}.parquet", chunk, code_from)
                    if code_from is not None:  # earlier code neither reads nor writes the registry record
                        result = {**result, "registry": "read through Feast", "code": baseline_label or str(code_from)}
                    say(f"  {result['command']} ({result.get('code', 'this code')}, registry {result['registry']}): {result['users']:,} users in "
                        f"{result['wall_seconds']}s wall -> {result['users_per_second']:,} users/s "
                        f"({result['users_per_second_after_startup']:,} after start-up), peak RSS {result['peak_rss_gb']} GB, {result['row_groups']} row groups")
                    runs.append(result)
    command = f"python -m bench.bulk offline --root {_relative(root)} --repeats {repeats}" + (
        f" --baseline DIR --baseline-label '{baseline_label or baseline}'" if baseline else "")
    return {"measured_at": _now(), "command": command, "root": _relative(root),
            "events": manifest["n_events"], "users": manifest["n_users"], "items": manifest["n_items"], "as_of": manifest["as_of"], "runs": runs,
            "best_users_per_second": max(r["users_per_second"] for r in runs if "code" not in r), "baseline_label": baseline_label if baseline else None}


def startup(root: Path, repeats: int, baseline: Path | None, scale_run: dict | None) -> dict:
    """score-batch --users-only on a small shop, where start-up dominates: start-up (wall - the command's own clock) and per-user cost.

    With a baseline (a directory holding an earlier commit's code), both run alternately in the same session.
    """
    shop = Shop(root.resolve())
    manifest = shop.manifest()
    say(f"start-up, {root}: {manifest['n_users']:,} users; {repeats} runs each" + (f", baseline code from {baseline}" if baseline else ""))
    variants = [("this commit", None)] + ([("baseline", baseline)] if baseline else [])
    runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
    with tempfile.TemporaryDirectory(prefix="bulk-startup-") as tmp:
        for r in range(repeats):
            for name, code in variants:
                result = run_score_batch(shop, Path(tmp) / f"{name.replace(' ', '-')}-{r}.parquet", None, code)
                result["startup_seconds"] = round(result["wall_seconds"] - result["command_seconds"], 2)
                say(f"  {name}: wall {result['wall_seconds']}s, of which start-up {result['startup_seconds']}s, command {result['command_seconds']}s")
                runs[name].append(result)
    summary = {}
    for name, results in runs.items():
        start = float(np.median([r["startup_seconds"] for r in results]))
        summary[name] = {"startup_seconds_p50": round(start, 2), "command_seconds_p50": round(float(np.median([r["command_seconds"] for r in results])), 2),
                         "wall_seconds_p50": round(float(np.median([r["wall_seconds"] for r in results])), 2), "runs": len(results)}
    scale = project_scale(summary, scale_run) if baseline and scale_run else None
    return {"measured_at": _now(), "command": f"python -m bench.bulk startup --root {_relative(root)}" + (" --baseline DIR" if baseline else ""),
            "root": _relative(root), "users": manifest["n_users"], "events": manifest["n_events"], "variants": summary, "scale": scale}


def project_scale(variants: dict, scale_run: dict) -> dict:
    """The scale shop's run (before this change) with its start-up scaled by this session's ratio of start-ups.

    Start-up measured now is inflated by whatever else runs; the ratio of the two variants, taken alternately in one
    session, is steadier than either figure.
    """
    ratio = variants["this commit"]["startup_seconds_p50"] / variants["baseline"]["startup_seconds_p50"]
    projected_wall = (scale_run["wall_seconds"] - scale_run["command_seconds"]) * ratio + scale_run["command_seconds"]
    return {"users": scale_run["users"], "wall_seconds": scale_run["wall_seconds"], "command_seconds": scale_run["command_seconds"],
            "startup_ratio": round(ratio, 3), "projected_wall_seconds": round(projected_wall, 2),
            "projected_users_per_second": round(scale_run["users"] / projected_wall)}


def keep_other_shops(now: dict, before: dict | None) -> dict:
    """The online results of this run, plus the shops an earlier run measured and this one did not (each keeps its date)."""
    measured = {shop["root"] for shop in now["shops"]}
    kept = [{"measured_at": before["measured_at"], "command": before["command"], **shop}
            for shop in (before or {}).get("shops", []) if shop["root"] not in measured]
    return {**now, "shops": now["shops"] + [{k: v for k, v in shop.items()} for shop in kept]}


# -- report ------------------------------------------------------------------------------------------------


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bulk_scoring.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "bulk_scoring.md").write_text(render(results))


def render(results: dict) -> str:
    machine = results.get("machine", {})
    parts = [
        "# Bulk scoring: ScoreUsers and score-batch --users-only\n",
        f"Measured on {machine.get('cpus')} cores ({machine.get('platform')}, Python {machine.get('python')}) by `python -m bench.bulk` "
        "(bench/bulk.py); numbers in bulk_scoring.json. The machine is shared and noisy (about +-15 %, more while other jobs run): "
        "compare figures within one run.\n",
        "How: per chunk of users, one bulk read of the feature columns (server/store_reads.py SqliteRead.read_arrays: per feature "
        "view one SQLite query per 1,000 ids that returns, per feature, the positions, lengths and concatenated bytes of the stored "
        "values, TTL applied in the query; server/value_columns.py decodes each column's Feast ValueProto bytes with NumPy into an "
        "Arrow array, checking every layout; tests/test_bulk_read.py compares it with Feast's get_online_features), "
        "one conversion into arrays with the per-user lists flattened "
        "(propensity/user_state.py UserBatch), one vectorised assembly (propensity/assembly.py user_matrix: np.ufunc.reduceat over "
        "the flat lists) and one predict call. No per-user Python loop. Training, serving and batch scoring build the user model's "
        "input with this code; tests/test_user_batch.py and tests/test_batch_scoring.py hold it to the per-user definitions, "
        "and score-batch --users-only to the get_historical_features path (same users, propensities within 1e-9).\n",
    ]
    if "online" in results:
        parts.append(_render_online(results["online"]))
    if "offline" in results:
        parts.append(_render_offline(results["offline"]))
    if "startup" in results:
        parts.append(_render_startup(results["startup"]))
    return "\n".join(parts)


def _render_startup(run: dict) -> str:
    lines = [
        "## score-batch --users-only: start-up and per-user cost\n",
        f"Measured {run['measured_at']} on `{run['root']}` ({run['events']:,} events, {run['users']:,} users), where start-up dominates. "
        f"Command: `{run['command']}` (the baseline: the code before this change, run alternately with it). Start-up = the process's "
        "wall time minus the command's own clock: starting Python and importing the CLI, Feast, LightGBM, pandas and DuckDB; loading "
        "the model and opening Feast's registry are inside the command's clock. The per-user cost is the command's own clock.\n",
        "| code | runs | wall s (p50) | start-up s (p50) | command's own clock s (p50) |", "|---|---|---|---|---|",
        *[f"| {name} | {v['runs']} | {v['wall_seconds_p50']} | {v['startup_seconds_p50']} | {v['command_seconds_p50']} |" for name, v in run["variants"].items()],
        "",
    ]
    scale = run.get("scale")
    if scale:
        lines += [f"Projection for the scale shop (not on disk now, so not measured): its best run above took {scale['wall_seconds']} s for "
                  f"{scale['users']:,} users, {scale['command_seconds']} s of it on the command's own clock. With start-up scaled by this session's "
                  f"ratio ({scale['startup_ratio']}: this commit's start-up over the baseline's), the wall time would be {scale['projected_wall_seconds']} s: "
                  f"{_met(scale['projected_users_per_second'], TARGET_OFFLINE)} as a projection, not a measurement.", ""]
    return "\n".join(lines)


def _met(value: float, target: float) -> str:
    return f"**met** ({value:,.0f} >= {target:,})" if value >= target else f"**short** ({value:,.0f} < {target:,})"


def _render_online(online: dict) -> str:
    lines = [f"## ScoreUsers with {CHUNK:,} ids per call (target >= {TARGET_ONLINE:,} users/s)\n",
             f"Measured {online['measured_at']}. Command: `{online['command']}`.\n",
             *([f"Code measured: {online['code_note']}\n"] if online.get("code_note") else [])]
    for shop in online["shops"]:
        p = shop["in_process"]
        lines += [
            f"### {shop['root']}: {shop['events']:,} events, {shop['users']:,} users, {shop['items']:,} items\n",
            *([f"Measured {shop['measured_at']} by an earlier run (`{shop['command']}`), before the bulk read of this run's code; "
               "not re-measured (the shop is not on disk now).\n"] if "measured_at" in shop else []),
            f"Target: {_met(shop['best_users_per_second'], TARGET_ONLINE)}. Calls rotate over {shop['rotated_users']:,} active users.\n",
            "| server workers | concurrent calls | users/s | calls | p50 per call, ms | failures |", "|---|---|---|---|---|---|",
            *[f"| {c['workers']} | {c['concurrency']} | {c['users_per_second']:,.0f} | {c['calls']} | {c['call_p50_ms']} | {c['failures']} |" for c in shop["server"]],
            "",
            *([f"Baseline in the same session: the server's code from {online.get('baseline_label') or online.get('baseline')}:\n",
               "| server workers | concurrent calls | users/s | calls | p50 per call, ms | failures |", "|---|---|---|---|---|---|",
               *[f"| {c['workers']} | {c['concurrency']} | {c['users_per_second']:,.0f} | {c['calls']} | {c['call_p50_ms']} | {c['failures']} |"
                 for c in shop["server_baseline"]], ""] if shop.get("server_baseline") else []),
            f"In process, per call of {p['chunk_users']:,} users (median of {p['chunks_timed']} calls; ScoreUsers reads "
            f"{p.get('users_per_read', p['chunk_users']):,} users per `{p['read_api']}`; predictor {p['predictor']}):\n",
            "| stage | ms per 1,000 users |", "|---|---|",
            f"| bulk online read (Feast's online store, TTLs applied; `{p['read_api']}`"
            f"{', the user model columns decoded' if p['read_api'] == 'fetch_arrays' else ''}) | {p['read_ms_p50']} |",
            f"| conversion + assembly (UserBatch, user_matrix) | {p['assemble_ms_p50']} |",
            f"| predict (one call) | {p['predict_ms_p50']} |",
            f"| **total** | **{p['total_ms_p50']}** ({p['users_per_second_in_process']:,} users/s) |",
            *([f"| the data plane's `Recommender.score_users` on the same ids (what the servicer awaits; it reads with "
               f"`{p.get('data_plane_read_api', 'fetch_columns')}`) | {p['data_plane_ms_p50']} |"] if "data_plane_ms_p50" in p else []),
            *([f"| for comparison: the per-row read it replaced (`fetch_columns`: a row per user and feature, decoded one by one) | "
               f"{p['read_rows_ms_p50']} |"] if "read_rows_ms_p50" in p else []),
            *([f"| for comparison: the read of the user model's inputs only (`OnlineUserFeatures(..., only=USER_MODEL_INPUTS)`, `{p['read_api']}`) | "
               f"{p['read_subset_ms_p50']} |"] if "read_subset_ms_p50" in p else []),
            f"| for comparison: the per-user loop it replaced (UserState + user_vector per user, then predict) | {p['per_user_loop_assemble_predict_ms_p50']} (without the read) |",
            "",
        ]
    return "\n".join(lines)


def _render_offline(offline: dict) -> str:
    best = offline["best_users_per_second"]
    lines = [
        f"## score-batch --users-only on the bench-scale shop (target >= {TARGET_OFFLINE:,} users/s)\n",
        f"Measured {offline['measured_at']} on `{offline['root']}` (`make bench-scale`): {offline['events']:,} events, {offline['users']:,} users, "
        f"{offline['items']:,} items, scored at the as-of time {offline['as_of']}. Command: `{offline['command']}`, which runs "
        "`propensity score-batch --users-only` as its own process (users/s over the whole command's wall time, start-up included; "
        "peak memory from os.wait4).\n",
        f"Target, over the process's whole wall time: {_met(best, TARGET_OFFLINE)}{_by_registry(offline['runs'])}. "
        f"By the command's own clock (from when it starts work, after the interpreter's first imports; the start-up before it, "
        f"wall minus that clock, was {_startup_range(offline['runs'])} s here): "
        f"{_met(max(r['users_per_second_after_startup'] for r in offline['runs']), TARGET_OFFLINE)}.\n",
        "Start-up (training/lean_startup.py, training/registry_memo.py): LightGBM is imported without scikit-learn; Feast without "
        "typeguard's instrumentation and without its offline store (ibis), since this path reads the registry only; and a run "
        "whose registry file hashes the same as an earlier run's recalls what that run read from it (tables, TTLs, the service's "
        "fingerprint) without importing Feast. `feast apply` and `feast materialize` rewrite the registry, so the first run "
        "after either reads through Feast: the `registry` column says which each run did.\n",
        *_baseline_line(offline),
        "| command | code | registry | users | wall s | users/s | users/s after start-up | peak RSS, GB | row groups written |", "|---|---|---|---|---|---|---|---|---|",
        *[f"| `{r['command']}` | {r.get('code', 'this code')} | {r.get('registry', 'read through Feast')} | {r['users']:,} | {r['wall_seconds']} | {r['users_per_second']:,} | "
          f"{r['users_per_second_after_startup']:,} | {r['peak_rss_gb']} | {r['row_groups']} |" for r in offline["runs"]],
        "",
        "The point-in-time rule is Feast's for entity rows at one timestamp (latest row with event_timestamp <= at and within the "
        "view's TTL), run by DuckDB over the Parquet tables Feast's registry names (training/offline_user_features.py): each view's "
        "(user, timestamp) columns first, then the feature columns of only the row groups that can hold a latest row. DuckDB streams "
        "Arrow record batches (memory_limit 2 GB, spilling beyond); each batch is scored and written as one Parquet row group, so "
        "memory does not grow with the number of users. Progress, as the command prints it:\n",
        "```", *offline["runs"][0]["progress_lines"], "```", "",
    ]
    return "\n".join(lines)


def _baseline_line(offline: dict) -> list[str]:
    """The same session's baseline (runs alternating with this code's): medians of wall time, and their ratio."""
    ours = [r["wall_seconds"] for r in offline["runs"] if "code" not in r]
    theirs = [r["wall_seconds"] for r in offline["runs"] if "code" in r]
    if not theirs:
        return []
    mine, base = float(np.median(ours)), float(np.median(theirs))
    return [f"Baseline in the same session, alternating run by run: {offline.get('baseline_label') or 'the earlier code'}, median wall "
            f"{base:.2f} s against this code's {mine:.2f} s (x{base / mine:.2f} the throughput).\n"]


def _by_registry(runs: list[dict]) -> str:
    best: dict[str, int] = {}
    for run in runs:
        if "code" in run:  # a baseline's run
            continue
        kind = run.get("registry", "read through Feast")
        best[kind] = max(best.get(kind, 0), run["users_per_second"])
    if len(best) < 2:
        return ""
    return " (best " + "; ".join(f"{kind}: {_met(value, TARGET_OFFLINE)}" for kind, value in sorted(best.items())) + ")"


def _startup_range(runs: list[dict]) -> str:
    startups = [run["wall_seconds"] - run["command_seconds"] for run in runs if "code" not in run]
    return f"{min(startups):.1f}-{max(startups):.1f}"


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(prog="python -m bench.bulk", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["online", "offline", "startup", "all"])
    parser.add_argument("--baseline", type=Path, help="online, offline, startup: also run the code in this directory (an earlier commit) in the same session")
    parser.add_argument("--baseline-label", help="how the report names the baseline (e.g. 'commit 305cab9'); default: its directory")
    parser.add_argument("--root", type=Path, action="append", help="shop directory (online: repeatable; default var/bench; offline: var/scale)")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per ScoreUsers concurrency level")
    parser.add_argument("--workers", type=int, default=2, help="server worker processes (production setting: 2 on this machine)")
    parser.add_argument("--repeats", type=int, default=2, help="score-batch runs per chunk size")
    parser.add_argument("--chunk-sizes", default="default,25000", help="score-batch --chunk-size values ('default' = the command's own)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    previous = json.loads((args.out / "bulk_scoring.json").read_text()) if (args.out / "bulk_scoring.json").exists() else {}
    results = {**previous, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}}
    if args.what in ("online", "all"):
        measured = online(args.root or [PROJECT_ROOT / "var" / "bench"], args.seconds, args.workers, args.baseline)
        results["online"] = keep_other_shops({**measured, "baseline_label": args.baseline_label}, previous.get("online"))
    if args.what in ("offline", "all"):
        chunks = [None if c == "default" else int(c) for c in args.chunk_sizes.split(",")]
        results["offline"] = offline((args.root or [PROJECT_ROOT / "var" / "scale"])[-1], chunks, args.repeats, args.baseline, args.baseline_label)
    if args.what == "startup":
        scale = results.get("offline", {})
        best = min(scale.get("runs", []), key=lambda r: r["wall_seconds"], default=None)  # the scale shop's best run, before this change
        results["startup"] = startup((args.root or [PROJECT_ROOT / "var" / "bench"])[-1], args.repeats, args.baseline, best)
    write_report(results, args.out)
    say(f"wrote {args.out / 'bulk_scoring.md'} and bulk_scoring.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
