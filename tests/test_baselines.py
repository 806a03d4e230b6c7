"""Tests for the ranking baselines on a tiny hand-made shop with known answers."""

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from propensity.catalog import Catalog
from propensity.user_state import UserState
from training import baselines

# Popularity order (purchases_7d): a > b > c > d > e > f; categories: a, c, e in "x"; b, d, f in "y".
ITEMS = pd.DataFrame(
    {
        "item_id": list("abcdef"),
        "category_id": ["x", "y", "x", "y", "x", "y"],
        "item_purchases_7d": [60.0, 50, 40, 30, 20, 10],
        "item_available": [1.0] * 6,
        "neighbor_item_ids": [["f", "e"], None, None, None, None, ["d"]],
        "neighbor_scores": [[5.0, 1.0], None, None, None, None, [3.0]],
    }
)


def _catalog() -> Catalog:
    return Catalog.from_frame(ITEMS)


def _user(catalog: Catalog, recent: list[str], categories: list[str], shares: list[float]) -> UserState:
    row = {"last_event_ts": 1.0, "recent_item_ids": recent, "top_category_ids": categories, "top_category_shares": shares}
    return UserState.from_row("u1", row, catalog)


def test_global_popularity_is_the_same_top_items_for_everyone() -> None:
    assert baselines.global_popularity(_catalog(), 3) == ["a", "b", "c"]


def test_category_popularity_prefers_the_users_categories_by_share() -> None:
    catalog = _catalog()
    user = _user(catalog, [], ["y"], [1.0])
    assert baselines.category_popularity(user, catalog, 4) == ["b", "d", "f", "a"]  # then filled with popular


def test_covisitation_ranks_neighbours_of_recent_items_by_summed_score() -> None:
    catalog = _catalog()
    user = _user(catalog, ["a", "f"], [], [])
    # a -> f (5), e (1); f -> d (3): f 5, d 3, e 1, then popular a, b
    assert baselines.covisitation(user, catalog, 5) == ["f", "d", "e", "a", "b"]


def test_buy_again_ranks_own_purchases_then_fills_with_popular() -> None:
    assert baselines.buy_again(["e", "c", "unknown"], _catalog(), 4) == ["e", "c", "a", "b"]


def test_purchase_history_counts_only_purchases_before_the_cutoff(tmp_path: Path) -> None:
    t = lambda day: datetime(2024, 1, day, tzinfo=timezone.utc)  # noqa: E731
    events = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u1", "u1", "u1", "u2"],
            "item_id": ["a", "b", "b", "c", "a", "a"],
            "event_type": ["purchase", "purchase", "purchase", "view", "purchase", "purchase"],
            "event_time": [t(1), t(2), t(3), t(3), t(9), t(1)],
        }
    )
    events.to_parquet(tmp_path / "events.parquet")
    history = baselines.purchase_history(tmp_path, ["u1"], t(5))
    assert history == {"u1": ["b", "a"]}  # b twice; a's second purchase is after the cut-off; c only viewed; u2 not asked


def test_mlp_baseline_learns_a_simple_signal() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 4))
    x[rng.uniform(size=x.shape) < 0.1] = np.nan
    y = (np.nan_to_num(x[:, 0]) + 0.3 * rng.normal(size=2000) > 0.5).astype(int)
    model = baselines.fit_mlp(x[:1500], y[:1500])
    p = baselines.predict_mlp(model, x[1500:])
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y[1500:], p) > 0.85


def _shopper(catalog: Catalog, recent: list[str], in_cart: list[float], views: list[float], last_ts: list[float]) -> UserState:
    row = {
        "last_event_ts": 1.0,
        "recent_item_ids": recent,
        "recent_item_in_cart": in_cart,
        "recent_item_views_7d": views,
        "recent_item_last_ts": last_ts,
    }
    return UserState.from_row("u1", row, catalog)


def test_recent_interactions_lists_cart_items_by_recency_then_other_items_by_recency_then_views() -> None:
    catalog = _catalog()
    # Most recent first, as the feature build lists them: f and d still in the cart (d more recent);
    # e and b viewed at the same time (b more often), a longest ago.
    user = _shopper(catalog, ["d", "e", "b", "f", "a"], in_cart=[1, 0, 0, 1, 0], views=[1, 1, 4, 2, 9], last_ts=[50, 40, 40, 30, 10])
    assert baselines.recent_interactions(user, catalog, 10) == ["d", "f", "b", "e", "a"]
    assert baselines.recent_interactions(user, catalog, 3) == ["d", "f", "b"]


def test_recent_interactions_keeps_list_order_when_times_are_missing_and_skips_unavailable_and_unknown_items() -> None:
    catalog = Catalog.from_frame(ITEMS.assign(item_available=[1.0, 1.0, 0.0, 1.0, 1.0, 1.0]))  # c no longer sold
    user = _shopper(catalog, ["e", "c", "zz", "a"], in_cart=[0, 1, 1, 0], views=[1, 1, 1, 1], last_ts=[float("nan")] * 4)
    assert baselines.recent_interactions(user, catalog, 10) == ["e", "a"]
    assert baselines.recent_interactions(_user(catalog, [], [], []), catalog, 10) == []


def test_recent_interactions_popularity_fill_tops_up_with_popular_items_not_listed() -> None:
    catalog = _catalog()
    user = _shopper(catalog, ["c", "a"], in_cart=[0, 0], views=[1, 1], last_ts=[20, 10])
    assert baselines.recent_interactions_popularity_fill(user, catalog, 4) == ["c", "a", "b", "d"]
    assert baselines.recent_interactions_popularity_fill(user, catalog, 1) == ["c"]
    assert baselines.recent_interactions_popularity_fill(_user(catalog, [], [], []), catalog, 3) == ["a", "b", "c"]
