"""The ranking stage: order by raw score with deterministic ties, the category cap, scores that fall with rank."""

from __future__ import annotations

import numpy as np

from server.ranking import best_positions, non_increasing, top_k


def test_top_k_breaks_ties_by_position() -> None:
    scores = np.array([0.5, 0.9, 0.5, 0.9, 0.1, 0.5, 0.9])
    assert top_k(scores, 2).tolist() == [1, 3]
    assert top_k(scores, 4).tolist() == [1, 3, 6, 0]
    assert top_k(scores, 5).tolist() == [1, 3, 6, 0, 2]
    assert top_k(scores, 10).tolist() == [1, 3, 6, 0, 2, 5, 4]
    rng = np.random.default_rng(0)
    many = rng.integers(0, 20, size=500).astype(float)
    for k in (1, 7, 50, 499):
        assert top_k(many, k).tolist() == np.argsort(-many, kind="stable")[:k].tolist()


def test_the_category_cap_skips_items_of_full_categories_in_raw_order() -> None:
    raw = np.array([3.0, 2.5, 2.0, 1.0, 0.5, 0.4])
    categories = np.array(["a", "a", "a", "b", None, None], dtype=object)
    assert best_positions(raw, categories, 4, per_category=2).tolist() == [0, 1, 3, 4]
    assert best_positions(raw, categories, 10, per_category=1).tolist() == [0, 3, 4, 5]  # unknown categories are never capped
    assert best_positions(raw, categories, 3).tolist() == [0, 1, 2]


def test_scores_in_rank_order_never_increase() -> None:
    assert non_increasing(np.array([0.3, 0.3000000000000001, 0.1, 0.2])).tolist() == [0.3, 0.3, 0.1, 0.1]
    assert non_increasing(np.empty(0)).shape == (0,)
