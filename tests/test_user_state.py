"""Tests for a user's state built from one feature row."""

import numpy as np
import pandas as pd
import pytest

from propensity.catalog import Catalog
from propensity.user_state import USER_SCALARS, USER_TIMESTAMPS, UserState

DAY = 86_400.0
NOW = 1_700_000_000.0


@pytest.fixture()
def catalog() -> Catalog:
    return Catalog.from_frame(
        pd.DataFrame({"item_id": ["a", "b", "c"], "category_id": ["c1", "c1", "c2"], "item_purchases_7d": [3, 1, 2]})
    )


def _row(**overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "user_id": "u1",
        "views_7d": 12,
        "avg_purchase_price_30d": 10.0,
        "age": None,
        "last_event_ts": int(NOW - 2 * DAY),
        "last_purchase_ts": None,
        "first_event_ts": int(NOW - 20 * DAY),
        "signup_ts": int(NOW - 100 * DAY),
        "top_category_ids": ["c1", "c2"],
        "top_category_shares": [0.75, 0.25],
        "recent_item_ids": ["b", "ghost", "c", "a"],
        "recent_item_views_7d": [2, 7, 1, 4],
        "recent_item_carts_7d": [1, 5, 0, 2],
        "recent_item_purchases_30d": [0, 1, 0, 1],
        "recent_item_in_cart": [1, 1, 0, 0],
        "recent_item_last_ts": [NOW - 1 * DAY, NOW - 1.5 * DAY, NOW - 3 * DAY, NOW - 5 * DAY],
    }
    row.update(overrides)
    return row


def test_scalars_follow_user_scalars_order_with_nan_for_missing(catalog: Catalog) -> None:
    user = UserState.from_row("u1", _row(), catalog)
    assert user.user_id == "u1"
    assert user.scalars.shape == (len(USER_SCALARS),)
    assert user.scalars[USER_SCALARS.index("views_7d")] == 12.0
    assert user.scalars[USER_SCALARS.index("avg_purchase_price_30d")] == 10.0
    assert np.isnan(user.scalars[USER_SCALARS.index("age")])  # None
    assert np.isnan(user.scalars[USER_SCALARS.index("views_30d")])  # absent from the row
    assert user.scalars.dtype == float


def test_timestamps_are_epoch_seconds_in_user_timestamps_order(catalog: Catalog) -> None:
    user = UserState.from_row("u1", _row(), catalog)
    assert len(USER_TIMESTAMPS) == 4
    np.testing.assert_array_equal(user.timestamps, [NOW - 2 * DAY, np.nan, NOW - 20 * DAY, NOW - 100 * DAY])


def test_unknown_recent_items_are_dropped_and_per_item_arrays_stay_aligned(catalog: Catalog) -> None:
    user = UserState.from_row("u1", _row(), catalog)
    assert catalog.item_ids[user.recent_idx].tolist() == ["b", "c", "a"]
    assert user.recent_views_7d.tolist() == [2, 1, 4]
    assert user.recent_carts_7d.tolist() == [1, 0, 2]
    assert user.recent_purchases_30d.tolist() == [0, 0, 1]
    assert user.recent_in_cart.tolist() == [1, 0, 0]
    assert user.recent_last_ts.tolist() == [NOW - DAY, NOW - 3 * DAY, NOW - 5 * DAY]


def test_most_bought_items_keep_their_counts_and_times_aligned(catalog: Catalog) -> None:
    row = _row(bought_item_ids=["c", "ghost", "a"], bought_item_counts=[5, 4, 2], bought_item_last_ts=[NOW - 40 * DAY, NOW, NOW - 90 * DAY])
    user = UserState.from_row("u1", row, catalog)
    assert catalog.item_ids[user.bought_idx].tolist() == ["c", "a"]
    assert user.bought_counts.tolist() == [5, 2]
    assert user.bought_last_ts.tolist() == [NOW - 40 * DAY, NOW - 90 * DAY]


def test_without_purchase_history_features_the_bought_lists_are_empty(catalog: Catalog) -> None:
    user = UserState.from_row("u1", _row(), catalog)  # a propensity_user_v1 row
    assert len(user.bought_idx) == len(user.bought_counts) == len(user.bought_last_ts) == 0


def test_per_item_array_of_the_wrong_length_becomes_missing_not_shifted(catalog: Catalog) -> None:
    user = UserState.from_row("u1", _row(recent_item_views_7d=[9, 9]), catalog)
    assert np.isnan(user.recent_views_7d).all() and len(user.recent_views_7d) == 3
    assert user.recent_carts_7d.tolist() == [1, 0, 2]


def test_numpy_list_values_from_feast_are_accepted(catalog: Catalog) -> None:
    row = _row(recent_item_ids=np.array(["a", "b"], dtype=object), recent_item_in_cart=np.array([0, 1]), top_category_ids=np.array(["c2"]))
    user = UserState.from_row("u1", row, catalog)
    assert user.recent_idx.tolist() == [0, 1]
    assert user.recent_in_cart.tolist() == [0, 1]
    assert user.top_categories == ("c2",)


def test_top_categories_are_strings_strongest_first(catalog: Catalog) -> None:
    user = UserState.from_row("u1", _row(), catalog)
    assert user.top_categories == ("c1", "c2")
    assert user.top_category_shares.tolist() == [0.75, 0.25]


def test_known_user_with_history(catalog: Catalog) -> None:
    user = UserState.from_row("u1", _row(), catalog)
    assert user.known
    assert user.has_history


def test_signed_up_user_without_events_is_known_without_history(catalog: Catalog) -> None:
    row = _row(last_event_ts=None, first_event_ts=None, recent_item_ids=None)
    user = UserState.from_row("u1", row, catalog)
    assert user.known
    assert not user.has_history
    assert len(user.recent_idx) == 0


def test_row_of_nones_is_an_unknown_user(catalog: Catalog) -> None:
    row = {name: None for name in _row()}
    user = UserState.from_row("stranger", row, catalog)
    assert not user.known
    assert not user.has_history
    assert np.isnan(user.scalars).all()
    assert np.isnan(user.timestamps).all()
    assert user.top_categories == ()
    assert len(user.top_category_shares) == 0
    assert len(user.recent_idx) == len(user.recent_in_cart) == len(user.recent_last_ts) == 0


def test_nan_presence_features_from_a_historical_join_mean_unknown(catalog: Catalog) -> None:
    user = UserState.from_row("u9", {"last_event_ts": float("nan"), "signup_ts": np.float64("nan"), "views_7d": 3}, catalog)
    assert not user.known
    assert user.scalars[USER_SCALARS.index("views_7d")] == 3.0


def test_unparseable_scalar_is_nan(catalog: Catalog) -> None:
    user = UserState.from_row("u1", _row(views_7d="lots"), catalog)
    assert np.isnan(user.scalars[USER_SCALARS.index("views_7d")])


def test_per_item_lists_a_shop_does_not_record_are_missing_not_zero() -> None:
    """A purchase-only shop has no views or carts: those per-item values must be NaN, never 0."""
    import numpy as np
    import pandas as pd

    from propensity.catalog import Catalog
    from propensity.user_state import UserState

    catalog = Catalog.from_frame(pd.DataFrame({"item_id": ["a", "b"], "item_purchases_30d": [1, 2]}))
    row = {
        "last_event_ts": 100,
        "recent_item_ids": ["b", "a"],
        "recent_item_views_7d": None,
        "recent_item_carts_7d": None,
        "recent_item_in_cart": None,
        "recent_item_purchases_30d": [1, 0],
        "recent_item_last_ts": [100, 50],
    }
    user = UserState.from_row("u", row, catalog)
    assert np.isnan(user.recent_views_7d).all() and np.isnan(user.recent_in_cart).all()
    assert user.recent_purchases_30d.tolist() == [1.0, 0.0]
