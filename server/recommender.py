"""The data plane: features -> candidates -> scores -> ranked answer. Knows nothing about gRPC."""

from __future__ import annotations

import time

import numpy as np

from propensity.assembly import pair_matrix, user_matrix, user_vector
from propensity.candidates import generate_candidates
from propensity.catalog import Catalog
from propensity.model_registry import RANKER_MODEL, USER_MODEL, ModelBundle
from propensity.settings import CandidateSettings
from propensity.user_state import UserState
from server.model_pool import ModelPool
from server.online_features import OnlineUserFeatures
from server.queries import (
    Fallback,
    ItemScores,
    ModelDescription,
    ModelsInfo,
    Recommendation,
    RecommendQuery,
    ScoredItem,
    UserScores,
)


class Recommender:
    """Answers recommendation and scoring queries from online features and the pooled models."""

    def __init__(self, models: ModelPool, user_features: OnlineUserFeatures, catalog: Catalog, candidates: CandidateSettings, data_as_of: str = "") -> None:
        self._models = models
        self._features = user_features
        self._catalog = catalog
        self._candidates = candidates
        self._data_as_of = data_as_of

    def recommend(self, query: RecommendQuery) -> Recommendation:
        model = self._models.get(query.model_version)
        now = time.time()
        user = UserState.from_row(query.user_id, self._features.fetch([query.user_id])[0], self._catalog)
        user_row = user_vector(user, now)
        propensity = float(model.predict_users(user_row[None, :])[0]) if user.known else model.base_rate
        fallback = Fallback.NONE if user.has_history else (Fallback.NO_HISTORY if user.known else Fallback.UNKNOWN_USER)
        if query.candidate_item_ids:
            idx = self._catalog.lookup(query.candidate_item_ids)
            ids = np.asarray(query.candidate_item_ids, dtype=object)
        else:
            idx = generate_candidates(user, self._catalog, self._candidates).item_idx if user.has_history else np.empty(0, dtype=np.int64)
            if not len(idx):
                if fallback is Fallback.NONE:
                    fallback = Fallback.NO_CANDIDATES
                idx = self._catalog.popular_order[: self._candidates.max_candidates]
            ids = self._catalog.item_ids[idx]
        if query.exclude_item_ids:
            keep = ~np.isin(ids, np.asarray(query.exclude_item_ids, dtype=object))
            idx, ids = idx[keep], ids[keep]
        _, first = np.unique(ids, return_index=True)  # a repeated candidate id is ranked once
        order = np.sort(first)
        idx, ids = idx[order], ids[order]
        scores = model.predict_items(pair_matrix(user, self._catalog, idx, now, user_row=user_row))
        top = _top_k(scores, query.num_items)
        return Recommendation(
            user_id=query.user_id,
            purchase_propensity=propensity,
            items=[ScoredItem(str(ids[i]), float(scores[i]), bool(idx[i] >= 0)) for i in top],
            model_version=model.version,
            user_feature_service=model.user_feature_service,
            item_feature_service=model.item_feature_service,
            fallback=fallback,
        )

    def score_users(self, user_ids: list[str], model_version: str = "") -> UserScores:
        model = self._models.get(model_version)
        now = time.time()
        users = [UserState.from_row(u, row, self._catalog) for u, row in zip(user_ids, self._features.fetch(user_ids))]
        scores = model.predict_users(user_matrix(users, now))
        known = np.array([u.known for u in users], dtype=bool)
        scores = np.where(known, scores, model.base_rate)
        return UserScores(user_ids, scores.tolist(), (~known).tolist(), model.version, model.user_feature_service)

    def score_items(self, user_id: str, item_ids: list[str], model_version: str = "") -> ItemScores:
        model = self._models.get(model_version)
        now = time.time()
        user = UserState.from_row(user_id, self._features.fetch([user_id])[0], self._catalog)
        idx = self._catalog.lookup(item_ids)
        scores = model.predict_items(pair_matrix(user, self._catalog, idx, now))
        items = [ScoredItem(item_id, float(s), bool(i >= 0)) for item_id, s, i in zip(item_ids, scores, idx)]
        return ItemScores(user_id, items, not user.known, model.version, model.user_feature_service)

    @property
    def catalog_size(self) -> int:
        return self._catalog.size

    def model_info(self) -> ModelsInfo:
        bundles = {b.version: b for b in [self._models.current, *self._models.loaded()]}
        return ModelsInfo(
            models=[_describe(b, name) for b in bundles.values() for name in (USER_MODEL, RANKER_MODEL)],
            current_version=self._models.current.version,
            available_versions=self._models.available(),
            data_as_of=self._data_as_of,
        )


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first (partial sort: O(n) + O(k log k))."""
    if len(scores) <= k:
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


def _describe(bundle: ModelBundle, name: str) -> ModelDescription:
    meta = bundle.metadata
    info = meta["models"][name]
    service = meta["feature_services"]["user" if name == USER_MODEL else "item"]["name"]
    if name == RANKER_MODEL:
        service = f"{meta['feature_services']['user']['name']}+{meta['feature_services']['item']['name']}"
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
