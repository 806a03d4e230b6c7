"""Model inputs from features: one function per model, used unchanged by training and serving.

Everything time-relative (recency, ages) is computed here against an as-of time: the cut-off
in training, the request time in serving. Nothing here reads a store.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from propensity.catalog import ITEM_FEATURES, UNKNOWN, Catalog
from propensity.retrieval import SIGNALS, UserSignals, category_affinity, user_signals
from propensity.user_state import USER_SCALARS, USER_TIMESTAMPS, UserBatch, UserState

DAY_SECONDS = 86_400.0

USER_DERIVED: tuple[str, ...] = (
    "days_since_last_event",
    "days_since_last_purchase",
    "days_since_first_event",
    "account_age_days",
    "n_recent_items",
    "n_items_in_cart",
    "top_category_share",
    # Intent concentrated on one item says more than the same events spread thin (repeat views before a purchase).
    "max_item_views_7d",
    "max_item_carts_7d",
    "n_items_carted_7d",
    "in_cart_max_views_7d",
    "days_since_last_in_cart_item",
)
USER_MODEL_FEATURES: tuple[str, ...] = USER_SCALARS + USER_DERIVED

PAIR_FEATURES: tuple[str, ...] = (
    "ui_views_7d",
    "ui_carts_7d",
    "ui_purchases_30d",
    "ui_in_cart",
    "ui_days_since_last",
    "ui_recent_rank",
    "ui_category_share",
    "ui_category_rank",
    "ui_price_ratio",
    "ui_covisit_score",
    "item_popularity_rank",
    "ui_times_bought",
    "ui_days_since_bought",
    # Retrieval signals (propensity.retrieval; item feature service propensity_item_v2): each source's score.
    "ui_als_score",
    "ui_copurchase_score",
    "ui_content_score",
    # Where the item is in the user's own re-buy cycle: days since bought / the user's average days between buys of it.
    "ui_rebuy_phase",
    # Days between this item's last purchase and the user's last purchase: 0 = in the latest order (orders often repeat).
    "ui_days_before_last_order",
)
RANKER_FEATURES: tuple[str, ...] = USER_MODEL_FEATURES + ITEM_FEATURES + PAIR_FEATURES

_PRICE = ITEM_FEATURES.index("item_price")
_AVG_PRICE = USER_SCALARS.index("avg_purchase_price_30d")


def user_vector(user: UserState, as_of_ts: float) -> np.ndarray:
    """The user model's input row (USER_MODEL_FEATURES) at as_of_ts (epoch seconds): user_matrix of one user."""
    shares = user.top_category_shares
    return _user_rows(
        user.scalars[None, :], user.timestamps[None, :], np.array([0, len(user.recent_idx)]), user.recent_views_7d,
        user.recent_carts_7d, user.recent_in_cart, user.recent_last_ts, np.array([shares[0] if len(shares) else np.nan]), as_of_ts,
    )[0]


def user_matrix(users: UserBatch | Sequence[UserState], as_of_ts: float | Sequence[float] | np.ndarray) -> np.ndarray:
    """User model inputs (USER_MODEL_FEATURES) for many users at one as-of time or one per user, vectorised."""
    batch = users if isinstance(users, UserBatch) else UserBatch.of(list(users))
    return _user_rows(
        batch.scalars, batch.timestamps, batch.recent_idx.offsets, batch.recent("recent_item_views_7d").values,
        batch.recent("recent_item_carts_7d").values, batch.recent("recent_item_in_cart").values,
        batch.recent("recent_item_last_ts").values, batch.top_category_shares.first(), as_of_ts,
    )


def _user_rows(
    scalars: np.ndarray, timestamps: np.ndarray, offsets: np.ndarray, views: np.ndarray, carts: np.ndarray, in_cart: np.ndarray,
    last_ts: np.ndarray, top_share: np.ndarray, as_of_ts: float | Sequence[float] | np.ndarray,
) -> np.ndarray:
    """The one implementation of the user model's inputs: per-user rows from per-user scalars and flat per-item lists.

    User i's recent items are views[offsets[i]:offsets[i + 1]] (and so on): the lists are reduced per user with
    np.ufunc.reduceat, a few array operations for a whole chunk of users, no per-user Python loop. Missing values
    stay NaN (a maximum over a list with a missing value is missing); counts over an empty list are 0.
    """
    n = len(scalars)
    out = np.empty((n, len(USER_MODEL_FEATURES)))
    if not n:
        return out
    times = np.asarray(as_of_ts, dtype=float)
    if times.ndim:
        times = times[:, None]
    out[:, : len(USER_SCALARS)] = scalars
    out[:, _AGES] = (times - timestamps[:, _AGE_OF]) / DAY_SECONDS  # NaN stays NaN
    lengths = np.diff(offsets)
    out[:, _COLUMN["n_recent_items"]] = lengths
    out[:, _COLUMN["top_category_share"]] = top_share
    nonempty = lengths > 0
    if not nonempty.all():  # users without recent items: no item in cart, no intent
        out[:, _COLUMN["n_items_in_cart"]] = 0.0
        out[:, _INTENT] = np.nan
        if not nonempty.any():
            return out
    carted = in_cart > 0  # NaN (a shop without carts) is not in cart
    starts = offsets[:-1][nonempty]
    add, most = np.add.reduceat, np.maximum.reduceat
    in_cart_items = add(in_cart, starts)  # NaN when the shop records no carts
    recorded = add(~np.isnan(carts), starts, dtype=np.int64) > 0  # some cart count is known
    carted_items = add(carts > 0, starts, dtype=np.int64)
    any_in_cart = add(carted, starts, dtype=np.int64) > 0
    # The most views and carts of one item (NaN if any is missing); the most views of an in-cart item, ignoring
    # missing ones (fmax); the freshest in-cart interaction.
    cart_views = np.fmax.reduceat(np.where(carted, views, np.nan), starts)
    freshest = most(np.where(carted, last_ts, -np.inf), starts)
    if times.ndim:
        times = times[nonempty, 0]
    derived = np.column_stack([
        in_cart_items, most(views, starts), most(carts, starts), np.where(recorded, carted_items, np.nan), cart_views,
        np.where(any_in_cart, (times - freshest) / DAY_SECONDS, np.nan),
    ])
    if nonempty.all():
        out[:, _REDUCED] = derived
    else:
        out[np.ix_(nonempty, _REDUCED)] = derived
    return out


_COLUMN = {name: j for j, name in enumerate(USER_MODEL_FEATURES)}
_AGE_OF = [USER_TIMESTAMPS.index(name) for name in ("last_event_ts", "last_purchase_ts", "first_event_ts", "signup_ts")]
_AGES = [_COLUMN[name] for name in ("days_since_last_event", "days_since_last_purchase", "days_since_first_event", "account_age_days")]
_INTENT = [_COLUMN[name] for name in ("max_item_views_7d", "max_item_carts_7d", "n_items_carted_7d", "in_cart_max_views_7d", "days_since_last_in_cart_item")]
_REDUCED = [_COLUMN["n_items_in_cart"], *_INTENT]


def pair_matrix(
    user: UserState, catalog: Catalog, item_idx: np.ndarray, as_of_ts: float, user_row: np.ndarray | None = None, signals: UserSignals | None = None
) -> np.ndarray:
    """The ranker's inputs (RANKER_FEATURES) for one user and candidate items (catalog indices, UNKNOWN allowed).

    signals: the user's retrieval signals when the caller has them already (CandidateSet.signals); computed otherwise.
    """
    n = len(item_idx)
    if user_row is None:
        user_row = user_vector(user, as_of_ts)
    if signals is None:
        signals = user_signals(user, catalog, as_of_ts)
    out = np.empty((n, len(RANKER_FEATURES)))
    n_user = len(USER_MODEL_FEATURES)
    n_item = len(ITEM_FEATURES)
    out[:, :n_user] = user_row
    out[:, n_user : n_user + n_item] = catalog.features[item_idx]
    out[:, n_user + n_item :] = _pair_columns(user, catalog, item_idx, as_of_ts, signals.at(np.asarray(item_idx)))
    return out


_SIGNAL = {name: j for j, name in enumerate(SIGNALS)}


def _pair_columns(user: UserState, catalog: Catalog, item_idx: np.ndarray, as_of_ts: float, signals: np.ndarray) -> np.ndarray:
    n = len(item_idx)
    cols = np.full((n, len(PAIR_FEATURES)), np.nan)
    # Per-(user, item) state: where each candidate sits in the user's recent list (counts 0 when absent).
    cols[:, 0:4] = 0.0
    hit, src = _positions(user.recent_idx, item_idx)
    cols[hit, 0] = user.recent_views_7d[src]
    cols[hit, 1] = user.recent_carts_7d[src]
    cols[hit, 2] = user.recent_purchases_30d[src]
    cols[hit, 3] = user.recent_in_cart[src]
    cols[hit, 4] = (as_of_ts - user.recent_last_ts[src]) / DAY_SECONDS
    cols[hit, 5] = src
    # User x category affinity for each candidate's category (integer category codes: no object comparisons).
    no_category = len(catalog.category_names)
    codes = np.full(n, no_category, dtype=np.int64)
    known = item_idx != UNKNOWN
    codes[known] = catalog.category_codes[item_idx[known]]
    share_of, rank_of = category_affinity(user, catalog)
    share_of[no_category] = np.nan  # an item without a category has no share, not a share of 0
    cols[:, 6] = share_of[codes]
    cols[:, 7] = rank_of[codes]
    avg_price = user.scalars[_AVG_PRICE]
    cols[:, 8] = catalog.features[item_idx, _PRICE] / avg_price if avg_price and avg_price > 0 else np.nan
    cols[:, 9] = signals[:, _SIGNAL["covisited"]]
    popularity_rank = np.full(n, np.nan)
    known = item_idx != UNKNOWN
    popularity_rank[known] = catalog.popularity_rank[item_idx[known]]
    cols[:, 10] = popularity_rank
    # Whole purchase history (propensity_user_v2; empty under v1): how often and how long ago it was bought.
    cols[:, 11] = 0.0
    hit, src = _positions(user.bought_idx, item_idx)
    cols[hit, 11] = user.bought_counts[src]
    cols[hit, 12] = (as_of_ts - user.bought_last_ts[src]) / DAY_SECONDS
    cols[:, 13] = signals[:, _SIGNAL["als"]]
    cols[:, 14] = signals[:, _SIGNAL["copurchase"]]
    cols[:, 15] = signals[:, _SIGNAL["content"]]
    # The average gap between buys of an item, from its count over the user's history (first event to as-of).
    history_days = (as_of_ts - user.timestamps[USER_TIMESTAMPS.index("first_event_ts")]) / DAY_SECONDS
    cycle = history_days / np.maximum(user.bought_counts[src], 1.0)
    cols[hit, 16] = cols[hit, 12] / np.where(cycle > 0, cycle, np.nan)
    last_order = user.timestamps[USER_TIMESTAMPS.index("last_purchase_ts")]
    cols[hit, 17] = (last_order - user.bought_last_ts[src]) / DAY_SECONDS
    return cols


def _positions(source_idx: np.ndarray, item_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each candidate: whether it is in source_idx (a per-user item list) and its position there."""
    if not len(source_idx):
        return np.zeros(len(item_idx), dtype=bool), np.empty(0, dtype=np.int64)
    order = np.argsort(source_idx, kind="stable")
    sorted_source = source_idx[order]
    pos = np.minimum(np.searchsorted(sorted_source, item_idx), len(sorted_source) - 1)
    hit = (sorted_source[pos] == item_idx) & (item_idx != UNKNOWN)
    return hit, order[pos[hit]]
