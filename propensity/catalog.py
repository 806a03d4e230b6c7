"""The item catalog as arrays: item features, popularity orderings and co-visitation neighbours.

Built from one DataFrame of the item feature service's columns, whether the rows come from
Feast's online store (serving) or a point-in-time join at a cut-off (training).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

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
    popular_by_category: dict[str, np.ndarray]
    neighbors: list[tuple[np.ndarray, np.ndarray]]  # per item: (neighbour indices, scores)

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
        by_category: dict[str, list[int]] = {}
        for i in popular_order:
            category = categories[i]
            if category is not None:
                by_category.setdefault(category, []).append(int(i))
        neighbors = _neighbors(frame, index, n)
        return cls(
            item_ids=item_ids,
            index=index,
            features=matrix,
            categories=categories,
            available=available,
            popularity=popularity,
            popularity_rank=popularity_rank,
            popular_order=popular_order,
            popular_by_category={c: np.asarray(ix, dtype=np.int64) for c, ix in by_category.items()},
            neighbors=neighbors,
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


def _neighbors(frame: pd.DataFrame, index: dict[str, int], n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    empty = (np.empty(0, dtype=np.int64), np.empty(0))
    if "neighbor_item_ids" not in frame:
        return [empty] * n
    result: list[tuple[np.ndarray, np.ndarray]] = []
    for ids, scores in zip(frame["neighbor_item_ids"], frame["neighbor_scores"]):
        if not _is_list(ids):
            result.append(empty)
            continue
        idx = np.fromiter((index.get(i, UNKNOWN) for i in ids), dtype=np.int64, count=len(ids))
        values = np.asarray(scores if _is_list(scores) else [0.0] * len(ids), dtype=float)
        keep = idx >= 0
        result.append((idx[keep], values[keep]))
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
