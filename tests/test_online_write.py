"""The SQLite feature update's write (server/ingest.py): what it stores is what Feast's own write would store.

- the value bytes built directly for Int64, Float64 and the Int64 and String lists are the bytes protobuf serialises,
  for edge values too (0, the int64 bounds, negatives, empty lists, non-ASCII and empty strings), and values outside
  the direct path still go through protobuf with its errors;
- a null the writer stored itself is not written again, only re-stamped: after the same messages, one writer across
  messages (cache: the nulls it wrote are known) and a fresh writer per message (nothing known: every null upserted)
  leave identical rows, every column (value, value_text, created_ts, and the same stamps in the same places), and a
  written view of a new shopper holds a row for every feature, as Feast's push of the whole row would.
"""

from __future__ import annotations

import math
import random
import sqlite3
import time
from pathlib import Path

import pandas as pd
import pytest
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Int64List, StringList
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

from propensity.event_log import StreamEvent
from propensity.feature_store import open_store
from propensity.raw_data import EVENT_TYPES
from propensity.realtime import MAINTAINED_VIEWS
from propensity.settings import FeatureSettings
from server.ingest import LocalFeatures, SqliteRows, int64_bytes, int64_list_bytes, row_encoders, sqlite_spec, string_list_bytes
from tests.conftest import Pipeline, private_env, users

INT64_EDGES = [0, 1, 127, 128, 255, 16_383, 16_384, 1_764_600_000_000, 2**62, 2**63 - 1, -1, -128, -(2**63)]


def test_int64_bytes_are_protobufs() -> None:
    rng = random.Random(7)
    for value in INT64_EDGES + [rng.randrange(0, 2**63) for _ in range(2000)] + [rng.randrange(-(2**63), 0) for _ in range(200)]:
        assert int64_bytes(value) == ValueProto(int64_val=value).SerializeToString(), value
        assert int64_bytes(value) == int64_bytes(value)  # memoised: the same bytes the second time
    with pytest.raises(ValueError):
        int64_bytes(2**63)  # out of range: protobuf's error, not a wrapped-around value


def test_int64_list_bytes_are_protobufs() -> None:
    rng = random.Random(8)
    lists = [[], [0], INT64_EDGES, [5] * 200, *([rng.randrange(0, 10) for _ in range(rng.randrange(0, 40))] for _ in range(300)),
             *([1_764_600_000_000 + rng.randrange(0, 10**9) for _ in range(30)] for _ in range(50))]
    for values in lists:
        assert int64_list_bytes(values) == ValueProto(int64_list_val=Int64List(val=values)).SerializeToString(), values
    with pytest.raises(TypeError):
        int64_list_bytes(["3"])  # not an int: protobuf's error


def test_string_list_bytes_are_protobufs() -> None:
    rng = random.Random(9)
    lists = [[], [""], ["a"], ["é", "商品-12", "x" * 200, "\n"], [f"item_{i:05d}" for i in range(300)],
             *([f"i{rng.randrange(0, 1500)}" for _ in range(rng.randrange(0, 40))] for _ in range(300))]
    for values in lists:
        assert string_list_bytes(values) == ValueProto(string_list_val=StringList(val=values)).SerializeToString(), values
    with pytest.raises((TypeError, ValueError)):
        string_list_bytes(["ok", "\ud800"])  # not encodable as UTF-8: protobuf's error
    with pytest.raises(TypeError):
        string_list_bytes(["ok", 3])


def test_row_encoders_store_feasts_bytes_and_text(pipeline: Pipeline) -> None:
    """Every maintained feature's (bytes, value_text) as the generic path (protobuf, then Feast's text rule) gives it."""
    store = open_store(pipeline.feature_repo)
    samples = {"Int64": [0, 3, 2**40, -5], "Float64": [0.0, -0.0, 2.5, 1e300, math.inf, 7],
               "Array(Int64)": [[], [0, 1, 2], [1_764_600_000_000]], "Array(String)": [[], ["a", "é"], ["item_1"] * 30]}
    checked = 0
    for view in MAINTAINED_VIEWS:
        fv = store.get_feature_view(view)
        encoders = row_encoders(fv)
        for feature in fv.features:
            for value in samples.get(str(feature.dtype), []):
                proto = _generic(str(feature.dtype), value)
                kind = proto.WhichOneof("val")
                text = str(getattr(proto, kind)) if kind in ("int64_val", "double_val") else None
                assert encoders[feature.name](value) == (proto.SerializeToString(), text), (feature.name, value)
                checked += 1
            assert encoders[feature.name](None) == (b"", None)
    assert checked > 50


def _generic(dtype: str, value: object) -> ValueProto:
    if dtype == "Int64":
        return ValueProto(int64_val=value)
    if dtype == "Float64":
        return ValueProto(double_val=value)
    if dtype == "Array(Int64)":
        return ValueProto(int64_list_val=Int64List(val=value))
    return ValueProto(string_list_val=StringList(val=value))


@pytest.mark.slow
def test_nulls_not_written_again_leave_the_rows_of_writing_every_null(pipeline: Pipeline) -> None:
    known = users(pipeline, 8) + [f"new-shopper-{i}" for i in range(3)]  # new shoppers: every feature the stream does not keep is null
    items = pd.read_parquet(pipeline.work_dir / "prepared" / "events.parquet", columns=["item_id"])["item_id"].drop_duplicates().head(7).tolist()
    features = FeatureSettings()
    kinds = ["view", "add_to_cart", "view", "view"]  # no purchase: the purchase features stay null, message after message
    tables, skipped, whole_rows = {}, 0, 0
    base_ms = int(time.time() * 1000) - 60_000
    for name, fresh_writer_per_message in (("one writer", False), ("a writer per message", True)):
        env, _ = private_env(pipeline, f"nulls-{name.replace(' ', '-')}", copy_repo=True)
        store = open_store(Path(env["PROPENSITY_FEATURE_REPO"]))
        spec = sqlite_spec(store, {view: store.get_feature_view(view) for view in MAINTAINED_VIEWS})
        rows = SqliteRows(spec)
        for m in range(4):
            if fresh_writer_per_message:
                rows = SqliteRows(spec)
            now_ms = base_ms + 1000 * m
            message = [StreamEvent(f"n-{m}-{u}-{k}", now_ms - 1000 * k, user, items[(u + k + m) % len(items)], kinds[(u + k) % 4], f"s-{u}")
                       for u, user in enumerate(known[m % 3 :]) for k in range(3)]
            LocalFeatures(rows, features.recent_items_per_user, features.bought_items_per_user, frozenset(EVENT_TYPES)).apply(message)
            if not fresh_writer_per_message and m > 0:
                skipped += sum(len(nulls) for user in known[m % 3 :] for nulls in rows._cache[user][2])
            time.sleep(1.1)  # stamps are whole seconds: each message's its own
        with sqlite3.connect(spec.path) as conn:
            for view, table in zip(spec.views, spec.tables):  # a written view holds a row for every feature, as Feast's push
                names = {f.name for f in spec.views[view].features}
                for shopper in known[-3:]:
                    stored = {row[0] for row in conn.execute(f'SELECT feature_name FROM "{table}" WHERE entity_key = ?',
                                                             (serialize_entity_key(_key(shopper), entity_key_serialization_version=spec.key_version),))}
                    assert not stored or stored == names, (name, view, shopper, names - stored)  # (a view never written: none)
                    whole_rows += bool(stored)
            tables[name] = {table: _ranked(conn.execute(
                f'SELECT entity_key, feature_name, value, value_text, created_ts, event_ts FROM "{table}" ORDER BY 1, 2').fetchall())
                for table in spec.tables}
    assert whole_rows >= 2 * 3 * 2  # both runs, the three new shoppers, the activity and interests views at least
    assert skipped > 0  # the one writer knew of nulls it had written, and did not write them again
    assert tables["one writer"] == tables["a writer per message"]


def _key(user: str) -> EntityKeyProto:
    return EntityKeyProto(join_keys=["user_id"], entity_values=[ValueProto(string_val=user)])


def _ranked(rows: list[tuple]) -> list[tuple]:
    """The rows with each stamp replaced by its rank among the table's stamps (the runs' clocks differ)."""
    rank = {stamp: i for i, stamp in enumerate(sorted({str(row[-1]) for row in rows}))}
    return [(*row[:-1], rank[str(row[-1])]) for row in rows]
