"""The in-process compute floor of one Recommend: no gRPC, no Python server around it.

(i) scoring: UserState.from_row + user model + candidates + pair_matrix + ranker (num_threads=1)
    + top-k, with the user's online row fetched beforehand;
(ii) the same plus the Feast online read of that user (what the server does per request).
Users are visited round-robin, so consecutive calls never score the same rows.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence

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


def measure_floor(shop: Shop, user_ids: Sequence[str], rows: Sequence[dict[str, object]], passes: int = 5) -> dict[str, float]:
    """Median and p99 per-request milliseconds of (i) scoring only and (ii) Feast read + scoring."""
    for u, r in zip(user_ids, rows):  # warm caches and lazy imports
        recommend_in_process(shop, u, r)
    gc.collect()
    gc.freeze()
    scoring, with_feast = [], []
    for _ in range(passes):
        for u, r in zip(user_ids, rows):
            t0 = time.perf_counter()
            recommend_in_process(shop, u, r)
            scoring.append(time.perf_counter() - t0)
        for u in user_ids:
            t0 = time.perf_counter()
            row = shop.fetch_users([u])[0]
            recommend_in_process(shop, u, row)
            with_feast.append(time.perf_counter() - t0)
    gc.unfreeze()
    s, f = np.array(scoring) * 1000, np.array(with_feast) * 1000
    return {
        "requests_per_variant": len(s),
        "scoring_p50_ms": round(float(np.median(s)), 3),
        "scoring_p99_ms": round(float(np.percentile(s, 99)), 3),
        "with_feast_user_read_p50_ms": round(float(np.median(f)), 3),
        "with_feast_user_read_p99_ms": round(float(np.percentile(f, 99)), 3),
    }
