"""The item catalog as arrays: item features, popularity orderings, neighbour lists and ALS item factors.

Built from one DataFrame of the item feature service's columns, whether the rows come from
Feast's online store (serving) or a point-in-time join at a cut-off (training).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

# Item features used as model inputs, in this order.
ITEM_FEATURES: tuple[str, ...] = (
    "item_price",
    "item_available",
    "item_views_7d",
    "item_views_30d",
    "item_carts_7d",
    "item_carts_30d",
    "item_purchases_7d",
    "item_purchases_30d",
    "item_buyers_30d",
    "item_conversion_rate_30d",
    "item_return_rate_30d",
)
UNKNOWN = -1  # index of the all-NaN row appended to every item matrix


@dataclass(frozen=True)
class Catalog:
    """Items indexed 0..n-1; index -1 reads the NaN row, so unknown items score with missing item features."""

    item_ids: np.ndarray
    index: dict[str, int]
    features: np.ndarray  # (n + 1, len(ITEM_FEATURES)), last row all NaN
    categories: np.ndarray  # object array of category ids (None where unknown), length n + 1
    available: np.ndarray  # bool, length n
    popularity: np.ndarray  # float score, length n
    popularity_rank: np.ndarray  # 0 for the most popular item .. 1 for the least, length n
    popular_order: np.ndarray  # item indices, most popular first (available items only)
    # Neighbour tables as (n + 1, n) sparse rows (row n: UNKNOWN, empty): "neighbors" co-visited in sessions,
    # "copurchase" bought by the same shoppers (time-decayed), "content" most similar by title, category, brand, price.
    neighbour_matrices: dict[str, sp.csr_matrix]
    popularity_by_signal: np.ndarray  # (3, n): log1p of popularity, purchases in 7 days and buyers in 30 days
    category_names: tuple[str, ...]
    category_code_of: dict[str, int]
    category_codes: np.ndarray  # per item, index into category_names; len(category_names) when unknown
    item_factors: np.ndarray | None = None  # (n + 1, k) float32 ALS factors, zero rows where an item has none; None without any
    has_factors: np.ndarray | None = None  # bool, length n + 1
    regularized_gram: np.ndarray | None = None  # Y'Y + als_regularization x I (k, k) of item_factors Y, for folding in users
    als_alpha: float = 0.0  # the fit's confidence scale and regularisation, read with the factors
    als_regularization: float = 0.0

    def neighbours(self, table: str, item: int) -> tuple[np.ndarray, np.ndarray]:
        """One item's neighbours in a table ("neighbors", "copurchase", "content"): indices and scores, strongest first."""
        matrix = self.neighbour_matrices[table]
        row = self.size if item == UNKNOWN else item
        lo, hi = matrix.indptr[row], matrix.indptr[row + 1]
        return matrix.indices[lo:hi], matrix.data[lo:hi]

    @property
    def size(self) -> int:
        return len(self.item_ids)

    def lookup(self, item_ids: Iterable[str]) -> np.ndarray:
        """Catalog indices of item_ids, UNKNOWN for items not in the catalog."""
        get = self.index.get
        return np.fromiter((get(i, UNKNOWN) for i in item_ids), dtype=np.int64)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> Catalog:
        """Build from item_id plus the item feature service's columns (missing values allowed)."""
        frame = frame.drop_duplicates("item_id", keep="last").reset_index(drop=True)
        item_ids = frame["item_id"].astype(str).to_numpy()
        n = len(item_ids)
        index = {item_id: i for i, item_id in enumerate(item_ids)}
        matrix = np.full((n + 1, len(ITEM_FEATURES)), np.nan)
        for j, name in enumerate(ITEM_FEATURES):
            if name in frame:
                matrix[:n, j] = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        categories = np.empty(n + 1, dtype=object)
        if "category_id" in frame:
            categories[:n] = frame["category_id"].where(frame["category_id"].notna(), None).to_numpy()
        available = np.nan_to_num(matrix[:n, ITEM_FEATURES.index("item_available")], nan=1.0) > 0
        popularity = _popularity(matrix[:n])
        order = np.lexsort((item_ids, -popularity))  # ties broken by id: deterministic
        popular_order = order[available[order]]
        popularity_rank = np.empty(n)
        popularity_rank[order] = np.arange(n) / max(n - 1, 1)
        names = tuple(sorted({c for c in categories[:n] if c is not None}))
        code_of = {c: i for i, c in enumerate(names)}
        codes = np.fromiter((code_of.get(c, len(names)) if c is not None else len(names) for c in categories[:n]), dtype=np.int64, count=n)
        factors = _factors(frame, n)
        lists = {
            "neighbors": _neighbors(frame, index, n, "neighbor_item_ids", "neighbor_scores"),
            "copurchase": _neighbors(frame, index, n, "copurchase_item_ids", "copurchase_scores"),
            "content": _neighbors(frame, index, n, "content_item_ids", "content_scores"),
        }
        return cls(
            item_ids=item_ids,
            index=index,
            features=matrix,
            categories=categories,
            available=available,
            popularity=popularity,
            popularity_rank=popularity_rank,
            popular_order=popular_order,
            neighbour_matrices={name: _sparse(rows, n) for name, rows in lists.items()},
            popularity_by_signal=np.log1p(np.maximum(np.vstack([
                popularity,
                np.nan_to_num(matrix[:n, ITEM_FEATURES.index("item_purchases_7d")]),
                np.nan_to_num(matrix[:n, ITEM_FEATURES.index("item_buyers_30d")]),
            ]), 0.0)),
            category_names=names,
            category_code_of=code_of,
            category_codes=codes,
            **factors,
        )


def _popularity(matrix: np.ndarray) -> np.ndarray:
    """Recent purchases dominate, then carts, then views; whatever the shop records."""
    col = {name: np.nan_to_num(matrix[:, j]) for j, name in enumerate(ITEM_FEATURES)}
    return (
        10.0 * col["item_purchases_7d"]
        + 3.0 * col["item_purchases_30d"]
        + 2.0 * col["item_carts_7d"]
        + 0.5 * col["item_carts_30d"]
        + 0.3 * col["item_views_7d"]
        + 0.1 * col["item_views_30d"]
    )


def _sparse(rows: list[tuple[np.ndarray, np.ndarray]], n: int) -> sp.csr_matrix:
    """Neighbour lists as a sparse (len(rows), n) matrix: row i holds item i's neighbour scores."""
    lengths = np.fromiter((len(ids) for ids, _ in rows), dtype=np.int64, count=len(rows))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate([ids for ids, _ in rows]).astype(np.int64) if indptr[-1] else np.empty(0, dtype=np.int64)
    data = np.concatenate([np.asarray(v, dtype=float) for _, v in rows]) if indptr[-1] else np.empty(0)
    return sp.csr_matrix((data, indices, indptr), shape=(len(rows), n))


def _factors(frame: pd.DataFrame, n: int) -> dict:
    """ALS item factors as a dense matrix plus what folding in a user needs; {} when the service has none."""
    if "als_factors" not in frame:
        return {}
    vectors = [v for v in frame["als_factors"] if _is_list(v)]
    if not vectors:
        return {}
    k = len(vectors[0])
    # float32, as ALS (implicit) computes them: scoring the whole catalog per user reads this matrix once, and
    # half the bytes is half the time (40,000 items x 64 factors = 10 MB; the read dominates the product).
    matrix = np.zeros((n + 1, k), dtype=np.float32)
    has = np.zeros(n + 1, dtype=bool)
    for i, v in enumerate(frame["als_factors"]):
        if _is_list(v) and len(v) == k:
            matrix[i] = np.asarray(v, dtype=np.float32)
            has[i] = True

    def scalar(name: str) -> float:
        values = pd.to_numeric(frame[name], errors="coerce").dropna() if name in frame else pd.Series(dtype=float)
        return float(values.iloc[0]) if len(values) else 0.0

    regularization = scalar("als_regularization")
    wide = matrix.astype(np.float64)  # the fold-in solves in float64
    return {
        "item_factors": matrix, "has_factors": has, "regularized_gram": wide.T @ wide + regularization * np.eye(k),
        "als_alpha": scalar("als_alpha"), "als_regularization": regularization,
    }


def _neighbors(frame: pd.DataFrame, index: dict[str, int], n: int, ids_column: str, scores_column: str) -> list[tuple[np.ndarray, np.ndarray]]:
    empty = (np.empty(0, dtype=np.int64), np.empty(0))
    if ids_column not in frame:
        return [empty] * (n + 1)
    result: list[tuple[np.ndarray, np.ndarray]] = []
    for ids, scores in zip(frame[ids_column], frame[scores_column]):
        if not _is_list(ids):
            result.append(empty)
            continue
        idx = np.fromiter((index.get(i, UNKNOWN) for i in ids), dtype=np.int64, count=len(ids))
        values = np.asarray(scores if _is_list(scores) else [0.0] * len(ids), dtype=float)
        keep = idx >= 0
        result.append((idx[keep], values[keep]))
    result.append(empty)  # UNKNOWN (-1) reads this
    return result


def _is_list(value: object) -> bool:
    return isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0


def as_list(value: object) -> Sequence:
    """Feast list features arrive as list, ndarray or None; normalise to a sequence."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple, np.ndarray)):
        return value
    return ()
