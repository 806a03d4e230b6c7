"""Event-loop lag of a real server under Recommend load while its periodic work runs often (docs/benchmarks/event_loop.md).

    .venv/bin/python docs/benchmarks/event_loop_serving.py [--seconds 60] [--rate 100] [--label new]

Starts one server process (this file with --serve) on the PROPENSITY_* settings, with the catalog
re-read every 5 s and the model registry polled every second; sends Recommend at a fixed rate (open
loop) over 1,000 users and promotes a copy of the model every 10 s (--no-background: none of this,
the lag of the load alone); then stops the server, which
reports what a 1 ms timer on its loop saw. The timer is this script's own, so it also runs against
older code (PYTHONPATH=<checkout>), which has no lag metric. Lateness caused by other processes
taking the CPU (the thread's run-queue wait) is subtracted as in event_loop_probe.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TICK = 0.001


def _run_queue_seconds(fd: int) -> float:
    return int(os.pread(fd, 100, 0).split()[1]) / 1e9


async def _serve_and_watch(out: Path) -> None:
    from propensity.settings import Settings
    from server.app import serve

    lags: list[float] = []
    own: list[float] = []
    late: list[tuple[float, float]] = []  # (wall-clock time, own lag) of wake-ups over 5 ms, to line up with events
    recording = False

    async def watch() -> None:
        fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        while True:
            start, queued = time.perf_counter(), _run_queue_seconds(fd)
            await asyncio.sleep(TICK)
            if recording:
                lag = time.perf_counter() - start - TICK
                lags.append(lag)
                own.append(max(0.0, lag - (_run_queue_seconds(fd) - queued)))
                if own[-1] > 0.005:
                    late.append((time.time(), own[-1]))

    def started(info: object) -> None:
        nonlocal recording
        recording = True  # from the first served moment: start-up builds happen before the loop serves
        print("READY", info.port, flush=True)  # type: ignore[attr-defined]

    watcher = asyncio.create_task(watch())
    await serve(Settings(), on_started=started)
    watcher.cancel()
    out.write_text(json.dumps({"lags": lags, "own": own, "late": late}))


async def _load(target: str, users: list[str], rate: float, seconds: float, models: Path, promote_every: float) -> dict[str, object]:
    import grpc

    from propensity.model_registry import current_version, promote
    from propensity.v1 import recommendation_service_pb2 as pb
    from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc

    base = current_version(models)
    other = "v29990101T000000"
    if not (models / "versions" / other).exists():
        shutil.copytree(models / "versions" / base, models / "versions" / other)
        meta = json.loads((models / "versions" / other / "metadata.json").read_text())
        meta["version"] = other
        (models / "versions" / other / "metadata.json").write_text(json.dumps(meta))
    latencies: list[float] = []
    errors: list[str] = []
    promoted_at: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RecommendationServiceStub(channel)
        await stub.Recommend(pb.RecommendRequest(user_id=users[0]), timeout=30)  # warm

        async def one(user: str) -> None:
            t0 = time.perf_counter()
            try:
                await stub.Recommend(pb.RecommendRequest(user_id=user, num_items=10), timeout=5)
                latencies.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as error:
                errors.append(error.code().name)

        tasks = []
        t0 = time.perf_counter()
        n = int(rate * seconds)
        promotions = 0
        for i in range(n):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if promote_every and i and i % int(rate * promote_every) == 0:  # a promotion: the server hot-reloads
                promote(models, other if promotions % 2 == 0 else base)
                promoted_at.append(time.time())
                promotions += 1
            tasks.append(asyncio.create_task(one(users[i % len(users)])))
        await asyncio.gather(*tasks)
    promote(models, base)
    lat = np.array(latencies) * 1e3
    return {"requests": n, "ok": len(latencies), "errors": len(errors), "promotions": promotions, "promoted_at": promoted_at,
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 2), "latency_p99_ms": round(float(np.percentile(lat, 99)), 2),
            "latency_max_ms": round(float(lat.max()), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=100.0, help="Recommend calls per second (open loop)")
    parser.add_argument("--label", default="")
    parser.add_argument("--no-background", action="store_true", help="no catalog re-reads, polls or promotions: the lag of the load alone")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve_and_watch(args.serve))
        return

    import pandas as pd

    from propensity.settings import Settings

    settings = Settings()
    users = pd.read_parquet(settings.prepared_dir / "events.parquet", columns=["user_id"])["user_id"].value_counts().index[:1000].astype(str).tolist()
    out = Path(f"/tmp/event_loop_serving_{os.getpid()}.json")
    every = ("3600", "3600") if args.no_background else ("5", "1")
    env = {**os.environ, "PROPENSITY_SERVER__HOST": "127.0.0.1", "PROPENSITY_SERVER__PORT": "0",
           "PROPENSITY_SERVER__ITEM_CACHE_REFRESH_SECONDS": every[0], "PROPENSITY_SERVER__MODEL_POLL_SECONDS": every[1]}
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(out)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("READY"):
            line = server.stdout.readline()  # type: ignore[union-attr]
            if not line and server.poll() is not None:
                raise RuntimeError("server exited before serving")
        port = int(line.split()[1])
        load = asyncio.run(_load(f"127.0.0.1:{port}", users, args.rate, args.seconds, settings.model_dir, promote_every=0 if args.no_background else 10))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    data = json.loads(out.read_text())
    out.unlink()
    own, raw = np.array(data["own"]) * 1e3, np.array(data["lags"]) * 1e3
    promoted_at = load.pop("promoted_at")
    # Wake-ups over 5 ms within 2 s after a promotion (the reload and the first answers of the new model) vs the rest.
    near = [lag * 1e3 for t, lag in data["late"] if any(0 <= t - p < 2 for p in promoted_at)]  # type: ignore[union-attr]
    elsewhere = [lag * 1e3 for t, lag in data["late"] if not any(0 <= t - p < 2 for p in promoted_at)]
    row = {"label": args.label, **load, "late_near_promotion": len(near), "late_near_promotion_max_ms": round(max(near, default=0), 2),
           "late_elsewhere": len(elsewhere), "late_elsewhere_max_ms": round(max(elsewhere, default=0), 2), "lag_p50_ms": round(float(np.percentile(own, 50)), 2),
           "lag_p99_ms": round(float(np.percentile(own, 99)), 2), "lag_max_ms": round(float(own.max()), 2),
           "wakes_over_5ms": int((own > 5).sum()), "wakes": len(own), "raw_lag_max_ms": round(float(raw.max()), 2)}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
