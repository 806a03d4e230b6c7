"""Item tables for retrieval: ALS item factors, time-decayed co-purchase neighbours, content neighbours.

Collaborative tables are weekly snapshots ending at as-of (like item_neighbors): snapshot k is
valid from day as_of - 7k and is fitted only on events before it, so a point-in-time join at any
cut-off reads a fit that never saw the cut-off's future. Every snapshot holds a row for every item
of the catalog, so one catalog never mixes factors from two fits. Content neighbours come from the
item table alone (titles, categories, brands, price bands) and have one snapshot.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from propensity.settings import FeatureSettings
from training.duck import Connection
from training.feature_sql import DAY_SECONDS

# Interaction weights of the user x item matrix behind ALS and co-purchase (a purchase says most).
EVENT_WEIGHTS = {"views": 1.0, "carts": 3.0, "purchases": 5.0}


def item_factors(con: Connection, event_types: frozenset[str], settings: FeatureSettings) -> None:
    """ALS (implicit) item factors per weekly snapshot; a user's vector is folded in at request time from their items."""
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    items, snapshots = _catalog_and_snapshots(con, settings)
    rows = []
    for b in snapshots:
        matrix = _interactions(con, items, b, settings.retrieval_half_life_days)
        if matrix.nnz == 0:
            continue
        # implicit's own threads do the work; nested BLAS threads only slow it down (implicit warns at construction).
        with threadpool_limits(1, "blas"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            model = AlternatingLeastSquares(
                factors=settings.als_factors, regularization=settings.als_regularization, alpha=settings.als_alpha,
                iterations=settings.als_iterations, random_state=0,
            )
            model.fit(matrix, show_progress=False)
        factors = np.asarray(model.item_factors, dtype=np.float64)
        # Items nobody touched before this snapshot have nothing to say (ALS leaves them at zero): no vector.
        seen = np.asarray(matrix.getnnz(axis=0)) > 0
        rows.append(pd.DataFrame({
            "item_id": items, "b": b, "als_factors": [f.tolist() if s else None for f, s in zip(factors, seen)],
            # Folding a user in must use the fit's own hyper-parameters: they travel with the factors.
            "als_alpha": settings.als_alpha, "als_regularization": settings.als_regularization,
        }))
    _register(con, "item_factors", rows, {"als_factors": pa.list_(pa.float64()), "als_alpha": pa.float64(), "als_regularization": pa.float64()})


def item_copurchase(con: Connection, event_types: frozenset[str], settings: FeatureSettings) -> None:
    """Items bought (or carted) by the same shoppers, time-decayed and BM25-weighted, per weekly snapshot."""
    from implicit.nearest_neighbours import BM25Recommender

    items, snapshots = _catalog_and_snapshots(con, settings)
    kinds = ("carts", "purchases") if "purchase" in event_types or "add_to_cart" in event_types else ("views",)
    rows = []
    for b in snapshots:
        matrix = _interactions(con, items, b, settings.retrieval_half_life_days, kinds)
        if matrix.nnz == 0:
            continue
        model = BM25Recommender(K=settings.neighbors_per_item + 1)
        with warnings.catch_warnings():  # implicit warns that its own BM25 weighting hands it COO input
            warnings.simplefilter("ignore")
            model.fit(matrix, show_progress=False)
        ids, scores = _top_lists(model.similarity.tocsr(), items, settings.neighbors_per_item)
        rows.append(pd.DataFrame({"item_id": items, "b": b, "copurchase_item_ids": ids, "copurchase_scores": scores}))
    _register(con, "item_copurchase", rows, {"copurchase_item_ids": pa.list_(pa.string()), "copurchase_scores": pa.list_(pa.float64())})


def item_content(con: Connection, event_types: frozenset[str], settings: FeatureSettings) -> None:
    """Most similar items by title words, category, brand and price band (TF-IDF cosine): items with little history."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    frame = con.execute("SELECT * FROM items ORDER BY item_id").df()
    first_day = con.execute("SELECT first_day FROM params").fetchall()[0][0]
    documents = content_documents(frame)
    rows = []
    if len(frame) and documents.str.len().sum():
        vectors = TfidfVectorizer(min_df=1, sublinear_tf=True, token_pattern=r"\S+").fit_transform(documents).tocsr()
        ids, scores = _content_neighbours(vectors, frame["item_id"].to_numpy(), settings.neighbors_per_item)
        rows.append(pd.DataFrame({"item_id": frame["item_id"].to_numpy(), "b": first_day or 0, "content_item_ids": ids, "content_scores": scores}))
    _register(con, "item_content", rows, {"content_item_ids": pa.list_(pa.string()), "content_scores": pa.list_(pa.float64())})


def _content_neighbours(vectors: sp.csr_matrix, item_ids: np.ndarray, k: int, block: int = 256) -> tuple[list, list]:
    """Top-k cosine neighbours per item (self excluded), a dense block of rows at a time: memory block x n, time O(n^2 / block)."""
    ids: list = []
    scores: list = []
    n = vectors.shape[0]
    keep = min(k, n - 1)
    for start in range(0, n, block):
        dense = (vectors[start : start + block] @ vectors.T).toarray().astype(np.float32)
        rows = np.arange(dense.shape[0])
        dense[rows, start + rows] = 0.0  # never one's own neighbour
        if keep <= 0:
            ids += [None] * len(rows)
            scores += [None] * len(rows)
            continue
        top = np.argpartition(-dense, keep - 1, axis=1)[:, :keep]
        for r in rows:
            cols = top[r][dense[r, top[r]] > 0]
            cols = cols[np.lexsort((cols, -dense[r, cols]))]
            ids.append(item_ids[cols].tolist() if len(cols) else None)
            scores.append(dense[r, cols].astype(float).tolist() if len(cols) else None)
    return ids, scores


def content_documents(items: pd.DataFrame) -> pd.Series:
    """One bag of tokens per item: lower-case title words, then cat:/brand:/price: tokens (price in log-spaced bands)."""
    def column(name: str) -> pd.Series:
        return items[name] if name in items else pd.Series([None] * len(items), index=items.index)

    words = column("title").fillna("").astype(str).str.lower().map(lambda t: " ".join(re.findall(r"[^\W_]+", t)))  # any script's letters
    category = column("category_id").map(lambda c: f"cat:{_one_token(c)}" if pd.notna(c) else "")
    brand = column("brand").map(lambda v: f"brand:{_one_token(v).lower()}" if pd.notna(v) else "")
    price = pd.to_numeric(column("price"), errors="coerce")
    band = np.floor(np.log2(price.where(price > 0))).map(lambda v: f"price:{int(v)}" if pd.notna(v) else "")
    return (words + " " + category + " " + brand + " " + band).str.strip()


def _one_token(value: object) -> str:
    """A multi-word brand or category as one token ("Hugo Boss" -> "Hugo_Boss"), so it never matches title words."""
    return "_".join(str(value).split())


def _catalog_and_snapshots(con: Connection, settings: FeatureSettings) -> tuple[np.ndarray, list[int]]:
    items = con.execute("SELECT item_id FROM items UNION SELECT DISTINCT item_id FROM user_item_day ORDER BY item_id").df()["item_id"].to_numpy()
    as_of_day, first_day = con.execute("SELECT as_of_day, first_day FROM params").fetchall()[0]
    snapshots = [as_of_day - 7 * k for k in range(settings.retrieval_snapshots)]
    return items, [b for b in snapshots if first_day is not None and b > first_day]


def _interactions(con: Connection, items: np.ndarray, b: int, half_life_days: float, kinds: tuple[str, ...] = tuple(EVENT_WEIGHTS)) -> sp.csr_matrix:
    """users x items: weighted event counts per day before day b, each day decayed by its age (half-life in days)."""
    weight = " + ".join(f"{EVENT_WEIGHTS[k]} * coalesce({k}, 0)" for k in kinds)
    frame = con.execute(
        f"""
        SELECT user_id, item_id, sum(({weight}) * pow(0.5, ({b} - day) / {float(half_life_days)})) AS w
        FROM user_item_day WHERE day < {b} GROUP BY ALL HAVING w > 0
        ORDER BY user_id, item_id  -- a fixed row order: ALS's random start follows the user index
        """
    ).df()
    users = pd.Index(frame["user_id"].unique())
    columns = pd.Index(items).get_indexer(frame["item_id"])
    matrix = sp.csr_matrix((frame["w"].to_numpy(float), (users.get_indexer(frame["user_id"]), columns)), shape=(len(users), len(items)))
    matrix.sum_duplicates()
    return matrix


def _top_lists(similarity: sp.csr_matrix, item_ids: np.ndarray, k: int) -> tuple[list, list]:
    """Per row: the k most similar other items (ids, scores), strongest first; None for a row without any."""
    ids, scores = [], []
    for r in range(similarity.shape[0]):
        lo, hi = similarity.indptr[r], similarity.indptr[r + 1]
        cols, vals = similarity.indices[lo:hi], similarity.data[lo:hi]
        keep = (cols != r) & (vals > 0)
        cols, vals = cols[keep], vals[keep]
        order = np.lexsort((cols, -vals))[:k]
        ids.append(item_ids[cols[order]].tolist() if len(order) else None)
        scores.append(vals[order].astype(float).tolist() if len(order) else None)
    return ids, scores


def _register(con: Connection, name: str, parts: list[pd.DataFrame], types: dict[str, pa.DataType]) -> None:
    """Create temp table `name` (item_id, event_timestamp, feature columns) from per-snapshot frames, typed even when empty."""
    columns = ["item_id", "b", *types]
    schema = pa.schema([("item_id", pa.string()), ("b", pa.int64()), *types.items()])
    table = pa.Table.from_pandas(pd.concat(parts, ignore_index=True)[columns], schema=schema, preserve_index=False) if parts else schema.empty_table()
    con.register(f"{name}_frame", table)
    lists = ", ".join(types)
    con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT item_id, to_timestamp(b * {DAY_SECONDS}) AS event_timestamp, {lists} FROM {name}_frame")
    con.unregister(f"{name}_frame")
