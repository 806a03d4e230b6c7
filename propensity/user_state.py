"""Users' features as the scorer needs them: many users at once as arrays (UserBatch), or one user (UserState).

UserBatch is the one conversion from feature values to arrays. It takes feature columns (feature name ->
one value per user) as Feast's online read, a historical join or an Arrow record batch gives them:
scalars and timestamps become (users x features) matrices, and the per-user lists (recent items, bought
items, favourite categories) become one flat array per feature plus offsets, so a whole chunk of users is
converted and assembled without a per-user Python loop. A list feature is converted when first used,
so scoring users (which needs no bought items) never converts them.

UserState is one user, for the per-user stages (candidates, pair features): UserBatch.user(i), or
UserState.from_row, which converts one row by the same rules without the batch's bookkeeping (a request's
hot path). tests/test_user_batch.py holds both to one per-user reference, on generated and real rows.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import chain, repeat
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from propensity.catalog import UNKNOWN, Catalog

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
# Per-item values aligned with recent_item_ids and with bought_item_ids.
RECENT_VALUES: tuple[str, ...] = (
    "recent_item_views_7d",
    "recent_item_carts_7d",
    "recent_item_purchases_30d",
    "recent_item_in_cart",
    "recent_item_last_ts",
)
BOUGHT_VALUES: tuple[str, ...] = ("bought_item_counts", "bought_item_last_ts")
# Every feature a UserBatch reads (anything else in the columns is ignored).
USER_INPUTS: tuple[str, ...] = (
    USER_SCALARS + USER_TIMESTAMPS + ("top_category_ids", "top_category_shares", "recent_item_ids") + RECENT_VALUES
    + ("bought_item_ids",) + BOUGHT_VALUES
)
# The features the user model's inputs are built from (propensity.assembly.user_matrix reads nothing else):
# what a bulk read for ScoreUsers needs, e.g. OnlineUserFeatures(store, service, only=USER_MODEL_INPUTS).
USER_MODEL_INPUTS: tuple[str, ...] = USER_SCALARS + USER_TIMESTAMPS + (
    "top_category_shares", "recent_item_ids", "recent_item_views_7d", "recent_item_carts_7d", "recent_item_in_cart", "recent_item_last_ts",
)


def read_inputs(served: Collection[str]) -> tuple[str, ...]:
    """The USER_INPUTS that a feature service serving `served` provides; the others are missing (NaN) in training and serving alike.

    This is how a user attribute is kept out of the models (training.sensitive_attributes): a feature service without it
    (propensity_user_v3 has neither gender nor age) leaves its input column missing for every row, so no model can use it.
    """
    return tuple(name for name in USER_INPUTS if name in served)


# Features whose presence tells a known user from an unknown one (columns of USER_TIMESTAMPS).
_PRESENCE = [USER_TIMESTAMPS.index("last_event_ts"), USER_TIMESTAMPS.index("signup_ts")]
_SEQUENCES = (list, tuple, np.ndarray)


class Ragged(NamedTuple):
    """One list per user, flattened: user i's list is values[offsets[i]:offsets[i + 1]]."""

    offsets: np.ndarray  # int64, users + 1
    values: np.ndarray

    def of(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def first(self) -> np.ndarray:
        """Each user's first value as a float, NaN for an empty list."""
        out = np.full(len(self.offsets) - 1, np.nan)
        has = self.lengths > 0
        out[has] = self.values[self.offsets[:-1][has]]
        return out


@dataclass(frozen=True)
class UserState:
    """Scalars, timestamps, favourite categories, recent and most bought items (as catalog indices) of one user.

    The bought_* arrays are empty when the feature service has no purchase history (propensity_user_v1).
    The arrays may be views into a UserBatch: never modify them in place.
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
        """Build from a mapping of feature name to value (an online-store row or a historical row).

        UserBatch's conversion for one row, without the batch's bookkeeping (this is on every request's hot
        path); tests/test_user_batch.py checks that both give identical states on real and malformed rows.
        """
        timestamps = np.array([_number(row.get(name)) for name in USER_TIMESTAMPS])
        recent_idx = _lookup(catalog, _as_list(row.get("recent_item_ids")))
        bought_idx = _lookup(catalog, _as_list(row.get("bought_item_ids")))
        recent_keep, bought_keep = recent_idx != UNKNOWN, bought_idx != UNKNOWN

        def aligned(name: str, idx: np.ndarray = recent_idx, keep: np.ndarray = recent_keep) -> np.ndarray:
            values = _floats(_as_list(row.get(name)))
            if len(values) != len(idx):  # absent for this shop (or malformed): missing, never 0 or shifted
                values = np.full(len(idx), np.nan)
            return values[keep]

        return cls(
            user_id=user_id,
            known=not np.isnan(timestamps[_PRESENCE]).all(),
            scalars=np.array([_number(row.get(name)) for name in USER_SCALARS]),
            timestamps=timestamps,
            top_categories=tuple(str(c) for c in _as_list(row.get("top_category_ids"))),
            top_category_shares=_floats(_as_list(row.get("top_category_shares"))),
            recent_idx=recent_idx[recent_keep],
            recent_views_7d=aligned("recent_item_views_7d"),
            recent_carts_7d=aligned("recent_item_carts_7d"),
            recent_purchases_30d=aligned("recent_item_purchases_30d"),
            recent_in_cart=aligned("recent_item_in_cart"),
            recent_last_ts=aligned("recent_item_last_ts"),
            bought_idx=bought_idx[bought_keep],
            bought_counts=aligned("bought_item_counts", bought_idx, bought_keep),
            bought_last_ts=aligned("bought_item_last_ts", bought_idx, bought_keep),
        )


class UserBatch:
    """Many users' features as arrays, converted from feature columns (each converted on first use).

    columns: feature name -> one value per user: a list (values of Python types, lists or None), a NumPy
    array, or a pyarrow Array / ChunkedArray (list features as Arrow lists). A missing name means missing
    values. Item ids not in the catalog are dropped from the item lists with their per-item values; a
    per-item list whose length differs from its id list is missing (NaN), never shifted.
    """

    def __init__(self, user_ids: Sequence[str], columns: Mapping[str, object], catalog: Catalog | None) -> None:
        self.user_ids = user_ids
        self._columns = columns
        self._catalog = catalog
        self._n = len(user_ids)

    def __len__(self) -> int:
        return self._n

    @classmethod
    def from_rows(cls, user_ids: Sequence[str], rows: Sequence[Mapping[str, object]], catalog: Catalog) -> UserBatch:
        """From one mapping of feature name to value per user (e.g. Feast rows or DataFrame records)."""
        return cls(user_ids, {name: [row.get(name) for row in rows] for name in USER_INPUTS}, catalog)

    @classmethod
    def of(cls, users: Sequence[UserState]) -> UserBatch:
        """The batch of users already converted (their arrays concatenated, nothing converted again)."""
        batch = cls([u.user_id for u in users], {}, None)
        if not users:
            return batch
        width = (len(USER_SCALARS), len(USER_TIMESTAMPS))
        fields = batch.__dict__  # fill the cached properties directly
        fields["scalars"] = np.vstack([u.scalars for u in users]).reshape(len(users), width[0])
        fields["timestamps"] = np.vstack([u.timestamps for u in users]).reshape(len(users), width[1])
        fields["known"] = np.array([u.known for u in users], dtype=bool)
        fields["top_category_ids"] = _joined([np.asarray(u.top_categories, dtype=object) for u in users])
        fields["top_category_shares"] = _joined([u.top_category_shares for u in users])
        fields["recent_idx"] = _joined([u.recent_idx for u in users])
        fields["bought_idx"] = _joined([u.bought_idx for u in users])
        recent = ("recent_views_7d", "recent_carts_7d", "recent_purchases_30d", "recent_in_cart", "recent_last_ts")
        bought = ("bought_counts", "bought_last_ts")
        fields["_aligned_values"] = {
            **{name: _joined([getattr(u, attr) for u in users]) for name, attr in zip(RECENT_VALUES, recent)},
            **{name: _joined([getattr(u, attr) for u in users]) for name, attr in zip(BOUGHT_VALUES, bought)},
        }
        return batch

    # -- per-user scalars ---------------------------------------------------------------------

    @cached_property
    def scalars(self) -> np.ndarray:
        """(users, len(USER_SCALARS)), NaN where missing or not a number."""
        return self._numbers(USER_SCALARS)

    @cached_property
    def timestamps(self) -> np.ndarray:
        """(users, len(USER_TIMESTAMPS)) epoch seconds, NaN where missing."""
        return self._numbers(USER_TIMESTAMPS)

    @cached_property
    def known(self) -> np.ndarray:
        """True for users with a value in any presence feature (an event or a sign-up)."""
        return ~np.isnan(self.timestamps[:, _PRESENCE]).all(axis=1)

    @property
    def has_history(self) -> np.ndarray:
        """True for users with at least one event before the as-of time."""
        return ~np.isnan(self.timestamps[:, 0])

    # -- per-user lists -----------------------------------------------------------------------

    @cached_property
    def top_category_ids(self) -> Ragged:
        offsets, values = _flatten(self._columns.get("top_category_ids"), self._n, strings=True)
        return Ragged(offsets, values.to_numpy(zero_copy_only=False) if isinstance(values, pa.Array) else np.asarray(values, dtype=object))

    @cached_property
    def top_category_shares(self) -> Ragged:
        return Ragged(*_flatten(self._columns.get("top_category_shares"), self._n))

    @cached_property
    def recent_idx(self) -> Ragged:
        """Catalog indices of the recent items, most recent first (unknown items dropped)."""
        return self._items("recent_item_ids").ragged

    @cached_property
    def bought_idx(self) -> Ragged:
        """Catalog indices of the most bought items, most bought first (unknown items dropped)."""
        return self._items("bought_item_ids").ragged

    def recent(self, name: str) -> Ragged:
        """A per-item value of the recent items (one of RECENT_VALUES), aligned with recent_idx."""
        return self._aligned("recent_item_ids", name)

    def bought(self, name: str) -> Ragged:
        """A per-item value of the bought items (one of BOUGHT_VALUES), aligned with bought_idx."""
        return self._aligned("bought_item_ids", name)

    def user(self, i: int) -> UserState:
        """User i as a UserState (its arrays are views into this batch)."""
        user_id = self.user_ids[i]
        return UserState(
            user_id=user_id.as_py() if isinstance(user_id, pa.Scalar) else user_id,
            known=bool(self.known[i]),
            scalars=self.scalars[i],
            timestamps=self.timestamps[i],
            top_categories=tuple(str(c) for c in self.top_category_ids.of(i)),
            top_category_shares=self.top_category_shares.of(i),
            recent_idx=self.recent_idx.of(i),
            recent_views_7d=self.recent("recent_item_views_7d").of(i),
            recent_carts_7d=self.recent("recent_item_carts_7d").of(i),
            recent_purchases_30d=self.recent("recent_item_purchases_30d").of(i),
            recent_in_cart=self.recent("recent_item_in_cart").of(i),
            recent_last_ts=self.recent("recent_item_last_ts").of(i),
            bought_idx=self.bought_idx.of(i),
            bought_counts=self.bought("bought_item_counts").of(i),
            bought_last_ts=self.bought("bought_item_last_ts").of(i),
        )

    # -- conversion ---------------------------------------------------------------------------

    def _numbers(self, names: Sequence[str]) -> np.ndarray:
        columns = [self._columns.get(name) for name in names]
        if all(isinstance(c, list) for c in columns):
            try:  # one C-level conversion for the whole block (None -> NaN)
                return np.array(columns, dtype=float).reshape(len(names), self._n).T.copy()
            except (TypeError, ValueError):
                pass
        out = np.empty((self._n, len(names)))
        for j, column in enumerate(columns):
            out[:, j] = _numbers(column, self._n)
        return out

    def _items(self, ids_name: str) -> _ItemList:
        cache = self.__dict__.setdefault("_item_lists", {})
        if ids_name not in cache:
            offsets, ids = _flatten(self._columns.get(ids_name), self._n, strings=True)
            idx = _lookup(self._catalog, ids)
            keep = idx != UNKNOWN
            if keep.all():
                cache[ids_name] = _ItemList(offsets, None, Ragged(offsets, idx))
            else:  # drop unknown items: a user's known items end where the running count of known items says
                known_before = np.zeros(len(idx) + 1, dtype=np.int64)
                np.cumsum(keep, out=known_before[1:])
                cache[ids_name] = _ItemList(offsets, keep, Ragged(known_before[offsets], idx[keep]))
        return cache[ids_name]

    def _aligned(self, ids_name: str, name: str) -> Ragged:
        cache = self.__dict__.setdefault("_aligned_values", {})
        if name not in cache:
            items = self._items(ids_name)
            offsets, values = _flatten(self._columns.get(name), self._n)
            id_offsets = items.raw_offsets
            if len(values) != id_offsets[-1] or not np.array_equal(offsets, id_offsets):
                # A list of the wrong length (or absent for this shop) is missing for that user, never shifted.
                id_lengths, lengths = np.diff(id_offsets), np.diff(offsets)
                match = np.repeat(lengths == id_lengths, id_lengths)
                source = np.arange(int(id_offsets[-1])) + np.repeat(offsets[:-1] - id_offsets[:-1], id_lengths)
                aligned = np.full(int(id_offsets[-1]), np.nan)
                aligned[match] = values[source[match]]
                values = aligned
            cache[name] = Ragged(items.ragged.offsets, values if items.keep is None else values[items.keep])
        return cache[name]


class _ItemList(NamedTuple):
    raw_offsets: np.ndarray  # offsets of the ids as given (unknown items included)
    keep: np.ndarray | None  # per given id: in the catalog (None: all are)
    ragged: Ragged  # catalog indices of the known items


def _joined(arrays: Sequence[np.ndarray]) -> Ragged:
    lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
    return Ragged(_offsets(lengths), arrays[0] if len(arrays) == 1 else np.concatenate(arrays))


def _offsets(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _arrow(column: object) -> pa.Array | None:
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks()
    return column if isinstance(column, pa.Array) else None


def _all_null(column: object) -> bool:
    """No column, or an Arrow column of nulls only (a bulk read where no user has the feature)."""
    return column is None or (isinstance(column, (pa.Array, pa.ChunkedArray)) and column.null_count == len(column))


def _numbers(column: object, n: int) -> np.ndarray:
    """One float per user: NaN where missing or not a number."""
    if _all_null(column):
        return np.full(n, np.nan)
    arrow = _arrow(column)
    if arrow is not None:
        return arrow.to_numpy(zero_copy_only=False).astype(float)
    try:
        return np.asarray(column, dtype=float)
    except (TypeError, ValueError):
        return np.array([_number(v) for v in column], dtype=float)


def _flatten(column: object, n: int, strings: bool = False) -> tuple[np.ndarray, np.ndarray | pa.Array | list]:
    """Offsets of each user's list (empty where the value is not a list) and all values in one sequence (floats unless strings)."""
    if _all_null(column):
        return np.zeros(n + 1, dtype=np.int64), ([] if strings else np.empty(0))
    arrow = _arrow(column)
    if arrow is not None:
        lengths = pc.fill_null(pc.list_value_length(arrow), 0).to_numpy()
        flat = arrow.flatten()
        return _offsets(lengths), (flat if strings else flat.to_numpy(zero_copy_only=False).astype(float))
    lists = [v if isinstance(v, _SEQUENCES) else () for v in column]  # _as_list, inlined: one call per user adds up
    offsets = _offsets(np.fromiter(map(len, lists), dtype=np.int64, count=len(lists)))
    return offsets, (list(chain.from_iterable(lists)) if strings else _floats(lists, int(offsets[-1])))


def _floats(values: Sequence, count: int | None = None) -> np.ndarray:
    """values as floats (None -> NaN); with count, values is a sequence of lists holding count values in all."""
    try:
        if count is None:
            return np.array(values, dtype=float)
        return np.fromiter(chain.from_iterable(values), dtype=float, count=count)
    except (TypeError, ValueError):  # None inside a list: missing
        return np.array(list(chain.from_iterable(values)) if count is not None else list(values), dtype=float)


def _lookup(catalog: Catalog, ids: pa.Array | list) -> np.ndarray:
    """Catalog indices of item ids, UNKNOWN where not in the catalog."""
    if not len(ids):
        return np.empty(0, dtype=np.int64)
    if isinstance(ids, pa.Array):
        found = pc.index_in(ids.cast(pa.string()), value_set=pa.array(catalog.item_ids, type=pa.string()))
        return pc.fill_null(found, UNKNOWN).to_numpy().astype(np.int64)
    return np.fromiter(map(catalog.index.get, ids, repeat(UNKNOWN)), dtype=np.int64, count=len(ids))


def _as_list(value: object) -> Sequence:
    """A list feature's value as a sequence: list, tuple or array as they are, anything else (None, NaN) empty."""
    return value if isinstance(value, _SEQUENCES) else ()


def _number(value: object) -> float:
    if value is None:
        return np.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan
