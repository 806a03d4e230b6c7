"""Load that h2load cannot make: ScoreUsers batches of 1,000 ids (the open loop is bench/open_loop.py).

grpc.aio clients with one connection per channel (local subchannel pools), so SO_REUSEPORT
workers each get connections; every loop is bounded by a duration.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc
import numpy as np

from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc

_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


async def _score_users(target: str, user_ids: Sequence[str], batch: int, concurrency: int, seconds: float) -> dict:
    chans = [grpc.aio.insecure_channel(target, options=_OPTIONS) for _ in range(concurrency)]
    batches = [list(user_ids[i : i + batch]) for i in range(0, len(user_ids) - batch + 1, batch)] or [list(user_ids)]
    calls, scored, errors = 0, 0, 0
    latencies: list[float] = []

    async def loop(worker: int, stop_at: float) -> None:
        nonlocal calls, scored, errors
        stub = pb_grpc.RecommendationServiceStub(chans[worker])
        i = worker
        while time.perf_counter() < stop_at:
            ids = batches[i % len(batches)]
            i += concurrency
            t0 = time.perf_counter()
            try:
                reply = await stub.ScoreUsers(pb.ScoreUsersRequest(user_ids=ids), timeout=30.0)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            latencies.append((time.perf_counter() - t0) * 1000)
            calls += 1
            scored += len(reply.scores)

    try:
        stub = pb_grpc.RecommendationServiceStub(chans[0])
        await stub.ScoreUsers(pb.ScoreUsersRequest(user_ids=batches[0]), timeout=30.0)  # warm-up
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(loop(w, t0 + seconds) for w in range(concurrency))), timeout=seconds + 60)
        elapsed = time.perf_counter() - t0
    finally:
        for c in chans:
            await c.close()
    return {
        "concurrency": concurrency,
        "batch_size": batch,
        "calls": calls,
        "failures": errors,
        "users_per_second": round(scored / elapsed, 1),
        "call_p50_ms": round(float(np.percentile(latencies, 50)), 2) if latencies else None,
    }


def score_users(target: str, user_ids: Sequence[str], batch: int = 1000, concurrency: int = 1, seconds: float = 4.0) -> dict:
    """ScoreUsers with `batch` ids per call from `concurrency` clients for `seconds`: users scored per second."""
    return asyncio.run(_score_users(target, user_ids, batch, concurrency, seconds))
