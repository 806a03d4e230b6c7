"""Tests for model inputs: the user vector and the (user, item) ranker matrix."""

import numpy as np
import pandas as pd
import pytest

from propensity.assembly import (
    PAIR_FEATURES,
    RANKER_FEATURES,
    USER_DERIVED,
    USER_MODEL_FEATURES,
    pair_matrix,
    user_matrix,
    user_vector,
)
from propensity.catalog import ITEM_FEATURES, UNKNOWN, Catalog
from propensity.user_state import USER_SCALARS, UserState

DAY = 86_400.0
NOW = 1_700_000_000.0
A, B, C, D, E = 0, 1, 2, 3, 4


@pytest.fixture()
def catalog() -> Catalog:
    """Popularity (purchases x10): c 50, a 30, b 10, d 10, e 0 -> ranks a .25, b .5, c 0, d .75, e 1."""
    return Catalog.from_frame(
        pd.DataFrame(
            {
                "item_id": ["a", "b", "c", "d", "e"],
                "category_id": ["c1", "c1", "c2", "c2", None],
                "item_price": [10.0, 20.0, 5.0, 8.0, 1.0],
                "item_purchases_7d": [3, 1, 5, 1, 0],
                "neighbor_item_ids": [["b", "d"], ["a", "d"], ["e"], [], []],
                "neighbor_scores": [[3.0, 1.0], [2.0, 0.5], [7.0], [], []],
            }
        )
    )


def _row(**overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "views_7d": 12,
        "avg_purchase_price_30d": 10.0,
        "last_event_ts": NOW - 2 * DAY,
        "last_purchase_ts": None,
        "first_event_ts": NOW - 20 * DAY,
        "signup_ts": NOW - 100 * DAY,
        "top_category_ids": ["c1", "c2"],
        "top_category_shares": [0.75, 0.25],
        "recent_item_ids": ["b", "ghost", "a"],
        "recent_item_views_7d": [2, 9, 4],
        "recent_item_carts_7d": [1, 9, 2],
        "recent_item_purchases_30d": [0, 9, 1],
        "recent_item_in_cart": [1, 1, 0],
        "recent_item_last_ts": [NOW - 1 * DAY, NOW - 1.5 * DAY, NOW - 5 * DAY],
    }
    row.update(overrides)
    return row


@pytest.fixture()
def user(catalog: Catalog) -> UserState:
    return UserState.from_row("u1", _row(), catalog)


def _col(matrix: np.ndarray, name: str) -> np.ndarray:
    return matrix[:, RANKER_FEATURES.index(name)]


def test_feature_name_tuples_are_unique_and_concatenated() -> None:
    assert USER_MODEL_FEATURES == USER_SCALARS + USER_DERIVED
    assert RANKER_FEATURES == USER_MODEL_FEATURES + ITEM_FEATURES + PAIR_FEATURES
    assert len(set(RANKER_FEATURES)) == len(RANKER_FEATURES)


def test_user_vector_derives_ages_and_counts(user: UserState) -> None:
    vector = user_vector(user, NOW)
    assert vector.shape == (len(USER_MODEL_FEATURES),)
    named = dict(zip(USER_MODEL_FEATURES, vector))
    assert named["days_since_last_event"] == pytest.approx(2.0)
    assert np.isnan(named["days_since_last_purchase"])
    assert named["days_since_first_event"] == pytest.approx(20.0)
    assert named["account_age_days"] == pytest.approx(100.0)
    assert named["n_recent_items"] == 2.0  # the unknown item is not counted
    assert named["n_items_in_cart"] == 1.0
    assert named["top_category_share"] == 0.75
    assert named["views_7d"] == 12.0
    assert np.isnan(named["views_30d"])


def test_user_vector_of_unknown_user_is_nan_except_counts(catalog: Catalog) -> None:
    vector = user_vector(UserState.from_row("x", {}, catalog), NOW)
    named = dict(zip(USER_MODEL_FEATURES, vector))
    assert named["n_recent_items"] == 0.0
    assert named["n_items_in_cart"] == 0.0
    others = [v for k, v in named.items() if k not in ("n_recent_items", "n_items_in_cart")]
    assert np.isnan(others).all()


def test_user_matrix_with_one_or_many_as_of_times(catalog: Catalog, user: UserState) -> None:
    stranger = UserState.from_row("x", {}, catalog)
    one = user_matrix([user, stranger], NOW)
    assert one.shape == (2, len(USER_MODEL_FEATURES))
    np.testing.assert_array_equal(one[0], user_vector(user, NOW))
    many = user_matrix([user, user], [NOW, NOW + DAY])
    days = USER_MODEL_FEATURES.index("days_since_last_event")
    assert many[:, days].tolist() == pytest.approx([2.0, 3.0])
    assert user_matrix([], NOW).shape == (0, len(USER_MODEL_FEATURES))


def test_pair_matrix_layout(catalog: Catalog, user: UserState) -> None:
    idx = np.array([B, A, D, UNKNOWN, E])
    matrix = pair_matrix(user, catalog, idx, NOW)
    assert matrix.shape == (5, len(RANKER_FEATURES))
    n_user, n_item = len(USER_MODEL_FEATURES), len(ITEM_FEATURES)
    np.testing.assert_array_equal(matrix[:, :n_user], np.tile(user_vector(user, NOW), (5, 1)))
    np.testing.assert_array_equal(matrix[:, n_user : n_user + n_item], catalog.features[idx])
    np.testing.assert_array_equal(pair_matrix(user, catalog, idx, NOW, user_row=user_vector(user, NOW)), matrix)


def test_recent_carted_item_gets_its_per_item_state(catalog: Catalog, user: UserState) -> None:
    matrix = pair_matrix(user, catalog, np.array([B, A, D]), NOW)
    assert _col(matrix, "ui_in_cart").tolist() == [1.0, 0.0, 0.0]
    assert _col(matrix, "ui_carts_7d").tolist() == [1.0, 2.0, 0.0]
    assert _col(matrix, "ui_views_7d").tolist() == [2.0, 4.0, 0.0]
    assert _col(matrix, "ui_purchases_30d").tolist() == [0.0, 1.0, 0.0]
    # Rank among the catalog-known recent items (the unknown one was dropped).
    np.testing.assert_array_equal(_col(matrix, "ui_recent_rank"), [0.0, 1.0, np.nan])


def test_times_bought_and_days_since_bought_come_from_the_whole_history(catalog: Catalog) -> None:
    row = _row(bought_item_ids=["d", "a"], bought_item_counts=[6, 1], bought_item_last_ts=[NOW - 45 * DAY, NOW - 5 * DAY])
    matrix = pair_matrix(UserState.from_row("u1", row, catalog), catalog, np.array([D, A, B, UNKNOWN]), NOW)
    assert _col(matrix, "ui_times_bought").tolist() == [6.0, 1.0, 0.0, 0.0]
    np.testing.assert_allclose(_col(matrix, "ui_days_since_bought"), [45.0, 5.0, np.nan, np.nan])
    # d was bought 45 days ago: outside the 30-day recent list, so only the history knows it.
    assert _col(matrix, "ui_purchases_30d")[0] == 0.0


def test_days_since_last_is_measured_from_the_as_of_time(catalog: Catalog, user: UserState) -> None:
    idx = np.array([B, A, D])
    np.testing.assert_allclose(_col(pair_matrix(user, catalog, idx, NOW), "ui_days_since_last"), [1.0, 5.0, np.nan])
    np.testing.assert_allclose(_col(pair_matrix(user, catalog, idx, NOW + 2 * DAY), "ui_days_since_last"), [3.0, 7.0, np.nan])


def test_category_share_and_rank_map_each_candidates_category(catalog: Catalog, user: UserState) -> None:
    matrix = pair_matrix(user, catalog, np.array([A, C, E, UNKNOWN]), NOW)
    # a in c1 (first favourite), c in c2 (second), e has no category, unknown item has none either.
    np.testing.assert_array_equal(_col(matrix, "ui_category_share"), [0.75, 0.25, np.nan, np.nan])
    np.testing.assert_array_equal(_col(matrix, "ui_category_rank"), [0.0, 1.0, np.nan, np.nan])
    other = UserState.from_row("u2", _row(top_category_ids=["c2"], top_category_shares=[1.0]), catalog)
    matrix = pair_matrix(other, catalog, np.array([A, C]), NOW)
    np.testing.assert_array_equal(_col(matrix, "ui_category_share"), [0.0, 1.0])  # not a favourite: 0
    np.testing.assert_array_equal(_col(matrix, "ui_category_rank"), [np.nan, 0.0])


def test_covisit_score_sums_over_recent_items(catalog: Catalog, user: UserState) -> None:
    # recent b -> a 2.0, d 0.5; recent a -> b 3.0, d 1.0; the retrieval signal is log(1 + sum).
    matrix = pair_matrix(user, catalog, np.array([A, B, C, D, E]), NOW)
    np.testing.assert_allclose(_col(matrix, "ui_covisit_score"), np.log1p([2.0, 3.0, 0.0, 1.5, 0.0]))


def test_intent_features_summarise_the_recent_items(catalog: Catalog, user: UserState) -> None:
    row = dict(zip(USER_MODEL_FEATURES, user_vector(user, NOW)))
    views, carts, in_cart = user.recent_views_7d, user.recent_carts_7d, user.recent_in_cart > 0
    assert row["max_item_views_7d"] == views.max() and row["max_item_carts_7d"] == carts.max()
    assert row["n_items_carted_7d"] == (carts > 0).sum()
    if in_cart.any():
        assert row["in_cart_max_views_7d"] == views[in_cart].max()
        assert row["days_since_last_in_cart_item"] == pytest.approx((NOW - user.recent_last_ts[in_cart].max()) / 86_400)
    else:
        assert np.isnan(row["in_cart_max_views_7d"]) and np.isnan(row["days_since_last_in_cart_item"])


def test_price_ratio_and_popularity_rank(catalog: Catalog, user: UserState) -> None:
    matrix = pair_matrix(user, catalog, np.array([A, B, D, UNKNOWN]), NOW)
    np.testing.assert_allclose(_col(matrix, "ui_price_ratio"), [1.0, 2.0, 0.8, np.nan])
    np.testing.assert_allclose(_col(matrix, "item_popularity_rank"), [0.25, 0.5, 0.75, np.nan])
    no_price = UserState.from_row("u2", _row(avg_purchase_price_30d=None), catalog)
    assert np.isnan(_col(pair_matrix(no_price, catalog, np.array([A]), NOW), "ui_price_ratio")).all()


def test_unknown_candidate_gets_nan_item_features_and_no_user_item_state(catalog: Catalog, user: UserState) -> None:
    matrix = pair_matrix(user, catalog, np.array([UNKNOWN]), NOW)
    n_user, n_item = len(USER_MODEL_FEATURES), len(ITEM_FEATURES)
    assert np.isnan(matrix[0, n_user : n_user + n_item]).all()
    for name in ("ui_views_7d", "ui_carts_7d", "ui_purchases_30d", "ui_in_cart"):
        assert _col(matrix, name)[0] == 0.0
    for name in ("ui_days_since_last", "ui_recent_rank", "ui_category_share", "ui_price_ratio", "item_popularity_rank"):
        assert np.isnan(_col(matrix, name)[0])


def test_user_without_history_and_no_candidates(catalog: Catalog) -> None:
    stranger = UserState.from_row("x", {}, catalog)
    matrix = pair_matrix(stranger, catalog, np.array([A, E]), NOW)
    assert _col(matrix, "ui_views_7d").tolist() == [0.0, 0.0]
    assert np.isnan(_col(matrix, "ui_days_since_last")).all()
    np.testing.assert_array_equal(_col(matrix, "ui_category_share"), [0.0, np.nan])
    assert pair_matrix(stranger, catalog, np.empty(0, dtype=np.int64), NOW).shape == (0, len(RANKER_FEATURES))
