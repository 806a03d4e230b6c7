"""A user's features as the scorer needs them, from one row of the user feature service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from propensity.catalog import Catalog, as_list

# Scalar user features read from Feast, in the order the models see them.
USER_SCALARS: tuple[str, ...] = (
    "views_1d",
    "views_7d",
    "views_30d",
    "carts_1d",
    "carts_7d",
    "carts_30d",
    "purchases_1d",
    "purchases_7d",
    "purchases_30d",
    "returns_30d",
    "purchases_total",
    "spend_30d",
    "avg_purchase_price_30d",
    "cart_to_purchase_rate_30d",
    "distinct_items_30d",
    "active_days_30d",
    "sessions_7d",
    "sessions_30d",
    "browsing_minutes_7d",
    "browsing_minutes_30d",
    "age",
)
# Timestamps turned into ages relative to the request (or cut-off) time.
USER_TIMESTAMPS: tuple[str, ...] = ("last_event_ts", "last_purchase_ts", "first_event_ts", "signup_ts")
# Features whose presence tells a known user from an unknown one.
_PRESENCE = ("last_event_ts", "signup_ts")


@dataclass(frozen=True)
class UserState:
    """Scalars, timestamps, favourite categories, recent and most bought items (as catalog indices) of one user.

    The bought_* arrays are empty when the feature service has no purchase history (propensity_user_v1).
    """

    user_id: str
    known: bool
    scalars: np.ndarray  # len(USER_SCALARS), NaN where missing
    timestamps: np.ndarray  # len(USER_TIMESTAMPS), epoch seconds, NaN where missing
    top_categories: tuple[str, ...]
    top_category_shares: np.ndarray
    recent_idx: np.ndarray  # catalog indices, most recent first (unknown items dropped)
    recent_views_7d: np.ndarray
    recent_carts_7d: np.ndarray
    recent_purchases_30d: np.ndarray
    recent_in_cart: np.ndarray
    recent_last_ts: np.ndarray
    bought_idx: np.ndarray  # catalog indices, most often bought first
    bought_counts: np.ndarray
    bought_last_ts: np.ndarray

    @property
    def has_history(self) -> bool:
        """True when the user has at least one event before the as-of time."""
        return not np.isnan(self.timestamps[0])

    @classmethod
    def from_row(cls, user_id: str, row: Mapping[str, object], catalog: Catalog) -> UserState:
        """Build from a mapping of feature name to value (an online-store row or a historical row)."""
        known = any(_present(row.get(name)) for name in _PRESENCE)
        recent_ids = as_list(row.get("recent_item_ids"))
        recent_idx = catalog.lookup(recent_ids)
        keep = recent_idx >= 0
        bought_idx = catalog.lookup(as_list(row.get("bought_item_ids")))
        keep_bought = bought_idx >= 0

        def aligned(name: str, idx: np.ndarray = recent_idx, kept: np.ndarray = keep) -> np.ndarray:
            values = np.asarray(as_list(row.get(name)), dtype=float)
            if len(values) != len(idx):  # absent for this shop (or malformed): missing, never 0
                values = np.full(len(idx), np.nan)
            return values[kept]

        return cls(
            user_id=user_id,
            known=known,
            scalars=np.array([_number(row.get(name)) for name in USER_SCALARS]),
            timestamps=np.array([_number(row.get(name)) for name in USER_TIMESTAMPS]),
            top_categories=tuple(str(c) for c in as_list(row.get("top_category_ids"))),
            top_category_shares=np.asarray(as_list(row.get("top_category_shares")), dtype=float),
            recent_idx=recent_idx[keep],
            recent_views_7d=aligned("recent_item_views_7d"),
            recent_carts_7d=aligned("recent_item_carts_7d"),
            recent_purchases_30d=aligned("recent_item_purchases_30d"),
            recent_in_cart=aligned("recent_item_in_cart"),
            recent_last_ts=aligned("recent_item_last_ts"),
            bought_idx=bought_idx[keep_bought],
            bought_counts=aligned("bought_item_counts", bought_idx, keep_bought),
            bought_last_ts=aligned("bought_item_last_ts", bought_idx, keep_bought),
        )


def _present(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))


def _number(value: object) -> float:
    if value is None:
        return np.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan
