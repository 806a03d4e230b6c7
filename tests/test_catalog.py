"""Tests for the item catalog: feature matrix, availability, popularity orderings and neighbours."""

import numpy as np
import pandas as pd
import pytest

from propensity.catalog import ITEM_FEATURES, UNKNOWN, Catalog, as_list


def _frame() -> pd.DataFrame:
    """Six items in three categories; popularity comes from item_purchases_7d (x10) only."""
    return pd.DataFrame(
        {
            "item_id": ["a", "b", "c", "d", "e", "f"],
            "category_id": ["c1", "c1", "c2", "c2", None, "c1"],
            "item_price": [10.0, 20.0, 5.0, 8.0, 1.0, None],
            "item_available": [1, 1, 0, 1, 1, None],  # c is sold out; f unknown -> available
            "item_purchases_7d": [3, 1, 5, 1, 0, 2],
            "neighbor_item_ids": [["b", "zzz", "d"], ["a"], None, [], ["a", "c"], ["c", "a"]],
            "neighbor_scores": [[3.0, 9.0, 1.0], [2.0], None, [], None, [4.0, 1.0]],
        }
    )


@pytest.fixture()
def catalog() -> Catalog:
    return Catalog.from_frame(_frame())


def test_items_are_indexed_in_frame_order(catalog: Catalog) -> None:
    assert catalog.size == 6
    assert catalog.item_ids.tolist() == ["a", "b", "c", "d", "e", "f"]
    assert catalog.index == {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4, "f": 5}


def test_lookup_maps_unknown_items_to_the_nan_row(catalog: Catalog) -> None:
    idx = catalog.lookup(["d", "nope", "a"])
    assert idx.tolist() == [3, UNKNOWN, 0]
    assert idx.dtype == np.int64
    assert catalog.features.shape == (7, len(ITEM_FEATURES))
    assert np.isnan(catalog.features[idx[1]]).all()
    assert catalog.categories[UNKNOWN] is None
    assert catalog.lookup([]).tolist() == []


def test_feature_columns_follow_item_features_order_and_missing_columns_are_nan(catalog: Catalog) -> None:
    price = catalog.features[:6, ITEM_FEATURES.index("item_price")]
    np.testing.assert_array_equal(price, [10.0, 20.0, 5.0, 8.0, 1.0, np.nan])
    purchases = catalog.features[:6, ITEM_FEATURES.index("item_purchases_7d")]
    np.testing.assert_array_equal(purchases, [3, 1, 5, 1, 0, 2])
    assert np.isnan(catalog.features[:, ITEM_FEATURES.index("item_return_rate_30d")]).all()


def test_missing_availability_counts_as_available(catalog: Catalog) -> None:
    assert catalog.available.tolist() == [True, True, False, True, True, True]


def test_popular_order_skips_unavailable_items_and_breaks_ties_by_id(catalog: Catalog) -> None:
    np.testing.assert_array_equal(catalog.popularity, [30.0, 10.0, 50.0, 10.0, 0.0, 20.0])
    # c (50) is the most popular but sold out; b and d tie at 10: b first.
    assert catalog.item_ids[catalog.popular_order].tolist() == ["a", "f", "b", "d", "e"]


def test_popularity_rank_spans_zero_to_one_over_all_items(catalog: Catalog) -> None:
    # Full order including the unavailable item: c, a, f, b, d, e.
    np.testing.assert_allclose(catalog.popularity_rank, [0.2, 0.6, 0.0, 0.8, 1.0, 0.4])


def test_popularity_weights_purchases_over_carts_over_views() -> None:
    frame = pd.DataFrame({"item_id": ["x"]} | {name: [1.0] for name in ITEM_FEATURES})
    catalog = Catalog.from_frame(frame)
    assert catalog.popularity[0] == pytest.approx(10.0 + 3.0 + 2.0 + 0.5 + 0.3 + 0.1)


def test_neighbours_drop_unknown_items_and_keep_scores_aligned(catalog: Catalog) -> None:
    idx, scores = catalog.neighbours("neighbors", 0)  # a -> b (3), zzz (unknown, 9), d (1)
    assert idx.tolist() == [1, 3]
    assert scores.tolist() == [3.0, 1.0]
    assert [catalog.neighbours("neighbors", i)[0].tolist() for i in range(6)] == [[1, 3], [0], [], [], [0, 2], [2, 0]]
    assert catalog.neighbours("neighbors", UNKNOWN)[0].tolist() == []  # an unknown item (index -1) has no neighbours
    assert catalog.neighbours("neighbors", 4)[1].tolist() == [0.0, 0.0]  # ids without scores score 0
    assert catalog.neighbours("neighbors", 5)[1].tolist() == [4.0, 1.0]


def test_frame_without_neighbour_or_category_columns() -> None:
    catalog = Catalog.from_frame(pd.DataFrame({"item_id": ["x", "y"], "item_views_7d": [1, 2]}))
    assert [catalog.neighbours("neighbors", i)[0].tolist() for i in (0, 1, UNKNOWN)] == [[], [], []]
    assert catalog.item_factors is None and catalog.regularized_gram is None
    assert catalog.categories.tolist() == [None, None, None]
    assert catalog.item_ids[catalog.popular_order].tolist() == ["y", "x"]


def test_duplicate_item_rows_keep_the_last() -> None:
    frame = pd.DataFrame({"item_id": ["a", "b", "a"], "item_price": [1.0, 2.0, 3.0]})
    catalog = Catalog.from_frame(frame)
    assert sorted(catalog.item_ids.tolist()) == ["a", "b"]
    assert catalog.features[catalog.index["a"], ITEM_FEATURES.index("item_price")] == 3.0


def test_numeric_item_ids_become_strings() -> None:
    catalog = Catalog.from_frame(pd.DataFrame({"item_id": [7, 42]}))
    assert catalog.lookup(["42", "7", 7]).tolist() == [1, 0, UNKNOWN]


def test_empty_frame_gives_an_empty_catalog() -> None:
    catalog = Catalog.from_frame(pd.DataFrame({"item_id": []}))
    assert catalog.size == 0
    assert catalog.popular_order.tolist() == []
    assert catalog.features.shape == (1, len(ITEM_FEATURES))
    assert catalog.lookup(["a"]).tolist() == [UNKNOWN]


def test_as_list_normalises_feast_list_values() -> None:
    assert as_list(None) == ()
    assert as_list(float("nan")) == ()
    assert as_list(["a"]) == ["a"]
    assert as_list(np.array([1, 2])).tolist() == [1, 2]


def test_retrieval_tables_become_neighbour_lists_and_a_factor_matrix() -> None:
    frame = pd.DataFrame(
        {
            "item_id": ["a", "b", "c"],
            "category_id": ["k2", "k1", None],
            "item_purchases_7d": [3.0, 0.0, 1.0],
            "item_buyers_30d": [2.0, np.nan, 1.0],
            "copurchase_item_ids": [["b", "gone"], None, ["a"]],
            "copurchase_scores": [[0.5, 9.0], None, [0.25]],
            "content_item_ids": [["c"], ["a"], None],
            "content_scores": [[0.8], [0.1], None],
            "als_factors": [[1.0, 2.0], None, [0.5, -1.0]],
            "als_alpha": [5.0, 5.0, 5.0],
            "als_regularization": [0.1, None, 0.1],
        }
    )
    catalog = Catalog.from_frame(frame)
    assert catalog.neighbours("copurchase", 0)[0].tolist() == [1] and catalog.neighbours("copurchase", 0)[1].tolist() == [0.5]  # unknown id dropped
    assert catalog.neighbours("copurchase", 2)[0].tolist() == [0] and catalog.neighbours("content", 1)[0].tolist() == [0]
    assert catalog.neighbours("content", 2)[0].tolist() == [] and catalog.neighbours("copurchase", UNKNOWN)[0].tolist() == []
    np.testing.assert_array_equal(catalog.item_factors, [[1.0, 2.0], [0.0, 0.0], [0.5, -1.0], [0.0, 0.0]])
    assert catalog.has_factors.tolist() == [True, False, True, False]
    np.testing.assert_allclose(catalog.regularized_gram, catalog.item_factors.T @ catalog.item_factors + 0.1 * np.eye(2))
    assert catalog.als_alpha == 5.0 and catalog.als_regularization == 0.1
    assert catalog.category_names == ("k1", "k2")
    assert catalog.category_codes.tolist() == [1, 0, 2]  # no category: the extra code
    np.testing.assert_allclose(catalog.popularity_by_signal[1], np.log1p([3.0, 0.0, 1.0]))
    np.testing.assert_allclose(catalog.popularity_by_signal[2], np.log1p([2.0, 0.0, 1.0]))
