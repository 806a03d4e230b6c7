"""The data plane: features -> candidates -> business rules -> scores -> ranked answer. Knows nothing about gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from propensity.assembly import RANKER_FEATURES, pair_matrix, user_matrix, user_vector
from propensity.candidates import generate_candidates
from propensity.retrieval import RetrievalWeights, UserSignals, stored_weights
from propensity.catalog import Catalog
from propensity.pseudonyms import pseudonymise
from propensity.model_registry import RANKER_MODEL, USER_MODEL, ModelBundle
from propensity.settings import CandidateSettings, ServerSettings
from propensity.user_state import UserBatch, UserState
from server.model_pool import ModelPool
from server.online_features import OnlineUserFeatures
from server.queries import (
    Contribution,
    Fallback,
    ItemScores,
    ModelDescription,
    ModelsInfo,
    Recommendation,
    RecommendQuery,
    ScoredItem,
    UserScores,
    ViewFreshness,
)
from server.ranking import best_positions, non_increasing, top_k
from server.store_reads import StoreUnavailable

log = logging.getLogger(__name__)
DAY_SECONDS = 86_400.0
# Candidate sources of items the generator did not propose: the caller's candidate_item_ids, the fallback's pool.
REQUEST_SOURCE = "request"
FALLBACK_SOURCE = "popular"


class Observer(Protocol):
    """What the data plane reports (server.metrics.Metrics implements it)."""

    def stage(self, name: str) -> contextlib.AbstractContextManager: ...

    def count_fallback(self, reason: str) -> None: ...


class CatalogSource(Protocol):
    """Where the current catalog comes from (server.item_cache.ItemCache or StaticCatalog)."""

    catalog: Catalog


class ServedLog(Protocol):
    def maybe_log(self, request_id: str, user_id: str, model_version: str, feature_names: list[str], features: np.ndarray, item_ids: np.ndarray, scores: np.ndarray) -> None: ...


class _Silent:
    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield

    def count_fallback(self, reason: str) -> None:
        pass


@dataclass(frozen=True)
class _Cold:
    """The fallback pool of one model version and catalog: popular items ranked for an anonymous shopper.

    order holds catalog indices best first (by the ranker's raw score, ties in popularity order); raw, scores
    (calibrated) and features (the anonymous shopper's ranker inputs, for explain) are parallel to it.
    """

    order: np.ndarray
    raw: np.ndarray
    scores: np.ndarray
    features: np.ndarray


class Recommender:
    """Answers recommendation and scoring queries from online features and the pooled models."""

    def __init__(
        self,
        models: ModelPool,
        user_features: OnlineUserFeatures,
        items: CatalogSource,
        candidates: CandidateSettings,
        rules: ServerSettings,
        data_as_of: str = "",
        observer: Observer | None = None,
        served_log: ServedLog | None = None,
        freshness: Callable[[], list[ViewFreshness]] | None = None,
    ) -> None:
        self._freshness = freshness or (lambda: [])
        self._models = models
        self._features = user_features
        self._items = items
        self._candidates = candidates
        self._rules = rules
        self._data_as_of = data_as_of
        self._observer = observer or _Silent()
        self._served_log = served_log
        self._weights: dict[str, RetrievalWeights] = {}
        self._cold: dict[tuple[str, int], _Cold] = {}

    @property
    def catalog_size(self) -> int:
        return self._items.catalog.size

    def recommend(self, query: RecommendQuery) -> Recommendation:
        started = time.monotonic()
        catalog = self._items.catalog  # one catalog for the whole request, even if a refresh swaps it
        model = self._models.choose(query.user_id, query.model_version)
        if self._out_of_time(query, started):
            return self._fallback(query, model, catalog, Fallback.DEADLINE, model.base_rate)
        try:
            with self._observer.stage("features"):
                user = UserState.from_row(query.user_id, self._features.fetch([query.user_id])[0], catalog)
        except StoreUnavailable:  # the cached catalog and popularity still make a useful answer
            return self._fallback(query, model, catalog, Fallback.STORE_UNAVAILABLE, model.base_rate)
        now = time.time()
        user_row = user_vector(user, now)
        propensity = float(model.predict_users(user_row[None, :])[0]) if user.known else model.base_rate
        if not query.candidate_item_ids and not user.has_history:
            return self._fallback(query, model, catalog, Fallback.NO_HISTORY if user.known else Fallback.UNKNOWN_USER, propensity)
        with self._observer.stage("candidates"):
            idx, ids, sources, signals = self._candidate_items(query, user, catalog, now, model)
        if not len(idx):
            return self._fallback(query, model, catalog, Fallback.NO_CANDIDATES, propensity)
        if self._out_of_time(query, started):
            return self._fallback(query, model, catalog, Fallback.DEADLINE, propensity)
        with self._observer.stage("scoring"):
            features = pair_matrix(user, catalog, idx, now, user_row=user_row, signals=signals)
            scored = model.score_items(features)
            top = self._top(scored.raw, catalog.categories[idx], query.num_items)
        scores = non_increasing(scored.calibrated[top])
        items = [ScoredItem(str(ids[i]), float(s), bool(idx[i] >= 0), candidate_source=str(sources[i])) for i, s in zip(top, scores)]
        if query.explain:
            with self._observer.stage("explain"):
                items = self._explain(model, features[top], items)
        if self._served_log is not None:
            self._served_log.maybe_log(query.request_id, query.user_id, model.version, list(RANKER_FEATURES), features[top], ids[top], scores)
        self._shadow(query, model, features, ids)
        return self._answer(query, model, propensity, items, Fallback.NONE)

    async def score_users(self, user_ids: list[str], model_version: str = "", chunk: int = 500) -> UserScores:
        """Score many users with one model version: per chunk, one bulk online read, then vectorised assembly and one predict.

        Chunks yield to the event loop between them: a long marketing list must not stall other calls (or a
        shutdown signal) for its whole duration. 500 users per chunk cost ~4 % more than 1,000 per read, and
        halve the longest stall.
        """
        model = self._models.get(model_version)
        catalog = self._items.catalog
        now = time.time()
        scores = np.empty(len(user_ids))
        known = np.empty(len(user_ids), dtype=bool)
        for start in range(0, len(user_ids), chunk):
            part = user_ids[start : start + chunk]
            with self._observer.stage("features"):
                users = UserBatch(part, self._features.fetch_arrays(part), catalog)
            with self._observer.stage("scoring"):
                rows = user_matrix(users, now)
                known[start : start + len(part)] = users.known
                scores[start : start + len(part)] = np.where(users.known, model.predict_users(rows), model.base_rate)
            await asyncio.sleep(0)
        return UserScores(user_ids, scores.tolist(), (~known).tolist(), model.version, model.user_feature_service)

    def score_items(self, user_id: str, item_ids: list[str], model_version: str = "") -> ItemScores:
        """Calibrated scores for the caller's items, in the caller's order (not a ranking)."""
        model = self._models.choose(user_id, model_version)
        catalog = self._items.catalog
        now = time.time()
        with self._observer.stage("features"):
            user = UserState.from_row(user_id, self._features.fetch([user_id])[0], catalog)
        idx = catalog.lookup(item_ids)
        with self._observer.stage("scoring"):
            scores = model.predict_items(pair_matrix(user, catalog, idx, now))
        items = [ScoredItem(item_id, float(s), bool(i >= 0)) for item_id, s, i in zip(item_ids, scores, idx)]
        return ItemScores(user_id, items, not user.known, model.version, model.user_feature_service)

    def model_info(self) -> ModelsInfo:
        bundles = {b.version: b for b in [self._models.current, *self._models.loaded()]}
        return ModelsInfo(
            models=[_describe(b, name) for b in bundles.values() for name in (USER_MODEL, RANKER_MODEL)],
            current_version=self._models.current.version,
            available_versions=self._models.available(),
            data_as_of=self._data_as_of,
            freshness=self._freshness(),
        )

    # -- stages ---------------------------------------------------------------------------------

    def _candidate_items(
        self, query: RecommendQuery, user: UserState, catalog: Catalog, now: float, model: ModelBundle
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, UserSignals | None]:
        """Catalog indices, item ids and candidate source names (parallel arrays) of the items to score, and the user's retrieval signals."""
        signals = None
        if query.candidate_item_ids:  # the caller's list: ranked exactly, only exclusions apply
            distinct = list(dict.fromkeys(query.candidate_item_ids))  # a repeated id is ranked once, first place kept
            idx = catalog.lookup(distinct)
            ids = np.asarray(distinct, dtype=object)
            sources = np.full(len(ids), REQUEST_SOURCE, dtype=object)
        else:  # distinct catalog items by construction
            candidates = generate_candidates(user, catalog, self._candidates, now, self._retrieval_weights(model))
            signals = candidates.signals
            idx, sources = candidates.item_idx, candidates.item_sources
            bought = self._recently_bought(user, now)
            if len(bought):
                keep = ~np.isin(idx, bought)
                idx, sources = idx[keep], sources[keep]
            ids = catalog.item_ids[idx]
        if query.exclude_item_ids:
            keep = ~np.isin(ids, np.asarray(query.exclude_item_ids, dtype=object))
            idx, ids, sources = idx[keep], ids[keep], sources[keep]
        return idx, ids, sources, signals

    def _retrieval_weights(self, model: ModelBundle) -> RetrievalWeights:
        """The version's fitted retrieval weights, parsed once per version (not per request)."""
        weights = self._weights.get(model.version)
        if weights is None:
            weights = self._weights[model.version] = RetrievalWeights.from_json(stored_weights(model.metadata))
        return weights

    def _recently_bought(self, user: UserState, now: float) -> np.ndarray:
        """Items bought within repurchase_window_days (an opt-in rule; by default the ranker judges re-buys)."""
        window = self._rules.repurchase_window_days
        if window <= 0 or not len(user.recent_idx):
            return np.empty(0, dtype=np.int64)
        bought = np.nan_to_num(user.recent_purchases_30d) > 0
        recent = (now - user.recent_last_ts) <= window * DAY_SECONDS
        return user.recent_idx[bought & recent]

    def _top(self, raw: np.ndarray, categories: np.ndarray, k: int) -> np.ndarray:
        return best_positions(raw, categories, k, self._rules.max_items_per_category)

    def _explain(self, model: ModelBundle, features: np.ndarray, items: list[ScoredItem]) -> list[ScoredItem]:
        contributions = model.contributions(features)  # (k, n_features + 1), last column is the baseline
        top_n = self._rules.explain_top_features
        explained = []
        for item, row, values in zip(items, contributions, features):
            per_feature = row[:-1]
            strongest = np.argsort(-np.abs(per_feature), kind="stable")[:top_n]
            explained.append(
                dataclasses.replace(
                    item,
                    contributions=tuple(Contribution(RANKER_FEATURES[j], float(values[j]), float(per_feature[j])) for j in strongest),
                    raw_score=float(row.sum()), base_value=float(row[-1]),
                )
            )
        return explained

    def _shadow(self, query: RecommendQuery, served: ModelBundle, features: np.ndarray, ids: np.ndarray) -> None:
        shadow = self._models.shadow
        if shadow is None or shadow.version == served.version:
            return
        scored = shadow.score_items(features)
        top = top_k(scored.raw, query.num_items)
        log.info(
            "shadow scoring",
            extra={"shadow_version": shadow.version, "served_version": served.version, "user": pseudonymise(query.user_id),
                   "shadow_items": [str(ids[i]) for i in top], "shadow_scores": [round(float(s), 6) for s in non_increasing(scored.calibrated[top])]},
        )

    def _fallback(self, query: RecommendQuery, model: ModelBundle, catalog: Catalog, reason: Fallback, propensity: float) -> Recommendation:
        """Popular items ranked by the ranker's raw score for an anonymous shopper (cached: no per-request model call)."""
        self._observer.count_fallback(reason.name)
        cold = self._cold_start(model, catalog)
        order, raw, scores, features = cold.order, cold.raw, cold.scores, cold.features
        if query.exclude_item_ids:
            keep = ~np.isin(catalog.item_ids[order], np.asarray(query.exclude_item_ids, dtype=object))
            order, raw, scores, features = order[keep], raw[keep], scores[keep], features[keep]
        picked = self._top(raw, catalog.categories[order], query.num_items)
        items = [
            ScoredItem(str(catalog.item_ids[order[i]]), float(s), candidate_source=FALLBACK_SOURCE)
            for i, s in zip(picked, non_increasing(scores[picked]))
        ]
        if query.explain:
            with self._observer.stage("explain"):
                items = self._explain(model, features[picked], items)
        return self._answer(query, model, propensity, items, reason)

    def _cold_start(self, model: ModelBundle, catalog: Catalog) -> _Cold:
        key = (model.version, id(catalog))
        cold = self._cold.get(key)
        if cold is None:
            pool = catalog.popular_order[: max(self._candidates.max_candidates, self._rules.max_num_items)]
            anonymous = UserState.from_row("", {}, catalog)
            features = pair_matrix(anonymous, catalog, pool, time.time())
            scored = model.score_items(features)
            best = np.argsort(-scored.raw, kind="stable")  # ties keep popularity order
            cold = _Cold(pool[best], scored.raw[best], scored.calibrated[best], features[best])
            self._cold = {k: v for k, v in self._cold.items() if k[1] == id(catalog)}  # drop stale catalogs
            self._cold[key] = cold
        return cold

    def _out_of_time(self, query: RecommendQuery, started: float) -> bool:
        if query.deadline_seconds is None:
            return False
        remaining = query.deadline_seconds - (time.monotonic() - started)
        return remaining * 1000.0 < self._rules.deadline_floor_ms

    def _answer(self, query: RecommendQuery, model: ModelBundle, propensity: float, items: list[ScoredItem], fallback: Fallback) -> Recommendation:
        return Recommendation(
            user_id=query.user_id,
            purchase_propensity=propensity,
            items=items,
            model_version=model.version,
            user_feature_service=model.user_feature_service,
            item_feature_service=model.item_feature_service,
            fallback=fallback,
            request_id=query.request_id,
        )


def _describe(bundle: ModelBundle, name: str) -> ModelDescription:
    meta = bundle.metadata
    info = meta["models"][name]
    services = meta["feature_services"]
    service = services["user"]["name"] if name == USER_MODEL else f"{services['user']['name']}+{services['item']['name']}"
    return ModelDescription(
        name=name,
        version=bundle.version,
        feature_service=service,
        feature_names=list(info["feature_names"]),
        metrics={k: float(v) for k, v in info["metrics"].items() if isinstance(v, (int, float))},
        horizon_days=int(meta["horizon_days"]),
        train_start=meta["train_window"]["start"],
        train_end=meta["train_window"]["end"],
        trained_at=meta["trained_at"],
    )
