"""The vectorised user path (UserBatch -> user_matrix) against the per-user definitions it replaced.

REFERENCE below is the per-user code as it was before bulk scoring (UserState.from_row and user_vector,
one user at a time, with one change: a user is known when a presence timestamp is a number). Every path
must reproduce it exactly, NaN for NaN: UserState.from_row, UserBatch from Python columns, from Arrow
columns, and from already converted states. Rows are generated with everything that goes wrong in
practice: missing features, None and NaN, empty and absent lists, lists of the wrong length, items
unknown to the catalog, all-missing per-item values, unknown users. tests/test_batch_scoring.py repeats
the comparison on real rows from the online store and from Feast's point-in-time join.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from propensity.assembly import USER_MODEL_FEATURES, user_matrix, user_vector
from propensity.catalog import Catalog, as_list
from propensity.user_state import (
    BOUGHT_VALUES, RECENT_VALUES, USER_INPUTS, USER_MODEL_INPUTS, USER_SCALARS, USER_TIMESTAMPS, UserBatch, UserState,
)

DAY = 86_400.0
NOW = 1_700_000_000.0
ITEMS = [f"i{k}" for k in range(40)]
STATE_FIELDS = (
    "scalars", "timestamps", "top_category_shares", "recent_idx", "recent_views_7d", "recent_carts_7d", "recent_purchases_30d",
    "recent_in_cart", "recent_last_ts", "bought_idx", "bought_counts", "bought_last_ts",
)


# -- the reference: the per-user code before bulk scoring --------------------------------------


def _number(value: object) -> float:
    if value is None:
        return np.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan


def reference_state(user_id: str, row: dict, catalog: Catalog) -> UserState:
    recent_idx = catalog.lookup(as_list(row.get("recent_item_ids")))
    keep = recent_idx >= 0
    bought_idx = catalog.lookup(as_list(row.get("bought_item_ids")))
    keep_bought = bought_idx >= 0

    def aligned(name: str, idx: np.ndarray = recent_idx, kept: np.ndarray = keep) -> np.ndarray:
        values = np.asarray(as_list(row.get(name)), dtype=float)
        if len(values) != len(idx):
            values = np.full(len(idx), np.nan)
        return values[kept]

    timestamps = np.array([_number(row.get(name)) for name in USER_TIMESTAMPS])
    return UserState(
        user_id=user_id,
        known=not np.isnan(timestamps[[0, 3]]).all(),
        scalars=np.array([_number(row.get(name)) for name in USER_SCALARS]),
        timestamps=timestamps,
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


def reference_vector(user: UserState, as_of_ts: float) -> np.ndarray:
    ages = (as_of_ts - user.timestamps) / DAY
    views, carts = user.recent_views_7d, user.recent_carts_7d
    in_cart = np.nan_to_num(user.recent_in_cart) > 0
    derived = [
        ages[USER_TIMESTAMPS.index("last_event_ts")],
        ages[USER_TIMESTAMPS.index("last_purchase_ts")],
        ages[USER_TIMESTAMPS.index("first_event_ts")],
        ages[USER_TIMESTAMPS.index("signup_ts")],
        float(len(user.recent_idx)),
        float(user.recent_in_cart.sum()) if len(user.recent_in_cart) else 0.0,
        float(user.top_category_shares[0]) if len(user.top_category_shares) else np.nan,
        float(np.max(views)) if len(views) and not np.isnan(views).all() else np.nan,
        float(np.max(carts)) if len(carts) and not np.isnan(carts).all() else np.nan,
        float((np.nan_to_num(carts) > 0).sum()) if len(carts) and not np.isnan(carts).all() else np.nan,
        float(np.nanmax(views[in_cart])) if in_cart.any() and not np.isnan(views[in_cart]).all() else np.nan,
        float((as_of_ts - np.max(user.recent_last_ts[in_cart])) / DAY) if in_cart.any() else np.nan,
    ]
    return np.concatenate([user.scalars, derived])


# -- generated rows --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.from_frame(pd.DataFrame({"item_id": ITEMS, "category_id": [f"c{k % 5}" for k in range(len(ITEMS))]}))


def _missing(rng: np.random.Generator) -> object:
    return [None, np.nan][int(rng.integers(2))]


def generated_row(rng: np.random.Generator, python_only: bool = False) -> dict:
    """One feature row as a store could return it, including every kind of missing and malformed value."""
    kind = rng.choice(["full", "full", "full", "unknown", "profile_only", "expired_activity", "empty"])
    if kind == "empty":
        return {}
    if kind == "unknown":  # the store knows nothing: every feature None
        return {name: None for name in USER_INPUTS}
    row: dict = {}
    for name in USER_SCALARS:
        row[name] = _missing(rng) if rng.random() < 0.15 else (float(rng.integers(0, 50)) if rng.random() < 0.5 else int(rng.integers(0, 50)))
    if not python_only and rng.random() < 0.05:
        row["views_7d"] = "lots"  # not a number: missing
    row["signup_ts"] = int(NOW - rng.integers(1, 900) * DAY) if rng.random() < 0.8 else None
    if kind == "profile_only":
        return {"signup_ts": row["signup_ts"] or int(NOW - DAY), "age": row["age"]}
    last = NOW - float(rng.integers(0, 40 * 86_400))
    row["last_event_ts"] = None if kind == "expired_activity" else int(last)
    row["first_event_ts"] = None if kind == "expired_activity" else int(last - rng.integers(0, 60 * 86_400))
    row["last_purchase_ts"] = int(last - rng.integers(0, 86_400 * 20)) if rng.random() < 0.4 else None
    n_cat = int(rng.integers(0, 5))
    row["top_category_ids"] = [f"c{k}" for k in rng.permutation(5)[:n_cat]] if rng.random() < 0.9 else None
    row["top_category_shares"] = sorted(rng.random(n_cat).tolist(), reverse=True) if row["top_category_ids"] is not None else None
    n = int(rng.integers(0, 12))
    ids = [ITEMS[k] if rng.random() < 0.85 else f"ghost{k}" for k in rng.integers(0, len(ITEMS), size=n)]
    row["recent_item_ids"] = ids if kind != "expired_activity" else None
    for name in RECENT_VALUES:
        values: object = rng.integers(0, 4, size=n).tolist()
        if name == "recent_item_in_cart":
            values = (rng.random(n) < 0.3).astype(int).tolist()
        if name == "recent_item_last_ts":
            values = [int(last - rng.integers(0, 86_400 * 30)) for _ in range(n)]
        roll = rng.random()
        if roll < 0.07:
            values = None  # a shop that does not record it
        elif roll < 0.10:
            values = list(values)[: max(n - 1, 0)] + ([] if n else [1])  # wrong length: missing, never shifted
        elif roll < 0.13 and n:
            values = [float("nan")] * n  # all missing
        elif roll < 0.16 and n and not python_only:
            values = np.asarray(values)  # Feast hands lists over as arrays too
        row[name] = values
    m = int(rng.integers(0, 6))
    bought = [ITEMS[k] if rng.random() < 0.9 else f"ghost-b{k}" for k in rng.integers(0, len(ITEMS), size=m)]
    if rng.random() < 0.7:
        row["bought_item_ids"] = bought
        row["bought_item_counts"] = rng.integers(1, 6, size=m).tolist()
        row["bought_item_last_ts"] = [int(last - rng.integers(0, 86_400 * 300)) for _ in range(m)] if rng.random() < 0.9 else None
    return row


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    rng = np.random.default_rng(20261201)
    return [generated_row(rng) for _ in range(600)]


def assert_same_state(actual: UserState, expected: UserState) -> None:
    assert actual.user_id == expected.user_id
    assert actual.known == expected.known
    assert actual.top_categories == expected.top_categories
    for name in STATE_FIELDS:
        np.testing.assert_array_equal(getattr(actual, name), getattr(expected, name), err_msg=name)


# -- the tests -------------------------------------------------------------------------------------


def test_from_row_reproduces_the_reference_state_and_vector(rows: list[dict], catalog: Catalog) -> None:
    for i, row in enumerate(rows):
        state = UserState.from_row(f"u{i}", row, catalog)
        expected = reference_state(f"u{i}", row, catalog)
        assert_same_state(state, expected)
        np.testing.assert_array_equal(user_vector(state, NOW), reference_vector(expected, NOW))


def test_user_batch_from_rows_equals_the_per_user_reference(rows: list[dict], catalog: Catalog) -> None:
    ids = [f"u{i}" for i in range(len(rows))]
    batch = UserBatch.from_rows(ids, rows, catalog)
    expected = [reference_state(u, r, catalog) for u, r in zip(ids, rows)]
    matrix = user_matrix(batch, NOW)
    assert matrix.shape == (len(rows), len(USER_MODEL_FEATURES))
    np.testing.assert_array_equal(matrix, np.vstack([reference_vector(s, NOW) for s in expected]))
    np.testing.assert_array_equal(batch.known, [s.known for s in expected])
    for i, state in enumerate(expected):
        assert_same_state(batch.user(i), state)


def test_the_edge_cases_are_really_generated(rows: list[dict], catalog: Catalog) -> None:
    states = [reference_state("u", r, catalog) for r in rows]
    matrix = np.vstack([reference_vector(s, NOW) for s in states])
    column = {name: matrix[:, j] for j, name in enumerate(USER_MODEL_FEATURES)}
    assert sum(not s.known for s in states) > 50
    assert sum(s.known and not s.has_history for s in states) > 20
    assert (column["n_recent_items"] == 0).sum() > 50
    for name in ("max_item_views_7d", "n_items_carted_7d", "in_cart_max_views_7d", "days_since_last_in_cart_item"):
        known = ~np.isnan(column[name])
        assert 50 < known.sum() < len(rows) - 50, name
    assert sum(np.isnan(s.recent_in_cart).any() for s in states) > 10
    assert any(len(as_list(r.get("recent_item_ids"))) > len(s.recent_idx) for r, s in zip(rows, states))  # unknown items


def test_user_batch_from_arrow_columns_equals_python_columns(catalog: Catalog) -> None:
    rng = np.random.default_rng(5)
    rows = [generated_row(rng, python_only=True) for _ in range(400)]
    ids = [f"u{i}" for i in range(len(rows))]
    python = UserBatch.from_rows(ids, rows, catalog)
    table = pa.Table.from_pylist([{name: row.get(name) for name in USER_INPUTS} for row in rows], schema=_arrow_schema())
    arrow = UserBatch(pa.array(ids), {name: table.column(name) for name in table.column_names}, catalog)
    np.testing.assert_array_equal(user_matrix(arrow, NOW), user_matrix(python, NOW))
    for i in range(0, len(rows), 7):
        state = arrow.user(i)
        assert_same_state(state, reference_state(state.user_id, rows[i], catalog))


def test_user_matrix_of_states_with_one_time_per_user(rows: list[dict], catalog: Catalog) -> None:
    states = [reference_state(f"u{i}", r, catalog) for i, r in enumerate(rows[:200])]
    times = NOW + np.arange(len(states)) * 3600.0
    expected = np.vstack([reference_vector(s, t) for s, t in zip(states, times)])
    np.testing.assert_array_equal(user_matrix(states, times), expected)
    np.testing.assert_array_equal(user_matrix(UserBatch.from_rows([s.user_id for s in states], rows[:200], catalog), times), expected)
    assert user_matrix([], NOW).shape == (0, len(USER_MODEL_FEATURES))


def test_a_batch_converts_only_what_is_used(catalog: Catalog) -> None:
    """Scoring users reads no bought items: a malformed purchase history must not even be looked at."""

    class Untouchable(list):
        def __iter__(self):  # noqa: D105
            raise AssertionError("bought_item_ids was converted")

    rows = [{"last_event_ts": NOW, "recent_item_ids": ["i1"], "recent_item_views_7d": [2]}]
    columns = {name: [r.get(name) for r in rows] for name in USER_INPUTS}
    columns["bought_item_ids"] = Untouchable([["i1"]])
    batch = UserBatch(["u"], columns, catalog)
    row = dict(zip(USER_MODEL_FEATURES, user_matrix(batch, NOW)[0]))
    assert row["n_recent_items"] == 1 and row["max_item_views_7d"] == 2.0


def test_the_user_model_reads_only_its_inputs(rows: list[dict], catalog: Catalog) -> None:
    """USER_MODEL_INPUTS is what a bulk read for ScoreUsers must fetch: user_matrix looks at nothing else."""

    class Recording(dict):
        read: set = set()

        def get(self, key, default=None):  # noqa: D102
            self.read.add(key)
            return super().get(key, default)

    columns = Recording({name: [r.get(name) for r in rows] for name in USER_INPUTS})
    full = user_matrix(UserBatch.from_rows([f"u{i}" for i in range(len(rows))], rows, catalog), NOW)
    subset = {name: columns[name] for name in USER_MODEL_INPUTS}
    np.testing.assert_array_equal(user_matrix(UserBatch(list(range(len(rows))), columns, catalog), NOW), full)
    assert columns.read == set(USER_MODEL_INPUTS)
    np.testing.assert_array_equal(user_matrix(UserBatch(list(range(len(rows))), subset, catalog), NOW), full)


def _arrow_schema() -> pa.Schema:
    lists = {"top_category_ids": pa.list_(pa.string()), "recent_item_ids": pa.list_(pa.string()), "bought_item_ids": pa.list_(pa.string()),
             "top_category_shares": pa.list_(pa.float64())}
    fields = []
    for name in USER_INPUTS:
        if name in lists:
            fields.append(pa.field(name, lists[name]))
        elif name in RECENT_VALUES or name in BOUGHT_VALUES:
            fields.append(pa.field(name, pa.list_(pa.float64())))
        else:
            fields.append(pa.field(name, pa.float64()))
    return pa.schema(fields)
