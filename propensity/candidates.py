"""Candidate generation: which items are worth scoring for a user. Shared by training and serving."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from propensity.catalog import Catalog
from propensity.settings import CandidateSettings
from propensity.user_state import UserState


@dataclass(frozen=True)
class CandidateSet:
    """Catalog indices to score, in source priority order, the source each came from, and how many came from each source."""

    item_idx: np.ndarray
    sources: dict[str, int]
    item_sources: np.ndarray  # per item, the name of the first source that proposed it (object array, same length as item_idx)


def generate_candidates(user: UserState, catalog: Catalog, settings: CandidateSettings) -> CandidateSet:
    """The user's recent items, most bought items, co-visited items, popular items in favourite categories, then overall."""
    parts: list[tuple[str, np.ndarray]] = [("recent", user.recent_idx), ("bought_before", user.bought_idx[: settings.bought_before])]
    neighbours = [catalog.neighbors[i][0][: settings.per_neighbor_source] for i in user.recent_idx[:10]]
    parts.append(("covisited", np.concatenate(neighbours) if neighbours else np.empty(0, dtype=np.int64)))
    by_category = [
        catalog.popular_by_category[c][: settings.popular_per_category]
        for c in user.top_categories
        if c in catalog.popular_by_category
    ]
    parts.append(("category_popular", np.concatenate(by_category) if by_category else np.empty(0, dtype=np.int64)))
    parts.append(("popular", catalog.popular_order[: settings.popular_overall]))

    seen = np.zeros(catalog.size, dtype=bool)
    chosen: list[np.ndarray] = []
    chosen_from: list[str] = []
    sources: dict[str, int] = {}
    budget = settings.max_candidates
    for name, idx in parts:
        idx = np.asarray(idx, dtype=np.int64)
        if budget <= 0 or not len(idx):
            sources[name] = 0
            continue
        _, first = np.unique(idx, return_index=True)
        idx = idx[np.sort(first)]  # de-duplicate, keep priority order
        idx = idx[~seen[idx] & catalog.available[idx]][:budget]
        seen[idx] = True
        chosen.append(idx)
        chosen_from.extend([name] * len(idx))
        sources[name] = len(idx)
        budget -= len(idx)
    item_idx = np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)
    return CandidateSet(item_idx=item_idx, sources=sources, item_sources=np.asarray(chosen_from, dtype=object))
