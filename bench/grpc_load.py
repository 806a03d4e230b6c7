"""Load that h2load cannot make: ScoreUsers batches of 1,000 ids (the open loop is bench/open_loop.py).

grpc.aio clients with one connection per channel (local subchannel pools), so SO_REUSEPORT
workers each get connections. The kernel spreads connections, not calls, by a hash: with as many
connections as concurrent calls, 2 or 4 connections often land on one worker of two and leave the
other idle. So calls go round-robin over at least CONNECTIONS connections, and each worker's share
of the calls is its share of those. Every loop is bounded by a duration.
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
CONNECTIONS = 8


async def _score_users(target: str, user_ids: Sequence[str], batch: int, concurrency: int, seconds: float) -> dict:
    chans = [grpc.aio.insecure_channel(target, options=_OPTIONS) for _ in range(max(CONNECTIONS, concurrency))]
    stubs = [pb_grpc.RecommendationServiceStub(c) for c in chans]
    next_call = 0
    batches = [list(user_ids[i : i + batch]) for i in range(0, len(user_ids) - batch + 1, batch)] or [list(user_ids)]
    calls, scored, errors = 0, 0, 0
    latencies: list[float] = []

    async def loop(worker: int, stop_at: float) -> None:
        nonlocal calls, scored, errors, next_call
        i = worker
        while time.perf_counter() < stop_at:
            ids = batches[i % len(batches)]
            i += concurrency
            stub, next_call = stubs[next_call % len(stubs)], next_call + 1
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
        # Warm-up, and every connection up before the clock starts.
        await asyncio.gather(*(stub.ScoreUsers(pb.ScoreUsersRequest(user_ids=batches[0]), timeout=30.0) for stub in stubs))
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
