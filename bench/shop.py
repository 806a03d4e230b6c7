"""The bench shop opened in-process: Feast store, item catalog, both models, sampled users.

Reads the same store and model files the servers read, through the project's own functions
(Catalog.from_frame, UserState.from_row, generate_candidates, pair_matrix), so candidate
counts and the compute floor describe exactly the work a Recommend call does.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from bench.state import BenchState
from propensity.candidates import generate_candidates
from propensity.retrieval import RetrievalWeights, stored_weights
from propensity.catalog import Catalog
from propensity.settings import CandidateSettings, Settings
from propensity.user_state import UserState

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


@dataclass
class Shop:
    settings: Settings
    store: object  # feast.FeatureStore
    user_service: object
    item_service: object
    catalog: Catalog
    user_model: lgb.Booster
    ranker: lgb.Booster
    model_dir: Path
    retrieval_weights: RetrievalWeights | None = None  # the served version's (model metadata)

    def fetch_users(self, user_ids: Sequence[str]) -> list[dict[str, object]]:
        """One online row per user through the user feature service (what the server reads per request)."""
        columns = self.store.get_online_features(features=self.user_service, entity_rows=[{"user_id": u} for u in user_ids]).to_dict()
        return [{name: values[i] for name, values in columns.items()} for i in range(len(user_ids))]

    def fetch_items(self, item_ids: Sequence[str]) -> pd.DataFrame:
        """Item rows through the item feature service, one call."""
        return pd.DataFrame(self.store.get_online_features(features=self.item_service, entity_rows=[{"item_id": i} for i in item_ids]).to_dict())


def all_item_ids(state: BenchState) -> list[str]:
    path = state.feature_repo / "data" / "offline" / "item_stats.parquet"
    return pd.read_parquet(path, columns=["item_id"])["item_id"].astype(str).unique().tolist()


def open_shop(state: BenchState, serve_env: dict[str, str] | None = None) -> Shop:
    """Open the shop with the same serving overrides (PROPENSITY_* variables) the servers get."""
    from feast import FeatureStore

    saved = dict(os.environ)
    os.environ.update(serve_env or {})
    try:
        settings = Settings(work_dir=state.work_dir, data_dir=state.data_dir, feature_repo=state.feature_repo)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    store = FeatureStore(repo_path=str(state.feature_repo))
    user_service = store.get_feature_service(settings.user_feature_service)
    item_service = store.get_feature_service(settings.item_feature_service)
    ids = all_item_ids(state)
    frames = [
        pd.DataFrame(store.get_online_features(features=item_service, entity_rows=[{"item_id": i} for i in ids[s : s + 1000]]).to_dict())
        for s in range(0, len(ids), 1000)
    ]
    catalog = Catalog.from_frame(pd.concat(frames, ignore_index=True))
    model_dir = state.current_model_dir()
    metadata = json.loads((model_dir / "metadata.json").read_text())
    return Shop(
        settings, store, user_service, item_service, catalog,
        lgb.Booster(model_file=str(model_dir / "user_propensity.txt")),
        lgb.Booster(model_file=str(model_dir / "item_ranker.txt")),
        model_dir,
        RetrievalWeights.from_json(stored_weights(metadata)),
    )


def sample_users(state: BenchState, shop: Shop, n: int, seed: int = 42) -> tuple[list[str], list[dict[str, object]]]:
    """n random users with history (the personalised path), with their online rows."""
    path = state.feature_repo / "data" / "offline" / "user_interests.parquet"
    candidates = sorted(pd.read_parquet(path, columns=["user_id"])["user_id"].astype(str).unique())
    rng = np.random.default_rng(seed)
    pool = list(rng.permutation(candidates))
    users, rows = [], []
    for start in range(0, len(pool), 4 * n):
        chunk = pool[start : start + 4 * n]
        for user_id, row in zip(chunk, shop.fetch_users(chunk)):
            if UserState.from_row(user_id, row, shop.catalog).has_history:
                users.append(user_id)
                rows.append(row)
                if len(users) == n:
                    return users, rows
    return users, rows


def candidate_counts(shop: Shop, user_ids: Sequence[str], rows: Sequence[dict[str, object]], settings: CandidateSettings | None = None) -> np.ndarray:
    """Candidates generate_candidates gives each user (default: the shop's serving settings)."""
    settings = settings or shop.settings.candidates
    return np.array([
        len(generate_candidates(UserState.from_row(u, r, shop.catalog), shop.catalog, settings, weights=shop.retrieval_weights).item_idx)
        for u, r in zip(user_ids, rows)
    ])
