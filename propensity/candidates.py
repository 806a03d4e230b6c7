"""Candidate generation: which items are worth scoring for a user. Shared by training and serving.

The user's recent items always come first (most recent first): they carry the in-cart state and
nothing cheaper predicts the next purchase better. The rest of the budget goes to the catalog's
items with the highest retrieval score, a weighted sum of every source's signal (propensity.retrieval):
purchase history, ALS, co-purchase, co-visitation, content, category affinity and popularity. The
weights are fitted per model version on training cut-offs (training/retrieval_fit.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from propensity.catalog import Catalog
from propensity.retrieval import SOURCE_CODE, SOURCE_NAMES, RetrievalWeights, UserSignals, user_signals
from propensity.settings import CandidateSettings
from propensity.top_k import top_k
from propensity.user_state import UserState


@dataclass(frozen=True)
class CandidateSet:
    """Catalog indices to score, the source each came from, how many came from each source, and the user's signals."""

    item_idx: np.ndarray
    sources: dict[str, int]
    item_sources: np.ndarray  # per item, the name of the source that proposed it (object array, same length as item_idx)
    signals: UserSignals  # every retrieval signal of every catalog item for this user (ranker features reuse them)


def generate_candidates(
    user: UserState,
    catalog: Catalog,
    settings: CandidateSettings,
    as_of_ts: float | None = None,
    weights: RetrievalWeights | Mapping[str, Mapping[str, float]] | None = None,
) -> CandidateSet:
    """The user's recent items, then the best of the catalog by retrieval score, up to settings.max_candidates (available items only)."""
    as_of_ts = time.time() if as_of_ts is None else as_of_ts
    signals = user_signals(user, catalog, as_of_ts)
    retrieval = weights if isinstance(weights, RetrievalWeights) else RetrievalWeights.from_json(weights)
    budget = settings.max_candidates
    recent = user.recent_idx[catalog.available[user.recent_idx]][: min(budget, settings.recent_items)] if len(user.recent_idx) else user.recent_idx
    _, first = np.unique(recent, return_index=True)
    recent = recent[np.sort(first)]
    score = retrieval.score_by_signal(signals.by_signal[:, : catalog.size])
    score[~catalog.available] = -np.inf  # sold-out items, and the recent items already taken, never fill the budget
    score[recent] = -np.inf
    best = top_k(score, max(budget - len(recent), 0))
    best = best[np.isfinite(score[best])]  # fewer eligible items than the budget: never fill it with excluded ones
    item_idx = np.concatenate([recent, best]).astype(np.int64)
    codes = np.concatenate([np.full(len(recent), SOURCE_CODE["recent"]), retrieval.source_codes(signals.by_signal[:, best])])
    counts = np.bincount(codes, minlength=len(SOURCE_NAMES))
    sources = {str(SOURCE_NAMES[code]): int(counts[code]) for code in dict.fromkeys(codes.tolist())}  # in order of first appearance
    return CandidateSet(item_idx=item_idx, sources=sources, item_sources=SOURCE_NAMES[codes], signals=signals)

