"""Baselines the models must beat, on the same cut-offs and features.

Ranking baselines return each user's top-k item ids from the catalog as it was at the cut-off
(whole catalog, not only the candidates); when a baseline has fewer than k items of its own
(e.g. buy-again for a first-time buyer) the rest is filled with globally popular items, so every
baseline always recommends k items. The exceptions are the recent-interaction heuristics: the
plain one lists only what the user touched (so it shows what memory alone is worth), its
popularity-filled twin tops that up to k. The propensity baseline is an MLP on standardised features.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
from sklearn.impute import SimpleImputer
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from propensity.catalog import Catalog
from propensity.retrieval import neighbour_sum
from propensity.user_state import UserState

RANKING_BASELINES = (
    "global_popularity",
    "category_popularity",
    "covisitation",
    "buy_again",
    "recent_interactions",
    "recent_interactions_popularity_fill",
)


def _top_k(scores: np.ndarray, catalog: Catalog, k: int) -> list[str]:
    """Items by score (only positive scores count), then by global popularity; ties broken deterministically."""
    order = np.lexsort((catalog.popularity_rank, -scores))
    return catalog.item_ids[order[:k]].tolist()


def global_popularity(catalog: Catalog, k: int = 10) -> list[str]:
    """The same k most popular items (recent purchases, carts, views) for everyone."""
    return _top_k(np.zeros(catalog.size), catalog, k)


def category_popularity(user: UserState, catalog: Catalog, k: int = 10) -> list[str]:
    """Recently popular items in the user's favourite categories, weighted by the user's share of each category."""
    scores = np.zeros(catalog.size)
    categories = catalog.categories[: catalog.size]
    for category, share in zip(user.top_categories, user.top_category_shares):
        match = categories == category
        scores[match] = np.maximum(scores[match], share * (1.0 + catalog.popularity[match]))
    return _top_k(scores, catalog, k)


def covisitation(user: UserState, catalog: Catalog, k: int = 10, max_sources: int = 10) -> list[str]:
    """Items most co-visited with the user's recent items (summed co-visitation scores)."""
    sources = user.recent_idx[:max_sources]
    return _top_k(neighbour_sum(catalog.neighbour_matrices["neighbors"], sources, np.ones(len(sources))), catalog, k)


def buy_again(history: Sequence[str], catalog: Catalog, k: int = 10) -> list[str]:
    """The user's own most frequently bought items (history ordered by count, then recency)."""
    own = [i for i in history if i in catalog.index][:k]
    seen = set(own)
    return own + [i for i in global_popularity(catalog, k + len(own)) if i not in seen][: k - len(own)]


def recent_interactions(user: UserState, catalog: Catalog, k: int = 10) -> list[str]:
    """Items still in the user's cart, most recent first; then the user's other recent items by recency, then view count.

    Only available items, as serving's candidates: an item the shop does not sell cannot be recommended.
    """
    idx = user.recent_idx
    if not len(idx):
        return []
    in_cart = np.nan_to_num(user.recent_in_cart, nan=0.0) > 0
    last = np.nan_to_num(user.recent_last_ts, nan=-np.inf)  # a shop without item times falls back to list order
    views = np.nan_to_num(user.recent_views_7d, nan=0.0)
    # lexsort: the last key is the primary one; list position (most recent first) breaks the remaining ties.
    order = np.lexsort((np.arange(len(idx)), -views, -last, ~in_cart))
    ranked = idx[order]
    ranked = ranked[catalog.available[ranked]]
    _, first = np.unique(ranked, return_index=True)
    return catalog.item_ids[ranked[np.sort(first)][:k]].tolist()


def recent_interactions_popularity_fill(user: UserState, catalog: Catalog, k: int = 10) -> list[str]:
    """recent_interactions, then the most popular available items not already listed, up to k."""
    own = recent_interactions(user, catalog, k)
    seen = set(own)
    fill = (str(catalog.item_ids[i]) for i in catalog.popular_order if catalog.item_ids[i] not in seen)  # lazy: stops after k
    return own + [i for _, i in zip(range(k - len(own)), fill)]


def purchase_history(prepared_dir: Path, user_ids: Sequence[str], before: datetime) -> dict[str, list[str]]:
    """Per user: items bought strictly before `before`, most often bought first, then most recent."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("wanted", pd.DataFrame({"user_id": pd.Series(list(user_ids), dtype=str)}))
    frame = con.execute(
        f"""
        SELECT e.user_id, e.item_id, count(*) AS n, max(e.event_time) AS last
        FROM read_parquet('{prepared_dir / 'events.parquet'}') e JOIN wanted USING (user_id)
        WHERE e.event_type = 'purchase' AND e.event_time < ?
        GROUP BY ALL ORDER BY e.user_id, n DESC, last DESC, e.item_id
        """,
        [pd.Timestamp(before).tz_convert("UTC").to_pydatetime()],
    ).df()
    con.close()
    return {str(u): g["item_id"].astype(str).tolist() for u, g in frame.groupby("user_id", sort=False)}


def fit_mlp(features: np.ndarray, labels: np.ndarray, seed: int = 0, max_rows: int = 50_000) -> Pipeline:
    """sklearn MLPClassifier on median-imputed (with missing indicators), log-compressed, standardised features."""
    rng = np.random.default_rng(seed)
    if len(labels) > max_rows:
        keep = rng.choice(len(labels), max_rows, replace=False)
        features, labels = features[keep], labels[keep]
    model = make_pipeline(
        SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(64, 32), alpha=1e-3, early_stopping=True, max_iter=200, random_state=seed),
    )
    return model.fit(_compress(features), labels)


def predict_mlp(model: Pipeline, features: np.ndarray) -> np.ndarray:
    return model.predict_proba(_compress(features))[:, 1]


def _compress(features: np.ndarray) -> np.ndarray:
    # Counts and ages are heavy-tailed; a signed log keeps the scaler from being dominated by a few shoppers.
    x = np.asarray(features, dtype=float)
    return np.sign(x) * np.log1p(np.abs(x))
