"""Open-loop Recommend load at a fixed rate, in a process of its own, that measures its own lateness.

    python -m bench.open_loop --target 127.0.0.1:50051 --users-file users.txt --rate 500 --seconds 8 --out result.json

Request i is due at t0 + i / rate whatever happened to the earlier ones (open loop: a slow
answer never delays the next send). Users rotate per request. For every request it records
when it was due, when the call was actually issued and when the answer arrived:

- latency = answer - due (a late send counts against the result: no coordinated omission);
- lateness = issued - due: how far behind its own schedule the generator was. When lateness is a
  large part of the latency tail, the tail measures this Python process (sharing the cores
  with the server), not the server, and the result says so (`generator_limited`).

Several channels, each with its own connection (`grpc.use_local_subchannel_pool`), so the
server's SO_REUSEPORT workers all get connections. `--priority-boost` lowers the generator's
niceness below the server's (where permitted): it needs a small share of a core, but on time. The event loop waits with select(), whose
timeout has microsecond resolution (epoll's is a millisecond, which alone would make every send
up to 1 ms late).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import selectors
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

RECOMMEND = "/propensity.v1.RecommendationService/Recommend"
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
# The generator, not the server, limits the tail when its p99 lateness is at least this long and this share of the latency p99.
LATENESS_LIMIT_MS, LATENESS_SHARE = 1.0, 0.2


def generator_limited(lateness_p99_ms: float, latency_p99_ms: float) -> bool:
    """True when the generator's own lateness explains a large part of the measured latency tail."""
    if not np.isfinite(lateness_p99_ms):
        return True  # it could not even send: nothing it measured is about the server
    return bool(lateness_p99_ms >= LATENESS_LIMIT_MS and lateness_p99_ms >= LATENESS_SHARE * latency_p99_ms)


def _pct(values: np.ndarray, p: float) -> float:
    return round(float(np.percentile(values, p)), 3) if len(values) else float("nan")


def summarise(rate: float, due: np.ndarray, issued: np.ndarray, answered: np.ndarray, ok: np.ndarray,
              fallbacks: int, users_answered: int) -> dict:
    """The phase's figures from per-request times in seconds (NaN where a request was never issued/answered)."""
    sent = ~np.isnan(issued)
    done = ok & ~np.isnan(answered)
    latency = (answered[done] - due[done]) * 1000
    service = (answered[done] - issued[done]) * 1000
    lateness = (issued[sent] - due[sent]) * 1000
    last = float(np.nanmax(answered)) if done.any() else float("nan")
    result = {
        "target_rate_rps": round(rate, 1),
        "requests": int(len(due)),
        "answered": int(done.sum()),
        "failures": int(len(due) - done.sum()),
        "fallbacks": int(fallbacks),
        "achieved_rps": round(float(done.sum()) / last, 1) if last > 0 else 0.0,
        "distinct_users_answered": int(users_answered),
        "p50": _pct(latency, 50), "p95": _pct(latency, 95), "p99": _pct(latency, 99),
        "max": round(float(latency.max()), 3) if len(latency) else float("nan"),
        "service_p50": _pct(service, 50), "service_p99": _pct(service, 99),
        "lateness_p50_ms": _pct(lateness, 50), "lateness_p99_ms": _pct(lateness, 99),
        "lateness_max_ms": round(float(lateness.max()), 3) if len(lateness) else float("nan"),
        "late_over_1ms": int((lateness > 1.0).sum()),
    }
    result["generator_limited"] = generator_limited(result["lateness_p99_ms"], result["p99"])
    return result


async def _run(target: str, users: Sequence[str], rate: float, seconds: float, channels: int, timeout: float, raw: Path | None) -> dict:
    import grpc

    from propensity.v1 import recommendation_service_pb2 as pb

    chans = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(channels)]
    calls = [c.unary_unary(RECOMMEND, request_serializer=None, response_deserializer=pb.RecommendResponse.FromString) for c in chans]
    bodies = [pb.RecommendRequest(user_id=u, num_items=10).SerializeToString() for u in users]
    n = max(1, int(rate * seconds))
    due = np.arange(n, dtype=float) / rate
    issued = np.full(n, np.nan)
    answered = np.full(n, np.nan)
    ok = np.zeros(n, dtype=bool)
    fallbacks = 0
    reached: set[int] = set()
    clock = time.perf_counter

    try:
        for call in calls:  # every connection up before the clock starts
            await call(bodies[0], timeout=30.0)
        gc.collect()
        gc.freeze()
        gc.disable()
        t0 = clock() + 0.01

        async def one(i: int) -> None:
            nonlocal fallbacks
            k = i % len(bodies)
            issued[i] = clock() - t0
            try:
                reply = await calls[i % channels](bodies[k], timeout=timeout)
            except grpc.aio.AioRpcError:
                return
            answered[i] = clock() - t0
            if reply.items:
                ok[i] = True
                reached.add(k)
                fallbacks += reply.fallback_used

        tasks = []
        for i in range(n):
            delay = t0 + due[i] - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.wait(tasks, timeout=timeout + 10)
    finally:
        gc.enable()
        for c in chans:
            await c.close()
    if raw is not None:  # every request: due, issued and answered (s from t0; NaN = never), answered with items
        np.savez_compressed(raw, due=due, issued=issued, answered=answered, ok=ok)
    return summarise(rate, due, issued, answered, ok, fallbacks, len(reached)) | {
        "channels": channels, "seconds": seconds, "users_answered": sorted(users[k] for k in reached)}


def run(target: str, users: Sequence[str], rate: float, seconds: float, channels: int = 16, timeout: float = 5.0, raw: Path | None = None) -> dict:
    """One open-loop phase in this process; a loop on select() for sub-millisecond timers."""
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        return loop.run_until_complete(_run(target, users, rate, seconds, channels, timeout, raw))
    finally:
        loop.close()


def boost_priority(steps: int) -> int:
    """Lower this process's niceness by `steps` if allowed (it must keep its schedule on cores it shares
    with the server); returns the niceness it runs at."""
    if steps > 0:
        try:
            os.nice(-steps)
        except PermissionError:
            pass
    return os.nice(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.open_loop", description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port")
    parser.add_argument("--users-file", required=True, type=Path, help="one user id per line, in rotation order")
    parser.add_argument("--rate", required=True, type=float, help="requests per second")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=5.0, help="per-call deadline in seconds")
    parser.add_argument("--out", type=Path, help="write the result as JSON here (default: stdout)")
    parser.add_argument("--raw", type=Path, help="also write every request's times here (.npz)")
    parser.add_argument("--priority-boost", type=int, default=0, help="lower this process's niceness by this much (if permitted)")
    args = parser.parse_args(argv)
    users = [line.strip() for line in args.users_file.read_text().splitlines() if line.strip()]
    niceness = boost_priority(args.priority_boost)
    result = run(args.target, users, args.rate, args.seconds, args.channels, args.timeout, args.raw) | {"generator_niceness": niceness}
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
