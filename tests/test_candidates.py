"""Tests for candidate generation: source order, de-duplication, availability and the cap."""

import numpy as np
import pandas as pd
import pytest

from propensity.candidates import generate_candidates
from propensity.catalog import Catalog
from propensity.settings import CandidateSettings
from propensity.user_state import UserState


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


def _user(catalog: Catalog, recent: list[str], categories: list[str], bought: list[str] | None = None) -> UserState:
    row = {
        "bought_item_ids": bought or [],
        "last_event_ts": 1_700_000_000,
        "recent_item_ids": recent,
        "top_category_ids": categories,
        "top_category_shares": [1.0 / len(categories)] * len(categories) if categories else [],
    }
    return UserState.from_row("u", row, catalog)


def _ids(catalog: Catalog, idx: np.ndarray) -> list[str]:
    return catalog.item_ids[idx].tolist()


def test_sources_in_priority_order_deduplicated_without_unavailable_items(catalog: Catalog) -> None:
    user = _user(catalog, ["b", "c", "a"], ["c1", "c2"])
    result = generate_candidates(user, catalog, CandidateSettings())
    # recent b, (c sold out), a; co-visited: b->a (seen), c->e, a->b (seen), d; category c1: a, f, b; c2: d;
    # popular: a, f, b, d, e.
    assert _ids(catalog, result.item_idx) == ["b", "a", "e", "d", "f"]
    assert result.sources == {"recent": 2, "bought_before": 0, "covisited": 2, "category_popular": 1, "popular": 0}
    assert len(set(result.item_idx.tolist())) == len(result.item_idx)
    assert catalog.available[result.item_idx].all()
    assert result.item_idx.dtype == np.int64


def test_most_bought_items_come_right_after_recent_ones(catalog: Catalog) -> None:
    # d and e were bought long ago (not recent): they outrank co-visited and popular items.
    user = _user(catalog, ["b"], [], bought=["e", "c", "b", "d", "ghost"])
    result = generate_candidates(user, catalog, CandidateSettings(popular_overall=1))
    assert _ids(catalog, result.item_idx) == ["b", "e", "d", "a"]  # c sold out, b already recent, ghost unknown
    assert result.sources == {"recent": 1, "bought_before": 2, "covisited": 1, "category_popular": 0, "popular": 0}
    capped = generate_candidates(user, catalog, CandidateSettings(popular_overall=0, bought_before=1))
    assert _ids(catalog, capped.item_idx) == ["b", "e", "a"]


def test_cap_cuts_within_a_source_and_zeroes_later_sources(catalog: Catalog) -> None:
    user = _user(catalog, ["b", "c", "a"], ["c1", "c2"])
    result = generate_candidates(user, catalog, CandidateSettings(max_candidates=3))
    assert _ids(catalog, result.item_idx) == ["b", "a", "e"]
    assert result.sources == {"recent": 2, "bought_before": 0, "covisited": 1, "category_popular": 0, "popular": 0}

    result = generate_candidates(user, catalog, CandidateSettings(max_candidates=1))
    assert _ids(catalog, result.item_idx) == ["b"]
    assert result.sources == {"recent": 1, "bought_before": 0, "covisited": 0, "category_popular": 0, "popular": 0}


def test_per_neighbor_source_limits_neighbours_per_recent_item(catalog: Catalog) -> None:
    user = _user(catalog, ["a"], [])
    wide = generate_candidates(user, catalog, CandidateSettings(popular_overall=0))
    assert _ids(catalog, wide.item_idx) == ["a", "b", "d"]
    narrow = generate_candidates(user, catalog, CandidateSettings(per_neighbor_source=1, popular_overall=0))
    assert _ids(catalog, narrow.item_idx) == ["a", "b"]
    assert narrow.sources == {"recent": 1, "bought_before": 0, "covisited": 1, "category_popular": 0, "popular": 0}


def test_popular_per_category_and_unknown_categories(catalog: Catalog) -> None:
    user = _user(catalog, [], ["c2", "nope", "c1"])
    result = generate_candidates(user, catalog, CandidateSettings(popular_per_category=2, popular_overall=0))
    # c2 has only d available; c1's two most popular are a, f.
    assert _ids(catalog, result.item_idx) == ["d", "a", "f"]
    assert result.sources["category_popular"] == 3


def test_user_without_history_gets_popular_items(catalog: Catalog) -> None:
    user = UserState.from_row("stranger", {}, catalog)
    result = generate_candidates(user, catalog, CandidateSettings(popular_overall=3))
    assert _ids(catalog, result.item_idx) == ["a", "f", "b"]
    assert result.sources == {"recent": 0, "bought_before": 0, "covisited": 0, "category_popular": 0, "popular": 3}


def test_repeated_recent_item_appears_once(catalog: Catalog) -> None:
    user = _user(catalog, ["d", "d", "b", "d"], [])
    result = generate_candidates(user, catalog, CandidateSettings(popular_overall=0))
    assert _ids(catalog, result.item_idx) == ["d", "b", "a"]
    assert result.sources == {"recent": 2, "bought_before": 0, "covisited": 1, "category_popular": 0, "popular": 0}


def test_nothing_to_offer_gives_an_empty_set() -> None:
    catalog = Catalog.from_frame(pd.DataFrame({"item_id": ["x"], "item_available": [0]}))
    user = _user(catalog, ["x"], [])
    result = generate_candidates(user, catalog, CandidateSettings())
    assert result.item_idx.tolist() == []
    assert sum(result.sources.values()) == 0
