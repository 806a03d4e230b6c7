"""The in-process compute floor of one Recommend: no gRPC, no Python server around it.

(i) scoring: UserState.from_row + user model + candidates + pair_matrix + ranker (num_threads=1)
    + top-k, with the user's online row fetched beforehand;
(ii) the same plus the user's online read through the server's own reader
    (server.online_features.OnlineUserFeatures: Feast's online store, TTLs applied);
(iii) that read and decode alone, per online store (SQLite, and Redis when it is reachable).
Users are visited round-robin, so consecutive calls never score or read the same rows.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence

import numpy as np

from bench.shop import Shop
from propensity.assembly import pair_matrix, user_vector
from propensity.candidates import generate_candidates
from propensity.user_state import UserState


def recommend_in_process(shop: Shop, user_id: str, row: dict[str, object], k: int = 10) -> np.ndarray:
    """The data plane's work for one personalised request; returns the top-k catalog indices."""
    now = time.time()
    user = UserState.from_row(user_id, row, shop.catalog)
    user_row = user_vector(user, now)
    shop.user_model.predict(user_row[None, :], num_threads=1)
    candidates = generate_candidates(user, shop.catalog, shop.settings.candidates, now, shop.retrieval_weights)
    idx = candidates.item_idx
    scores = shop.ranker.predict(pair_matrix(user, shop.catalog, idx, now, user_row=user_row, signals=candidates.signals), num_threads=1)
    top = np.argpartition(-scores, min(k, len(scores)) - 1)[:k]
    return idx[top[np.argsort(-scores[top])]]


def user_reader(store: object, service_name: str) -> Callable[[str], dict[str, object]]:
    """What the server does per request to get one user's row: OnlineUserFeatures(store, service).fetch([user])[0]."""
    from server.online_features import OnlineUserFeatures

    reader = OnlineUserFeatures(store, service_name)
    return lambda user_id: reader.fetch([user_id])[0]


def _stats(prefix: str, seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds, dtype=float) * 1000
    return {f"{prefix}_p50_ms": round(float(np.median(ms)), 4), f"{prefix}_p99_ms": round(float(np.percentile(ms, 99)), 4)}


def _frozen(fn: Callable[[], dict]) -> dict:
    gc.collect()
    gc.freeze()
    try:
        return fn()
    finally:
        gc.unfreeze()


def measure_user_read(read: Callable[[str], dict[str, object]], user_ids: Sequence[str], passes: int = 1) -> dict[str, float]:
    """p50/p99 ms of one user's read + decode (each user once per pass, after one warm-up pass)."""
    for u in user_ids[: min(len(user_ids), 50)]:
        read(u)

    def run() -> dict:
        times = []
        for _ in range(passes):
            for u in user_ids:
                t0 = time.perf_counter()
                read(u)
                times.append(time.perf_counter() - t0)
        return {"reads": len(times), **_stats("user_read", times)}

    return _frozen(run)


def measure_floor(shop: Shop, user_ids: Sequence[str], read: Callable[[str], dict[str, object]], passes: int = 1) -> dict[str, float]:
    """Median and p99 per-request milliseconds of (i) scoring only and (ii) user read + scoring."""
    rows = [read(u) for u in user_ids]
    for u, r in zip(user_ids[:50], rows):  # warm caches and lazy imports
        recommend_in_process(shop, u, r)

    def run() -> dict:
        scoring, with_read = [], []
        for _ in range(passes):
            for u, r in zip(user_ids, rows):
                t0 = time.perf_counter()
                recommend_in_process(shop, u, r)
                scoring.append(time.perf_counter() - t0)
            for u in user_ids:
                t0 = time.perf_counter()
                recommend_in_process(shop, u, read(u))
                with_read.append(time.perf_counter() - t0)
        return {"requests_per_variant": len(scoring), **_stats("scoring", scoring), **_stats("with_feast_user_read", with_read)}

    return _frozen(run)
