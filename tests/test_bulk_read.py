"""The bulk online read (OnlineUserFeatures.fetch_arrays, server.value_columns) against protobuf and Feast's own read.

Two levels: every Value layout the column decoder knows, built by protobuf itself and compared value by value with
protobuf's parse (including the layouts it must refuse and decode one by one); and real Feast SQLite stores from the
session pipeline, where the bulk read must return exactly what get_online_features returns with the TTL rule, for
many users, unknown and repeated users, expired rows, nulls and list features, and assemble the same model inputs.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from feast.protos.feast.types.Value_pb2 import BoolList, BytesList, DoubleList, FloatList, Int32List, Int64List, Null, StringList, Value

from propensity.assembly import user_matrix
from propensity.feature_store import open_store
from propensity.user_state import USER_MODEL_INPUTS, UserBatch
from server.online_features import OnlineUserFeatures, item_ids_in_offline_store, load_catalog
from server.value_columns import decode_column, python_value
from tests.conftest import Pipeline, private_env, users
from tests.test_online_read import feast_rows, full_row

SERVICE = "propensity_user_v2"
RNG = np.random.default_rng(7)


def as_python(column: object) -> list[object]:
    return column.to_pylist() if isinstance(column, (pa.Array, pa.ChunkedArray)) else list(column)


def decode_like_protobuf(values: list[Value], n: int, positions: list[int] | None = None) -> tuple[object, list[object]]:
    """decode_column over the serialised values (empty ones left out, as the store query does) and protobuf's own answer."""
    blobs = [v.SerializeToString() for v in values]
    positions = list(range(len(values))) if positions is None else positions
    kept = [(b, p) for b, p in zip(blobs, positions) if b]
    expected: list[object] = [None] * n
    for blob, position in kept:
        expected[position] = python_value(Value.FromString(blob))
    column = decode_column(b"".join(b for b, _ in kept), np.array([len(b) for b, _ in kept]), np.array([p for _, p in kept]), n)
    return column, expected


def ints(n: int, bits: int) -> list[int]:
    """Small, large and negative values: one-byte, multi-byte and ten-byte (negative) varints."""
    edge = [0, 1, -1, 127, 128, 300, 2 ** (bits - 1) - 1, -(2 ** (bits - 1)), 1_796_083_200 % 2 ** (bits - 1)]
    return edge + [int(v) for v in RNG.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, size=n - len(edge), dtype=np.int64)]


def texts(n: int) -> list[str]:
    alphabet = ["i000123", "", "é", "中文", "x" * 200, "c7", "a,b", "\x00nul"]
    return [alphabet[i % len(alphabet)] + str(i) * int(RNG.integers(0, 3)) for i in range(n)]


SCALARS = {
    "int64": lambda: [Value(int64_val=v) for v in ints(60, 64)],
    "int32": lambda: [Value(int32_val=v) for v in ints(60, 32)],
    "bool": lambda: [Value(bool_val=bool(i % 3)) for i in range(40)],
    "double": lambda: [Value(double_val=float(v)) for v in [0.0, -0.0, math.inf, -math.inf, 1e-310, *RNG.normal(size=40)]],
    "float": lambda: [Value(float_val=float(v)) for v in [0.0, 3.4e38, *RNG.normal(size=40).astype(np.float32)]],
    "string": lambda: [Value(string_val=s) for s in texts(60)],
    "bytes": lambda: [Value(bytes_val=bytes(RNG.integers(0, 256, size=int(RNG.integers(0, 300)), dtype=np.uint8))) for _ in range(30)],
}


def lists_of(make, n: int = 50) -> list:
    """n lists of 0 to 40 elements (some empty, one long enough for multi-byte lengths)."""
    sizes = [0, 1, 200, *RNG.integers(0, 40, size=n - 3)]
    return [make(int(size)) for size in sizes]


LISTS = {
    "int64_list": lambda: lists_of(lambda k: Value(int64_list_val=Int64List(val=ints(max(k, 9), 64)[:k]))),
    "int32_list": lambda: lists_of(lambda k: Value(int32_list_val=Int32List(val=[int(v) for v in RNG.integers(-(2**31), 2**31 - 1, size=k)]))),
    "bool_list": lambda: lists_of(lambda k: Value(bool_list_val=BoolList(val=[bool(v) for v in RNG.integers(0, 2, size=k)]))),
    "double_list": lambda: lists_of(lambda k: Value(double_list_val=DoubleList(val=RNG.normal(size=k).tolist()))),
    "float_list": lambda: lists_of(lambda k: Value(float_list_val=FloatList(val=RNG.normal(size=k).astype(np.float32).tolist()))),
    "string_list": lambda: lists_of(lambda k: Value(string_list_val=StringList(val=texts(k)))),
    "bytes_list": lambda: lists_of(lambda k: Value(bytes_list_val=BytesList(val=[bytes([i % 256]) * (i % 150) for i in range(k)]))),
}


@pytest.mark.parametrize("kind", sorted(SCALARS) + sorted(LISTS))
def test_each_layout_decodes_in_bulk_exactly_as_protobuf_parses_it(kind: str) -> None:
    values = (SCALARS | LISTS)[kind]()
    n = len(values) + 7
    positions = [int(p) for p in RNG.permutation(n)[: len(values)]]  # scattered, with users that have no value
    column, expected = decode_like_protobuf(values, n, positions)
    assert isinstance(column, pa.Array), f"{kind} was not decoded in bulk"
    got = as_python(column)
    assert got == expected or all(
        (isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b)) or a == b for a, b in zip(got, expected)
    )
    assert sum(v is None for v in got) == n - len(values)
    assert [type(v) for v in got] == [type(v) for v in expected]  # ints stay ints, floats floats, strings str, bytes bytes


def test_nulls_and_empty_values_are_missing() -> None:
    values = [Value(int64_val=3), Value(null_val=Null.NULL), Value(), Value(int64_val=-4)]
    column, expected = decode_like_protobuf(values, 5)
    assert expected == [3, None, None, -4, None]
    assert as_python(column) == expected  # a null among ints: decoded one by one, same answer
    only_nulls, expected = decode_like_protobuf([Value(null_val=Null.NULL)] * 3, 4)
    assert as_python(only_nulls) == expected == [None] * 4
    nothing = decode_column(b"", np.array([], dtype=np.int64), np.array([], dtype=np.int64), 3)
    assert as_python(nothing) == [None] * 3


@pytest.mark.parametrize(
    "values",
    [
        [Value(int64_val=1), Value(double_val=2.5)],  # mixed kinds in one column
        [Value(unix_timestamp_val=1_796_083_200), Value(unix_timestamp_val=0)],  # timestamps: Feast's own conversion
        [Value(int64_val=1), Value(string_val="a")],
    ],
    ids=["mixed", "timestamps", "int-and-string"],
)
def test_layouts_not_decoded_in_bulk_fall_back_to_protobuf(values: list[Value]) -> None:
    column, expected = decode_like_protobuf(values, len(values) + 1)
    assert as_python(column) == expected


def test_blobs_that_only_look_like_a_layout_are_not_misread() -> None:
    """Unpacked repeated values, trailing unknown fields and two packed chunks are valid protobuf: never guessed at."""
    packed = Value(int64_list_val=Int64List(val=[1, 2])).SerializeToString()
    unpacked = b"\x72\x04\x08\x01\x08\x02"  # the same list, element by element
    two_chunks = b"\x72\x06\x0a\x01\x01\x0a\x01\x02"
    trailing = Value(int64_val=5).SerializeToString() + b"\xa0\x06\x01"  # an unknown varint field 100
    for odd in (unpacked, two_chunks, trailing):
        blobs = [packed, odd, packed]
        column = decode_column(b"".join(blobs), np.array([len(b) for b in blobs]), np.array([0, 1, 2]), 3)
        assert as_python(column) == [python_value(Value.FromString(b)) for b in blobs]


def test_inconsistent_lengths_are_refused_naming_the_counts() -> None:
    with pytest.raises(ValueError, match="2 blob lengths summing to 5 bytes for 2 positions and 4 bytes"):
        decode_column(b"\x20\x01\x20\x02", np.array([2, 3]), np.array([0, 1]), 2)


# -- real Feast stores -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(pipeline: Pipeline):
    return open_store(pipeline.feature_repo)


@pytest.mark.parametrize("service", ["propensity_user_v1", "propensity_user_v2", "propensity_user_v3"])
def test_bulk_read_returns_exactly_what_feast_returns(pipeline: Pipeline, store, service: str) -> None:
    known = users(pipeline, 1200)  # more than one query chunk of 1,000 keys
    ids = known + ["nobody-at-all", known[0], known[-1], "nobody-either"]
    reader = OnlineUserFeatures(store, service)
    arrays = reader.fetch_arrays(ids)
    assert list(arrays) == list(reader.feature_names)
    assert any(isinstance(arrays[name], pa.Array) for name in arrays), "the SQLite store is read in bulk"
    ours = {name: as_python(arrays[name]) for name in reader.feature_names}
    feast = feast_rows(store, service, ids)
    differences = [(ids[i], name, ours[name][i], row[name]) for i, row in enumerate(feast) for name in row if ours[name][i] != row[name]]
    assert not differences, f"{len(differences)} values differ (user, feature, bulk, Feast's): {differences[:5]}"
    assert ours == reader.fetch_columns(ids)
    assert all(ours[name][len(known)] is None and ours[name][-1] is None for name in ours)  # unknown users
    assert sum(v is not None for name in ours for v in ours[name]) > 0.5 * len(ids) * len(ours)  # a real store, not nulls
    assert any(isinstance(v, list) and v for v in ours["recent_item_ids"])


def test_a_bulk_subset_read_returns_only_the_features_asked_for(pipeline: Pipeline, store) -> None:
    ids = users(pipeline, 300)
    subset = OnlineUserFeatures(store, SERVICE, only=USER_MODEL_INPUTS).fetch_arrays(ids)
    full = OnlineUserFeatures(store, SERVICE).fetch_columns(ids)
    assert set(subset) == set(USER_MODEL_INPUTS)
    assert all(as_python(subset[name]) == full[name] for name in USER_MODEL_INPUTS)
    assert dict(OnlineUserFeatures(store, SERVICE).fetch_arrays([])) == {name: [] for name in full}


def test_model_inputs_from_the_bulk_read_equal_those_from_the_row_read(pipeline: Pipeline, store) -> None:
    ids = users(pipeline, 400) + ["nobody-at-all"]
    reader = OnlineUserFeatures(store, SERVICE)
    catalog = load_catalog(store, "propensity_item_v2", item_ids_in_offline_store(store))
    now = datetime.now(timezone.utc).timestamp()
    bulk, rows = UserBatch(ids, reader.fetch_arrays(ids), catalog), UserBatch(ids, reader.fetch_columns(ids), catalog)
    assert np.array_equal(user_matrix(bulk, now), user_matrix(rows, now), equal_nan=True)
    assert np.array_equal(bulk.known, rows.known) and not bulk.known[-1] and bulk.known[:-1].mean() > 0.5
    for name in ("bought_item_counts", "bought_item_last_ts"):
        assert np.array_equal(bulk.bought(name).values, rows.bought(name).values, equal_nan=True)
    assert all(
        np.array_equal(a, b, equal_nan=True) if isinstance(a, np.ndarray) else a == b
        for a, b in zip(vars(bulk.user(3)).values(), vars(rows.user(3)).values())
    )


def test_expired_rows_nulls_and_odd_values_read_as_feast_returns_them(pipeline: Pipeline) -> None:
    env, _ = private_env(pipeline, "bulk-read-ttl", copy_repo=True)
    store = open_store(Path(env["PROPENSITY_FEATURE_REPO"]))
    reader = OnlineUserFeatures(store, SERVICE)
    now = datetime.now(timezone.utc)
    stale = now - timedelta(days=200)  # past user_activity's TTL, within user_profile's
    assert store.get_feature_view("user_activity").ttl < timedelta(days=200) < store.get_feature_view("user_profile").ttl
    written = {
        "stale-shopper": ("user_activity", stale, {"views_7d": 7, "last_event_ts": int(stale.timestamp())}),
        "null-shopper": ("user_activity", now, {"views_7d": None, "spend_30d": None, "last_purchase_ts": None}),
        "negative-shopper": ("user_activity", now, {"views_7d": -5, "spend_30d": -0.0, "last_event_ts": 2**40}),
        "list-shopper": ("user_interests", now, {"recent_item_ids": ["é-item", "", "i1"], "recent_item_views_7d": [3, -1, 2**35],
                                                 "top_category_ids": [], "top_category_shares": [], "recent_item_in_cart": None}),
    }
    for user, (view, at, values) in written.items():
        store.write_to_online_store(view, full_row(store, view, user, at, **values))
    store.write_to_online_store("user_profile", full_row(store, "user_profile", "stale-shopper", stale, age=33.0, region="Zürich"))
    ids = [*written, "nobody", *users(pipeline, 50)]
    arrays = reader.fetch_arrays(ids)
    ours = [{name: as_python(arrays[name])[i] for name in reader.feature_names} for i in range(len(ids))]
    assert ours == feast_rows(store, SERVICE, ids)
    stale_row, null_row, negative_row, list_row = ours[:4]
    assert stale_row["views_7d"] is None and stale_row["last_event_ts"] is None  # expired, though Feast's raw read returns them
    assert stale_row["age"] == 33.0 and stale_row["region"] == "Zürich"  # the profile view's TTL is longer
    assert null_row["views_7d"] is None and null_row["spend_30d"] is None and null_row["views_30d"] == 1
    assert negative_row["views_7d"] == -5 and negative_row["last_event_ts"] == 2**40 and math.copysign(1, negative_row["spend_30d"]) < 0
    assert list_row["recent_item_ids"] == ["é-item", "", "i1"] and list_row["recent_item_views_7d"] == [3, -1, 2**35]
    assert list_row["top_category_ids"] == [] and list_row["recent_item_in_cart"] is None
