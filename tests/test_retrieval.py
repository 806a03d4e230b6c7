"""Tests for the retrieval signals, the two-segment retrieval weights and their non-negative fit."""

import numpy as np
import pandas as pd
import pytest

from propensity.catalog import UNKNOWN, Catalog
from propensity.retrieval import DEFAULT_WEIGHTS, SIGNALS, SOURCE_OF_SIGNAL, RetrievalWeights, fold_in, known_items, stored_weights, user_signals
from propensity.user_state import UserState
from training.retrieval_fit import fit_retrieval_weights, nonnegative_logistic

NOW = 1_700_000_000.0
DAY = 86_400.0


@pytest.fixture()
def catalog() -> Catalog:
    return Catalog.from_frame(
        pd.DataFrame(
            {
                "item_id": ["a", "b", "c", "d"],
                "category_id": ["k1", "k1", "k2", None],
                "item_purchases_7d": [4.0, 0.0, 1.0, 0.0],
                "neighbor_item_ids": [["b"], ["c"], None, None],
                "neighbor_scores": [[2.0], [1.0], None, None],
                "copurchase_item_ids": [["c"], None, ["d"], None],
                "copurchase_scores": [[0.5], None, [3.0], None],
                "content_item_ids": [None, ["d"], None, None],
                "content_scores": [None, [0.9], None, None],
                "als_factors": [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], None],
                "als_alpha": 2.0,
                "als_regularization": 0.1,
            }
        )
    )


@pytest.fixture()
def user(catalog: Catalog) -> UserState:
    row = {
        "last_event_ts": NOW - DAY,
        "recent_item_ids": ["b", "a"],
        "recent_item_views_7d": [2, 1],
        "recent_item_carts_7d": [1, 0],
        "recent_item_purchases_30d": [0, 0],
        "recent_item_in_cart": [1, 0],
        "recent_item_last_ts": [NOW - 7 * DAY, NOW - 14 * DAY],
        "bought_item_ids": ["c"],
        "bought_item_counts": [3],
        "bought_item_last_ts": [NOW - 60 * DAY],
        "top_category_ids": ["k1", "k2"],
        "top_category_shares": [0.75, 0.25],
    }
    return UserState.from_row("u", row, catalog)


def _signal(values: np.ndarray, item: int, name: str) -> float:
    return float(values[item, SIGNALS.index(name)])


def test_signals_of_the_users_own_items(catalog: Catalog, user: UserState) -> None:
    values = user_signals(user, catalog, NOW).values
    a, b, c, d = range(4)
    assert _signal(values, b, "recent") == 1.0 and _signal(values, c, "recent") == 0.0
    assert _signal(values, b, "in_cart") == 1.0 and _signal(values, a, "in_cart") == 0.0
    assert _signal(values, b, "recent_recency") == pytest.approx(0.5)  # 7 days at a 7-day half-life
    assert _signal(values, a, "recent_recency") == pytest.approx(0.25)
    assert _signal(values, c, "bought") == pytest.approx(np.log1p(3))
    assert _signal(values, c, "bought_recency") == pytest.approx(0.5)  # 60 days at a 60-day half-life
    assert _signal(values, c, "bought_decayed") == pytest.approx(np.log1p(1.5))
    assert _signal(values, a, "category") == 0.75 and _signal(values, c, "category") == 0.25 and _signal(values, d, "category") == 0.0
    assert _signal(values, a, "purchases_7d") == pytest.approx(np.log1p(4.0))
    assert not values[UNKNOWN].any()  # the UNKNOWN row stays empty


def test_neighbour_signals_are_weighted_by_the_users_interactions(catalog: Catalog, user: UserState) -> None:
    values = user_signals(user, catalog, NOW).values
    a, b, c, d = range(4)
    # Co-visitation from recent items b (-> c 1.0) and a (-> b 2.0), unweighted.
    assert _signal(values, c, "covisited") == pytest.approx(np.log1p(1.0))
    assert _signal(values, b, "covisited") == pytest.approx(np.log1p(2.0))
    # Co-purchase from every interacted item, weighted: a (view, weight 1) -> c 0.5; c (bought 3x, 60 days: 5 x 3 x 0.5) -> d 3.0.
    assert _signal(values, c, "copurchase") == pytest.approx(np.log1p(1.0 * 0.5))
    assert _signal(values, d, "copurchase") == pytest.approx(np.log1p(7.5 * 3.0))
    # Content from b (views 2 + cart 3 = weight 5) -> d 0.9.
    assert _signal(values, d, "content") == pytest.approx(np.log1p(5.0 * 0.9))


def test_als_signal_is_the_folded_in_vector_times_the_item_factors(catalog: Catalog, user: UserState) -> None:
    values = user_signals(user, catalog, NOW).values
    y = catalog.item_factors[:3]
    weights = np.array([1.0, 5.0, 7.5])  # a: a view; b: 2 views + a cart; c: 5 x 3 purchases x 0.5 decay
    confidence = 2.0 * weights
    a_matrix = y.T @ y + (y.T * (confidence - 1.0)) @ y + 0.1 * np.eye(2)
    vector = np.linalg.solve(a_matrix, y.T @ confidence)
    np.testing.assert_allclose(values[:4, SIGNALS.index("als")], catalog.item_factors[:4] @ vector)
    assert values[3, SIGNALS.index("als")] == 0.0  # d has no factors


def test_fold_in_without_regularisation_on_a_singular_system_still_answers() -> None:
    # No regularisation and factors that span one axis only: the system has a zero pivot, Cholesky fails.
    catalog = Catalog.from_frame(pd.DataFrame({"item_id": ["a", "b"], "als_factors": [[1.0, 0.0], [2.0, 0.0]], "als_alpha": 1.0,
                                               "als_regularization": 0.0}))
    vector = fold_in(catalog, np.array([0]), np.array([3.0]))
    # The minimum-norm least-squares solution: (5 + 2) x0 = 3, nothing along the axis no item uses.
    np.testing.assert_allclose(vector, [3.0 / 7.0, 0.0], atol=1e-12)


def test_user_without_items_gets_only_item_level_signals(catalog: Catalog, user: UserState) -> None:
    user_specific = [SIGNALS.index(s) for s in SIGNALS if s not in ("popularity", "purchases_7d", "buyers_30d")]
    for _ in range(3):  # after a user with items: the signal buffer is not zero-filled whole, so no row may keep old values
        assert user_signals(user, catalog, NOW).values[:, user_specific].any()
        values = user_signals(UserState.from_row("x", {}, catalog), catalog, NOW).values
        assert not values[:, user_specific].any()
        assert not values[-1].any()  # the UNKNOWN row


def test_catalog_scores_and_sources_equal_the_per_row_definition() -> None:
    rng = np.random.default_rng(7)
    values = rng.exponential(size=(400, len(SIGNALS))) * (rng.random((400, len(SIGNALS))) < 0.4)
    values[rng.random(400) < 0.8, SIGNALS.index("recent")] = 0.0
    values[rng.random(400) < 0.8, SIGNALS.index("bought")] = 0.0
    values[:5] = 0.0  # rows no source speaks for
    weights = RetrievalWeights(rng.random(len(SIGNALS)), -1.0, rng.random(len(SIGNALS)), -3.0)
    known = (values[:, SIGNALS.index("recent")] > 0) | (values[:, SIGNALS.index("bought")] > 0)
    assert 0 < known.sum() < len(known)
    expected = np.where(known, values @ weights.known - 1.0, values @ weights.new - 3.0)
    np.testing.assert_allclose(weights.score(values), expected)
    np.testing.assert_allclose(weights.score_by_signal(np.ascontiguousarray(values.T)), expected)
    names = list(dict.fromkeys(SOURCE_OF_SIGNAL.values()))
    for row, source in zip(values, weights.sources(values)):
        contribution = row * (weights.known if row[SIGNALS.index("recent")] > 0 or row[SIGNALS.index("bought")] > 0 else weights.new)
        per_source = {name: sum(c for c, signal in zip(contribution, SIGNALS) if SOURCE_OF_SIGNAL[signal] == name) for name in names}
        best = max(names, key=lambda name: per_source[name])  # the first of equals, as argmax
        assert source == (best if per_source[best] > 0 else "popular")


def test_weights_round_trip_and_score_each_segment_with_its_own_weights() -> None:
    zero = {name: 0.0 for name in SIGNALS}
    weights = RetrievalWeights.from_json({"known": zero | {"bought": 2.0, "intercept": -1.0}, "new": zero | {"als": 3.0, "intercept": 0.5}})
    again = RetrievalWeights.from_json(weights.to_json())
    np.testing.assert_allclose(again.known, weights.known)
    np.testing.assert_allclose(again.new, weights.new)
    assert (again.known_intercept, again.new_intercept) == (-1.0, 0.5)
    values = np.zeros((2, len(SIGNALS)))
    values[0, SIGNALS.index("bought")] = 1.0  # known
    values[0, SIGNALS.index("als")] = 1.0
    values[1, SIGNALS.index("als")] = 1.0  # new
    assert known_items(values).tolist() == [True, False]
    np.testing.assert_allclose(weights.score(values), [2.0 - 1.0, 3.0 + 0.5])
    assert weights.sources(values).tolist() == ["bought_before", "als"]


def test_defaults_apply_when_a_model_has_no_fitted_weights() -> None:
    assert stored_weights({"version": "old"}) is None
    defaults = RetrievalWeights.from_json(None)
    assert defaults.known[SIGNALS.index("recent")] == DEFAULT_WEIGHTS["recent"]
    stored = {"known": {"als": 1.0}, "new": {"als": 2.0}}
    assert stored_weights({"retrieval": {"weights": stored}}) == stored


def test_nonnegative_logistic_keeps_every_signal_as_evidence_for_an_item() -> None:
    rng = np.random.default_rng(0)
    signal = rng.normal(size=5000)
    copy = signal + rng.normal(scale=0.05, size=5000)  # a near-duplicate source
    y = rng.random(5000) < 1 / (1 + np.exp(-(2.0 * signal - 1.0)))
    weights, intercept = nonnegative_logistic(np.column_stack([signal, copy, -signal]), y)
    assert (weights >= 0).all()
    assert weights[:2].sum() == pytest.approx(2.0, abs=0.3)  # the two copies share the true weight
    assert weights[2] == pytest.approx(0.0, abs=1e-6)  # a signal that speaks against buying gets no weight
    assert intercept == pytest.approx(-1.0, abs=0.2)


def _fit_inputs(cutoffs: list[pd.Timestamp], n_users: int = 60) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Buyers who buy their most recent item and the most popular item they have not touched, at each cut-off."""
    rng = np.random.default_rng(3)
    items = [f"i{k:02d}" for k in range(40)]
    catalog = Catalog.from_frame(pd.DataFrame({"item_id": items, "item_purchases_7d": np.arange(40, 0, -1, dtype=float)}))
    rows, features = [], []
    for cutoff in cutoffs:
        for u in range(n_users):
            recent = [items[k] for k in rng.choice(np.arange(10, 40), 5, replace=False)]
            features.append({"user_id": f"u{u}", "event_timestamp": cutoff, "last_event_ts": cutoff.timestamp() - DAY,
                             "recent_item_ids": recent, "recent_item_last_ts": [cutoff.timestamp() - DAY * (k + 1) for k in range(5)]})
            rows.append({"user_id": f"u{u}", "event_timestamp": cutoff, "label": 1, "bought_items": [recent[0], items[0]]})
    return pd.DataFrame(rows), pd.DataFrame(features), {c: catalog for c in cutoffs}


def test_fitted_retrieval_weights_find_the_signals_that_predict_purchases() -> None:
    train, test = pd.Timestamp("2024-01-08", tz="UTC"), pd.Timestamp("2024-01-15", tz="UTC")
    rows, features, catalogs = _fit_inputs([train])
    fitted = fit_retrieval_weights(rows, features, catalogs, [train.to_pydatetime()], progress=lambda _m: None)
    known, new = fitted["weights"]["known"], fitted["weights"]["new"]
    assert all(v >= 0 for segment in (known, new) for name, v in segment.items() if name != "intercept")
    assert known["recent_recency"] > 0  # the most recent of the user's items is the one bought
    assert new["purchases_7d"] > 0 or new["popularity"] > 0  # among new items, the most popular one is bought
    # Only training cut-offs count: buyers at another cut-off with other purchases change nothing.
    more_rows, more_features, more_catalogs = _fit_inputs([train, test])
    more_rows.loc[more_rows["event_timestamp"] == test, "bought_items"] = [["i39"]] * int((more_rows["event_timestamp"] == test).sum())
    again = fit_retrieval_weights(more_rows, more_features, more_catalogs, [train.to_pydatetime()], progress=lambda _m: None)
    assert again["weights"] == fitted["weights"]


def test_too_few_buyers_keep_the_default_weights() -> None:
    train = pd.Timestamp("2024-01-08", tz="UTC")
    rows, features, catalogs = _fit_inputs([train], n_users=3)
    fitted = fit_retrieval_weights(rows, features, catalogs, [train.to_pydatetime()], progress=lambda _m: None)
    defaults = RetrievalWeights.from_json(None).to_json()
    assert fitted["weights"] == defaults and fitted["positives"] == 6
