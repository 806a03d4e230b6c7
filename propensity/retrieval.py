"""Retrieval signals: how strongly each catalog item is suggested for a user, by every candidate source.

One row of signals per catalog item, computed once per user (request or training row) and used twice:
their weighted sum picks the candidates (propensity.candidates), and the same values become ranker
features (propensity.assembly). Shared by training and serving, so both see identical numbers.

Sources: the user's recent items and cart, their purchase history, ALS (the user's vector is folded in
from their items against the catalog's item factors, so real-time events count at once), time-decayed
co-purchase neighbours, co-visitation neighbours, content neighbours, category affinity and popularity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.linalg.lapack import dposv as _posv

from propensity.catalog import UNKNOWN, Catalog
from propensity.user_state import UserState

DAY_SECONDS = 86_400.0
SIGNALS: tuple[str, ...] = (
    "recent",  # 1 for the user's recent items (30 days)
    "in_cart",  # 1 while carted and not bought since
    "recent_recency",  # 0.5 ** (days since the last interaction / 7)
    "bought",  # log(1 + times bought, whole history)
    "bought_recency",  # 0.5 ** (days since last bought / 60)
    "bought_decayed",  # log(1 + times bought x bought_recency): frequent and recent
    "als",  # folded-in user vector . item factors
    "copurchase",  # log(1 + co-purchase scores from the user's items, weighted by interaction)
    "covisited",  # log(1 + summed co-visitation scores from the user's recent items)
    "content",  # log(1 + content similarity from the user's items, weighted by interaction)
    "category",  # the user's share of events in the item's category
    "popularity",  # log(1 + the catalog's popularity score)
    "purchases_7d",  # log(1 + the item's purchases in 7 days): what is selling now
    "buyers_30d",  # log(1 + the item's distinct buyers in 30 days)
)
# Which candidate source a signal speaks for (what `explain` shows as the item's source).
SOURCE_OF_SIGNAL: dict[str, str] = {
    "recent": "recent", "in_cart": "recent", "recent_recency": "recent",
    "bought": "bought_before", "bought_recency": "bought_before", "bought_decayed": "bought_before",
    "als": "als", "copurchase": "copurchase", "covisited": "covisited", "content": "content",
    "category": "category_popular", "popularity": "popular", "purchases_7d": "popular", "buyers_30d": "popular",
}
# Used when a model version carries no fitted weights (models trained before retrieval was learned).
DEFAULT_WEIGHTS: dict[str, float] = {
    "recent": 2.0, "in_cart": 1.0, "recent_recency": 1.0, "bought": 0.5, "bought_recency": 1.0, "bought_decayed": 0.5, "als": 1.0,
    "copurchase": 0.3, "covisited": 0.3, "content": 0.3, "category": 1.0, "popularity": 0.4, "purchases_7d": 0.0, "buyers_30d": 0.0,
}
KNOWN, NEW = "known", "new"  # items the user has interacted with (recent or bought), and all others
_COLUMN = {name: j for j, name in enumerate(SIGNALS)}
_RECENT_HALF_LIFE_DAYS = 7.0
_BOUGHT_HALF_LIFE_DAYS = 60.0
_SEED_RECENT = 10  # most recent items whose co-visited neighbours are suggested
# Fold-in confidence per interaction (the offline ALS matrix uses the same weights: training/item_retrieval.py).
_VIEW, _CART, _PURCHASE = 1.0, 3.0, 5.0


@dataclass(frozen=True)
class UserSignals:
    """by_signal[j, i] = signal SIGNALS[j] of catalog item i; the extra last column (UNKNOWN items) is all zero.

    Stored signal-major: every source writes one contiguous row, and the retrieval score over the whole
    catalog is one matrix-vector product over contiguous memory (item-major, each source's write strode
    across 14 columns of a 1,500 x 14 matrix on every request).
    """

    by_signal: np.ndarray

    @property
    def values(self) -> np.ndarray:
        """values[i, j] = signal SIGNALS[j] of catalog item i (a view, no copy)."""
        return self.by_signal.T

    def at(self, item_idx: np.ndarray) -> np.ndarray:
        """Rows for catalog indices (UNKNOWN allowed)."""
        return self.by_signal[:, np.where(item_idx == UNKNOWN, self.by_signal.shape[1] - 1, item_idx)].T


@dataclass(frozen=True)
class RetrievalWeights:
    """Two linear scores on the signals, one for items the user knows (recent or bought) and one for new items.

    Each is a fitted log-odds of "bought within the horizon" (training/retrieval_fit.py), so the two
    segments compare on one scale: a rebuy and a discovery compete for the candidate budget by probability.
    """

    known: np.ndarray
    known_intercept: float
    new: np.ndarray
    new_intercept: float

    @classmethod
    def from_json(cls, data: Mapping[str, Mapping[str, float]] | None) -> RetrievalWeights:
        """From {"known": {signal: w, "intercept": b}, "new": {...}} (missing signals weigh 0); None gives the defaults."""
        if data is None:
            data = {KNOWN: {**DEFAULT_WEIGHTS, "intercept": 0.0}, NEW: {**DEFAULT_WEIGHTS, "intercept": -2.0}}

        def vector(segment: Mapping[str, float]) -> np.ndarray:
            return np.array([float(segment.get(name, 0.0)) for name in SIGNALS])

        return cls(vector(data[KNOWN]), float(data[KNOWN].get("intercept", 0.0)), vector(data[NEW]), float(data[NEW].get("intercept", 0.0)))

    def to_json(self) -> dict[str, dict[str, float]]:
        return {
            segment: {**{n: round(float(v), 6) for n, v in zip(SIGNALS, w)}, "intercept": round(b, 6)}
            for segment, w, b in ((KNOWN, self.known, self.known_intercept), (NEW, self.new, self.new_intercept))
        }

    def score(self, values: np.ndarray) -> np.ndarray:
        """Retrieval log-odds of each row of signals."""
        return self.score_by_signal(np.asarray(values).T)

    def score_by_signal(self, by_signal: np.ndarray) -> np.ndarray:
        """Retrieval log-odds of each column of signal-major values (UserSignals.by_signal)."""
        score = self.new @ by_signal + self.new_intercept
        known = np.flatnonzero(_known_mask(by_signal))  # a user's own items are a few dozen of the catalog: rescore only those
        score[known] = self.known @ by_signal[:, known] + self.known_intercept
        return score

    def sources(self, values: np.ndarray) -> np.ndarray:
        """Per row: the source whose weighted signals contribute most (object array of source names)."""
        return SOURCE_NAMES[self.source_codes(np.asarray(values).T)]

    def source_codes(self, by_signal: np.ndarray) -> np.ndarray:
        """Per column of signal-major values: the index in SOURCE_NAMES of the source whose weighted signals contribute most."""
        if not by_signal.shape[1]:
            return np.empty(0, dtype=np.int64)
        weights = np.where(_known_mask(by_signal), self.known[:, None], self.new[:, None])
        per_source = _SOURCE_ONE_HOT.T @ (by_signal * weights)
        strongest = np.argmax(per_source, axis=0)
        # An item no source speaks for only fills the budget, as the least popular of the popular ones.
        strongest[per_source.max(axis=0) <= 0] = _POPULAR
        return strongest


def known_items(values: np.ndarray) -> np.ndarray:
    """Rows of signals for items the user has interacted with (recent) or bought."""
    return _known_mask(np.asarray(values).T)


def _known_mask(by_signal: np.ndarray) -> np.ndarray:
    return (by_signal[_COLUMN["recent"]] > 0) | (by_signal[_COLUMN["bought"]] > 0)


def stored_weights(metadata: Mapping[str, object]) -> Mapping[str, Mapping[str, float]] | None:
    """The retrieval weights a model version was trained with (None for versions trained before they were fitted)."""
    retrieval = metadata.get("retrieval")
    return retrieval.get("weights") if isinstance(retrieval, Mapping) else None


def user_signals(user: UserState, catalog: Catalog, as_of_ts: float) -> UserSignals:
    """Every signal for every catalog item, for one user at as_of_ts (epoch seconds)."""
    n = catalog.size
    by_signal = np.empty((len(SIGNALS), n + 1))
    row = _COLUMN
    by_signal[: row["bought_decayed"] + 1] = 0.0  # the user's own items (sparse rows); every other row is written whole
    by_signal[:, n] = 0.0
    recent = user.recent_idx
    if len(recent):
        by_signal[row["recent"], recent] = 1.0
        by_signal[row["in_cart"], recent] = _zero_nan(user.recent_in_cart)
        age = np.maximum(as_of_ts - user.recent_last_ts, 0.0) / DAY_SECONDS
        by_signal[row["recent_recency"], recent] = _zero_nan(0.5 ** (age / _RECENT_HALF_LIFE_DAYS))
    bought = user.bought_idx
    if len(bought):
        counts = _zero_nan(user.bought_counts)
        by_signal[row["bought"], bought] = np.log1p(counts)
        age = np.maximum(as_of_ts - user.bought_last_ts, 0.0) / DAY_SECONDS
        decay = _zero_nan(0.5 ** (age / _BOUGHT_HALF_LIFE_DAYS))
        by_signal[row["bought_recency"], bought] = decay
        by_signal[row["bought_decayed"], bought] = np.log1p(counts * decay)
    seeds, seed_weights = _interactions(user, as_of_ts)
    _als_scores(catalog, seeds, seed_weights, out=by_signal[row["als"], :n])
    matrices = catalog.neighbour_matrices
    np.log1p(neighbour_sum(matrices["copurchase"], seeds, seed_weights), out=by_signal[row["copurchase"], :n])
    recent_seeds = recent[:_SEED_RECENT]
    np.log1p(neighbour_sum(matrices["neighbors"], recent_seeds, np.ones(len(recent_seeds))), out=by_signal[row["covisited"], :n])
    np.log1p(neighbour_sum(matrices["content"], seeds, seed_weights), out=by_signal[row["content"], :n])
    by_signal[row["category"], :n] = _category_share(user, catalog)
    by_signal[row["popularity"] : row["buyers_30d"] + 1, :n] = catalog.popularity_by_signal
    return UserSignals(by_signal)


_SOURCES = tuple(dict.fromkeys(SOURCE_OF_SIGNAL.values()))
SOURCE_NAMES = np.asarray(_SOURCES, dtype=object)  # what RetrievalWeights.source_codes index
SOURCE_CODE = {name: code for code, name in enumerate(_SOURCES)}
_POPULAR = SOURCE_CODE["popular"]
_SOURCE_GROUP = np.array([_SOURCES.index(SOURCE_OF_SIGNAL[name]) for name in SIGNALS])
_SOURCE_ONE_HOT = np.eye(len(_SOURCES))[_SOURCE_GROUP]  # (signals, sources): sums each source's signals in one product


def fold_in(catalog: Catalog, idx: np.ndarray, weight: np.ndarray) -> np.ndarray | None:
    """A user's ALS vector from their items and interaction weights (Hu, Koren & Volinsky's implicit update); None without one."""
    factors = catalog.item_factors
    if factors is None:
        return None
    has_vector = catalog.has_factors[idx] if len(idx) else np.zeros(0, dtype=bool)
    idx, weight = idx[has_vector], weight[has_vector]
    if not len(idx):
        return None
    y = factors[idx].astype(np.float64)
    confidence = catalog.als_alpha * weight  # implicit's convention: confidence = alpha x interaction weight
    # (Y'Y + lambda I + Y_u'(C_u - I)Y_u) x = Y_u' C_u p_u, with p = 1 on the user's items (implicit's exact user update).
    a = catalog.regularized_gram + (y.T * (confidence - 1.0)) @ y
    b = y.T @ confidence
    # Symmetric positive definite when lambda > 0 (Y'Y holds each of the user's rows, so no confidence >= 0 can
    # take it below lambda I): Cholesky (LAPACK posv) costs half of a general solve on the 64 x 64 system of every
    # request. Without regularisation it can be singular: the least-squares solution then, never an error.
    _, x, info = _posv(a, b, lower=0, overwrite_a=0, overwrite_b=0)
    return x if info == 0 else np.linalg.lstsq(a, b, rcond=None)[0]


def _als_scores(catalog: Catalog, idx: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
    """out[:] = the folded-in user vector . each catalog item's factors (0 without a vector)."""
    vector = fold_in(catalog, idx, weight)
    if vector is None:
        out[:] = 0.0
    else:
        # In float32 like the factors (a float64 vector would make numpy copy the whole matrix to float64 first).
        out[:] = catalog.item_factors[: catalog.size] @ vector.astype(np.float32)


def _interactions(user: UserState, as_of_ts: float) -> tuple[np.ndarray, np.ndarray]:
    """The user's items and interaction weights (recent views and carts, purchases decayed by age), one entry per item."""
    recent_weight = (
        _VIEW * _zero_nan(user.recent_views_7d) + _CART * _zero_nan(user.recent_carts_7d) + _PURCHASE * _zero_nan(user.recent_purchases_30d)
    )
    recent_weight = np.maximum(recent_weight, _VIEW)  # an interaction older than 7 days still says something
    age = np.maximum(as_of_ts - user.bought_last_ts, 0.0) / DAY_SECONDS
    bought_weight = _PURCHASE * _zero_nan(user.bought_counts) * _zero_nan(0.5 ** (age / _BOUGHT_HALF_LIFE_DAYS))
    idx = np.concatenate([user.recent_idx, user.bought_idx]).astype(np.int64)
    weight = np.concatenate([recent_weight, bought_weight])
    if not len(idx):
        return idx, weight
    # Sorted unique items with their summed weights (np.unique + bincount, in a third of the calls).
    order = np.argsort(idx, kind="stable")
    idx, weight = idx[order], weight[order]
    first = np.flatnonzero(np.concatenate([[True], idx[1:] != idx[:-1]]))
    return idx[first], np.add.reduceat(weight, first)


def neighbour_sum(matrix: sp.csr_matrix, seeds: np.ndarray, seed_weights: np.ndarray) -> np.ndarray:
    """Sum over the seed items of (seed weight x neighbour score) for every catalog item.

    The seeds' rows are gathered straight from the CSR arrays and summed with one bincount: the same
    product as matrix[seeds].T @ weights without scipy's per-call overhead (a third of a request's time).
    """
    n = matrix.shape[1]
    if not len(seeds):
        return np.zeros(n)
    starts, ends = matrix.indptr[seeds], matrix.indptr[np.asarray(seeds) + 1]
    lengths = ends - starts
    total = int(lengths.sum())
    if not total:
        return np.zeros(n)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(total)
    weights = np.repeat(np.asarray(seed_weights, dtype=float), lengths) * matrix.data[offsets]
    return np.bincount(matrix.indices[offsets], weights=weights, minlength=n)


def _zero_nan(values: np.ndarray) -> np.ndarray:
    """values as floats with NaN (a count the shop does not record) as 0; cheaper than np.nan_to_num on small arrays."""
    out = np.array(values, dtype=float)
    out[np.isnan(out)] = 0.0
    return out


def category_affinity(user: UserState, catalog: Catalog) -> tuple[np.ndarray, np.ndarray]:
    """Per category code, plus a last slot for items without a category: the user's share of events in it and
    its rank among the user's favourite categories (0 and NaN for categories the user does not favour)."""
    share = np.zeros(len(catalog.category_names) + 1)
    rank = np.full(len(catalog.category_names) + 1, np.nan)
    for r, (category, value) in enumerate(zip(user.top_categories, user.top_category_shares)):
        code = catalog.category_code_of.get(category)
        if code is not None:
            share[code], rank[code] = value, r
    return share, rank


def _category_share(user: UserState, catalog: Catalog) -> np.ndarray:
    return category_affinity(user, catalog)[0][catalog.category_codes]
