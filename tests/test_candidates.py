"""Tests for candidate generation: recent items first, then the catalog by retrieval score; availability, cap, sources."""

import numpy as np
import pandas as pd
import pytest

from propensity.candidates import generate_candidates
from propensity.catalog import Catalog
from propensity.retrieval import SIGNALS
from propensity.settings import CandidateSettings
from propensity.user_state import UserState

NOW = 1_700_000_000.0


@pytest.fixture()
def catalog() -> Catalog:
    """a..f indexed 0..5; c is sold out; popular order (available): a, f, b, d, e."""
    return Catalog.from_frame(
        pd.DataFrame(
            {
                "item_id": ["a", "b", "c", "d", "e", "f"],
                "category_id": ["c1", "c1", "c2", "c2", None, "c1"],
                "item_available": [1, 1, 0, 1, 1, 1],
                "item_purchases_7d": [3, 1, 5, 1, 0, 2],
                "neighbor_item_ids": [["b", "d"], ["a"], ["e"], [], ["a", "c"], ["c", "a"]],
                "neighbor_scores": [[3.0, 1.0], [2.0], [1.0], [], [1.0, 1.0], [4.0, 1.0]],
            }
        )
    )


def _user(catalog: Catalog, recent: list[str], categories: list[str] = (), bought: list[str] | None = None) -> UserState:
    row = {
        "last_event_ts": NOW - 3600,
        "recent_item_ids": recent,
        "recent_item_last_ts": [NOW - 3600 * (k + 1) for k in range(len(recent))],
        "top_category_ids": list(categories),
        "top_category_shares": [1.0 / len(categories)] * len(categories) if categories else [],
        "bought_item_ids": bought or [],
        "bought_item_counts": [1] * len(bought or []),
        "bought_item_last_ts": [NOW - 86_400] * len(bought or []),
    }
    return UserState.from_row("u", row, catalog)


def _only(signal: str, weight: float = 1.0) -> dict:
    """Weights that score by one signal, the same for known and new items."""
    segment = {name: 0.0 for name in SIGNALS} | {signal: weight}
    return {"known": segment, "new": segment}


def _ids(catalog: Catalog, idx: np.ndarray) -> list[str]:
    return catalog.item_ids[idx].tolist()


def test_recent_items_come_first_most_recent_first_without_sold_out_items(catalog: Catalog) -> None:
    user = _user(catalog, ["d", "c", "b"])
    result = generate_candidates(user, catalog, CandidateSettings(), NOW, _only("popularity"))
    assert _ids(catalog, result.item_idx[:2]) == ["d", "b"]  # c is sold out
    assert result.item_sources[:2].tolist() == ["recent", "recent"]
    # The rest of the budget: every other available item, by popularity (a, f, e); never c, never twice.
    assert _ids(catalog, result.item_idx[2:]) == ["a", "f", "e"]
    assert result.sources == {"recent": 2, "popular": 3}


def test_the_budget_caps_recent_items_and_the_fill(catalog: Catalog) -> None:
    user = _user(catalog, ["d", "b", "e"])
    assert _ids(catalog, generate_candidates(user, catalog, CandidateSettings(max_candidates=2), NOW, _only("popularity")).item_idx) == ["d", "b"]
    capped = generate_candidates(user, catalog, CandidateSettings(max_candidates=4, recent_items=1), NOW, _only("popularity"))
    assert _ids(catalog, capped.item_idx) == ["d", "a", "f", "b"]  # one recent item, then the three most popular


def test_fill_follows_the_weighted_signals(catalog: Catalog) -> None:
    user = _user(catalog, ["b"], bought=["e"])
    by_covisit = generate_candidates(user, catalog, CandidateSettings(max_candidates=2, recent_items=1), NOW, _only("covisited"))
    assert _ids(catalog, by_covisit.item_idx) == ["b", "a"]  # b's co-visited neighbour
    assert by_covisit.item_sources.tolist() == ["recent", "covisited"]
    by_history = generate_candidates(user, catalog, CandidateSettings(max_candidates=2, recent_items=1), NOW, _only("bought"))
    assert _ids(catalog, by_history.item_idx) == ["b", "e"]
    assert by_history.item_sources.tolist() == ["recent", "bought_before"]


def test_known_and_new_items_are_scored_by_their_own_weights(catalog: Catalog) -> None:
    user = _user(catalog, [], bought=["e"])
    zero = {name: 0.0 for name in SIGNALS}
    # The bought item e (known) gets a low intercept, new items a high one: new items win the budget.
    weights = {"known": zero | {"bought": 1.0, "intercept": -10.0}, "new": zero | {"popularity": 1.0, "intercept": 0.0}}
    result = generate_candidates(user, catalog, CandidateSettings(max_candidates=2), NOW, weights)
    assert _ids(catalog, result.item_idx) == ["a", "f"]
    weights["known"]["intercept"] = 10.0
    assert _ids(catalog, generate_candidates(user, catalog, CandidateSettings(max_candidates=2), NOW, weights).item_idx) == ["e", "a"]


def test_without_fitted_weights_the_defaults_apply_and_the_result_is_deterministic(catalog: Catalog) -> None:
    user = _user(catalog, ["b"], ["c1"])
    first = generate_candidates(user, catalog, CandidateSettings(), NOW)
    again = generate_candidates(user, catalog, CandidateSettings(), NOW)
    assert first.item_idx.tolist() == again.item_idx.tolist()
    assert len(first.item_idx) == 5 and 2 not in first.item_idx  # every available item once
    assert sum(first.sources.values()) == len(first.item_idx) == len(first.item_sources)


def test_signals_of_the_candidates_are_returned_for_the_ranker(catalog: Catalog) -> None:
    user = _user(catalog, ["b"])
    result = generate_candidates(user, catalog, CandidateSettings(), NOW)
    assert result.signals.values.shape == (catalog.size + 1, len(SIGNALS))
    assert result.signals.values[catalog.index["b"], SIGNALS.index("recent")] == 1.0


def test_user_without_history_gets_popular_items(catalog: Catalog) -> None:
    user = UserState.from_row("new", {}, catalog)
    result = generate_candidates(user, catalog, CandidateSettings(max_candidates=3), NOW, _only("popularity"))
    assert _ids(catalog, result.item_idx) == ["a", "f", "b"]
    assert set(result.item_sources) == {"popular"}


def test_empty_catalog_gives_no_candidates() -> None:
    catalog = Catalog.from_frame(pd.DataFrame({"item_id": []}))
    user = UserState.from_row("u", {"recent_item_ids": ["x"]}, catalog)
    result = generate_candidates(user, catalog, CandidateSettings(), NOW)
    assert len(result.item_idx) == 0 and sum(result.sources.values()) == 0
