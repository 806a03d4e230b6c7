"""The data plane in process, over a real ModelPool of tiny LightGBM models in tmp_path: ranking order, scores that
fall with rank, candidate sources through the business rules, explained fallbacks, one model call per request."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from propensity.assembly import RANKER_FEATURES, USER_MODEL_FEATURES, pair_matrix
from propensity.candidates import generate_candidates
from propensity.catalog import Catalog
from propensity.model_registry import RANKER_MODEL, USER_MODEL, ModelBundle, apply_calibration, load_version, promote, save_version
from propensity.settings import CandidateSettings, ServerSettings
from propensity.user_state import UserState
from server.item_cache import StaticCatalog
from server.model_pool import ModelPool
from server.queries import Fallback, Recommendation, RecommendQuery
from server.recommender import FALLBACK_SOURCE, REQUEST_SOURCE, Recommender

NOW = time.time()
DAY = 86_400.0
N_ITEMS = 60
ITEM_COLUMNS = ("item_price", "item_views_7d", "item_purchases_7d", "item_carts_7d")


class _UserRows:
    def __init__(self, rows: dict[str, dict[str, object]]) -> None:
        self._rows = rows

    def fetch(self, user_ids: list[str]) -> list[dict[str, object]]:
        return [self._rows.get(u, {}) for u in user_ids]


def _ranker(rng: np.random.Generator) -> lgb.Booster:
    """A ranker whose score depends on item features, so items of one user get different raw scores."""
    x = rng.uniform(0, 100, size=(2000, len(RANKER_FEATURES)))
    signal = sum(x[:, RANKER_FEATURES.index(name)] * w for name, w in zip(ITEM_COLUMNS, (-0.02, 0.03, 0.05, 0.01)))
    y = (signal + rng.normal(scale=1.0, size=len(x)) > np.median(signal)).astype(int)
    params = {"objective": "binary", "verbosity": -1, "num_leaves": 16, "min_data_in_leaf": 10, "num_threads": 1, "seed": 2}
    return lgb.train(params, lgb.Dataset(x, y, feature_name=list(RANKER_FEATURES)), num_boost_round=30)


def _user_model(rng: np.random.Generator) -> lgb.Booster:
    x = rng.normal(size=(200, len(USER_MODEL_FEATURES)))
    y = (x[:, 0] > 0).astype(int)
    params = {"objective": "binary", "verbosity": -1, "num_leaves": 4, "min_data_in_leaf": 5, "num_threads": 1}
    return lgb.train(params, lgb.Dataset(x, y, feature_name=list(USER_MODEL_FEATURES)), num_boost_round=5)


def _steps(probabilities: np.ndarray) -> dict:
    """An isotonic map with three flat steps (at the terciles): it gives many items the same probability."""
    low, high = np.quantile(probabilities, [1 / 3, 2 / 3])
    return {"method": "isotonic", "x": [0.0, low, low + 1e-9, high, high + 1e-9, 1.0], "y": [0.02, 0.02, 0.1, 0.1, 0.3, 0.3], "input": "probability"}


@dataclass(frozen=True)
class World:
    root: Path
    catalog: Catalog
    rows: dict[str, dict[str, object]]
    bought_recently: str

    def recommender(self, **rules: object) -> Recommender:
        return Recommender(
            ModelPool(self.root, lambda bundle: None), _UserRows(self.rows), StaticCatalog(self.catalog), CandidateSettings(), ServerSettings(**rules)
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    rng = np.random.default_rng(7)
    ids = [f"i{k:02d}" for k in range(N_ITEMS)]
    frame = pd.DataFrame({"item_id": ids, "category_id": [f"c{k % 4}" for k in range(N_ITEMS)], "item_available": 1.0})
    for name in ITEM_COLUMNS:
        frame[name] = rng.uniform(0, 100, size=N_ITEMS).round(1)
    frame["neighbor_item_ids"] = [[ids[(k + j) % N_ITEMS] for j in (7, 11, 13)] for k in range(N_ITEMS)]
    frame["neighbor_scores"] = [[0.5, 0.3, 0.2]] * N_ITEMS
    catalog = Catalog.from_frame(frame)
    recent = ["i03", "i17", "i29", "i41", "i50"]
    rows = {
        "u1": {
            "last_event_ts": NOW - 3600, "first_event_ts": NOW - 40 * DAY, "signup_ts": NOW - 90 * DAY, "last_purchase_ts": NOW - 2 * DAY,
            "views_7d": 12, "carts_7d": 2, "purchases_30d": 1,
            "recent_item_ids": recent, "recent_item_views_7d": [3, 1, 2, 1, 4], "recent_item_carts_7d": [1, 0, 0, 0, 1],
            "recent_item_purchases_30d": [0, 1, 0, 0, 0], "recent_item_in_cart": [1, 0, 0, 0, 0],
            "recent_item_last_ts": [NOW - 3600, NOW - 2 * DAY, NOW - 3 * DAY, NOW - 5 * DAY, NOW - 6 * DAY],
            "bought_item_ids": ["i17", "i08", "i22"], "bought_item_counts": [1, 3, 2],
            "bought_item_last_ts": [NOW - 2 * DAY, NOW - 60 * DAY, NOW - 80 * DAY],
            "top_category_ids": ["c1", "c2"], "top_category_shares": [0.6, 0.4],
        },
        "profile-only": {"signup_ts": NOW - 5 * DAY, "age": 33},
    }
    ranker = _ranker(rng)
    anonymous = UserState.from_row("", {}, catalog)
    probabilities = np.concatenate([
        ranker.predict(pair_matrix(UserState.from_row(u, row, catalog), catalog, np.arange(N_ITEMS), NOW)) for u, row in rows.items()
    ] + [ranker.predict(pair_matrix(anonymous, catalog, np.arange(N_ITEMS), NOW))])
    metadata = {
        "version": "v1", "trained_at": "2024-01-01T00:00:00+00:00", "horizon_days": 7,
        "train_window": {"start": "2023-12-01", "end": "2023-12-22"},
        "feature_services": {"user": {"name": "users_v1", "fingerprint": "f1"}, "item": {"name": "items_v1", "fingerprint": "f2"}},
        "models": {
            USER_MODEL: {"feature_names": list(USER_MODEL_FEATURES), "metrics": {}, "base_rate": 0.125},
            RANKER_MODEL: {"feature_names": list(RANKER_FEATURES), "metrics": {}, "base_rate": 0.05, "calibration": _steps(probabilities)},
        },
    }
    root = tmp_path_factory.mktemp("models")
    save_version(root, "v1", {USER_MODEL: _user_model(rng), RANKER_MODEL: ranker}, metadata)
    promote(root, "v1")
    return World(root, catalog, rows, bought_recently="i17")


def _assert_reads_right(answer: Recommendation) -> None:
    """Scores never increase with rank; with explain, raw scores do not either and are what the scores came from."""
    scores = [item.score for item in answer.items]
    assert scores == sorted(scores, reverse=True), scores
    if answer.items and answer.items[0].contributions:  # raw scores (sums of contributions, to rounding) are the ranking order
        raws = [item.raw_score for item in answer.items]
        assert all(a >= b - 1e-9 for a, b in zip(raws, raws[1:])), raws
    assert all(item.candidate_source for item in answer.items)


def test_the_order_follows_the_raw_score_where_calibration_ties(world: World) -> None:
    recommender = world.recommender()
    everything = recommender.recommend(RecommendQuery("u1", num_items=100, explain=True))
    assert everything.fallback == Fallback.NONE and len(everything.items) > 30
    scores = [item.score for item in everything.items]
    raws = [item.raw_score for item in everything.items]
    assert len(set(scores)) <= 3 < len(set(raws))  # the isotonic steps tie items whose raw scores differ
    _assert_reads_right(everything)
    for k in (1, 4, 9, 20):  # a partial sort picks the same items in the same order
        top = recommender.recommend(RecommendQuery("u1", num_items=k))
        assert [i.item_id for i in top.items] == [i.item_id for i in everything.items[:k]]


def test_the_category_cap_keeps_the_raw_order(world: World) -> None:
    capped = world.recommender(max_items_per_category=2).recommend(RecommendQuery("u1", num_items=8, explain=True))
    assert len(capped.items) == 8
    assert max(pd.Series([world.catalog.categories[world.catalog.index[i.item_id]] for i in capped.items]).value_counts()) == 2
    _assert_reads_right(capped)


@pytest.mark.parametrize(("user", "reason"), [("stranger", Fallback.UNKNOWN_USER), ("profile-only", Fallback.NO_HISTORY)])
@pytest.mark.parametrize("cap", [0, 1])
def test_fallbacks_rank_popular_items_by_the_anonymous_raw_score_and_explain_them(world: World, user: str, reason: Fallback, cap: int) -> None:
    answer = world.recommender(max_items_per_category=cap, explain_top_features=1000).recommend(RecommendQuery(user, num_items=10, explain=True))
    assert answer.fallback == reason and len(answer.items) == (4 * cap if cap else 10)
    _assert_reads_right(answer)
    bundle = load_version(world.root, "v1")
    for item in answer.items:
        assert item.candidate_source == FALLBACK_SOURCE
        assert len(item.contributions) == len(RANKER_FEATURES)
        assert item.base_value + sum(c.contribution for c in item.contributions) == pytest.approx(item.raw_score, abs=1e-9)
        probability = 1 / (1 + np.exp(-item.raw_score))
        assert apply_calibration(bundle.calibration(RANKER_MODEL), np.array([probability]))[0] == pytest.approx(item.score, abs=1e-12)
    plain = world.recommender(max_items_per_category=cap).recommend(RecommendQuery(user, num_items=10))
    assert [i.item_id for i in plain.items] == [i.item_id for i in answer.items]
    assert all(not i.contributions for i in plain.items)


def test_a_deadline_fallback_reads_right_too(world: World) -> None:
    answer = world.recommender(deadline_floor_ms=10_000).recommend(RecommendQuery("u1", num_items=10, deadline_seconds=1.0, explain=True))
    assert answer.fallback == Fallback.DEADLINE and len(answer.items) == 10
    _assert_reads_right(answer)


def test_every_item_names_the_source_that_proposed_it_through_the_business_rules(world: World) -> None:
    user = UserState.from_row("u1", world.rows["u1"], world.catalog)
    generated = generate_candidates(user, world.catalog, CandidateSettings())
    source_of = dict(zip(world.catalog.item_ids[generated.item_idx], generated.item_sources))
    assert len(set(source_of.values())) >= 2
    excluded = tuple(world.catalog.item_ids[generated.item_idx[[1, 6, 15]]])
    # The opt-in repurchase rule and the exclusions remove items from the middle of the candidate list.
    answer = world.recommender(repurchase_window_days=30).recommend(RecommendQuery("u1", num_items=100, exclude_item_ids=excluded))
    returned = {item.item_id: item.candidate_source for item in answer.items}
    assert set(returned) == set(source_of) - set(excluded) - {world.bought_recently}
    assert returned == {item_id: source_of[item_id] for item_id in returned}
    requested = world.recommender().recommend(RecommendQuery("u1", num_items=5, candidate_item_ids=("i05", "i09", "not-an-item")))
    assert [i.candidate_source for i in requested.items] == [REQUEST_SOURCE] * 3


def test_recent_purchases_are_left_to_the_ranker_by_default(world: World) -> None:
    assert ServerSettings().repurchase_window_days == 0
    default = world.recommender().recommend(RecommendQuery("u1", num_items=100))
    assert world.bought_recently in {i.item_id for i in default.items}
    ruled = world.recommender(repurchase_window_days=30).recommend(RecommendQuery("u1", num_items=100))
    assert world.bought_recently not in {i.item_id for i in ruled.items}


def test_one_ranker_call_per_request_and_none_for_a_cached_fallback(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    score_items = ModelBundle.score_items
    monkeypatch.setattr(ModelBundle, "score_items", lambda self, features: calls.append(len(features)) or score_items(self, features))
    monkeypatch.setattr(ModelBundle, "predict_items", lambda self, features: pytest.fail("predict_items on the Recommend path"))
    recommender = world.recommender()
    recommender.recommend(RecommendQuery("u1", num_items=5))
    assert len(calls) == 1
    for stranger in ("s1", "s2", "s3"):
        recommender.recommend(RecommendQuery(stranger, num_items=5))
    assert len(calls) == 2  # the cold-start pool is scored once per model version and catalog


def test_a_repeated_candidate_id_is_ranked_once_and_exclusions_still_apply(world: World) -> None:
    answer = world.recommender().recommend(
        RecommendQuery("u1", num_items=10, candidate_item_ids=("i05", "i09", "i05", "not-an-item", "i09", "i12"), exclude_item_ids=("i12",))
    )
    returned = [item.item_id for item in answer.items]
    assert sorted(returned) == ["i05", "i09", "not-an-item"]
    generated = world.recommender().recommend(RecommendQuery("u1", num_items=100))
    assert len({item.item_id for item in generated.items}) == len(generated.items)
