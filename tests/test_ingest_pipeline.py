"""The pipelined SQLite feature update (server/ingest.py: SqliteRows with its statement thread), against real Feast
SQLite stores:

- a message's users in parts, each part's statements (one per view, JSON rows into one blob) run on the statement
  thread while the next part is computed: after the same messages (users repeated across messages, order-dependent
  lists) the tables hold exactly the rows of the one-pass writer, every column and type, and every shopper's counts
  went up by exactly their events: no event lost, no user's updates reordered;
- a statement failing in the last part (a trigger refusing one shopper's row) fails the whole update: nothing of the
  earlier parts is committed, the cache is dropped, and the same message applied again afterwards counts once.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pandas as pd
import pytest
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

from propensity.event_log import StreamEvent
from propensity.feature_store import open_store
from propensity.raw_data import EVENT_TYPES
from propensity.realtime import ACTIVITY_VIEW, MAINTAINED_VIEWS
from propensity.settings import FeatureSettings
from server.ingest import LocalFeatures, SqliteRows, sqlite_spec
from tests.conftest import Pipeline, private_env, users

COUNTED = {"views_30d": "view", "carts_30d": "add_to_cart"}
KINDS = ["view", "add_to_cart", "view", "purchase", "view"]


def _messages(known: list[str], items: list[str], count: int) -> list[list[StreamEvent]]:
    """`count` messages; consecutive ones share most users; times an hour ahead (the stamps are then the events'
    times, not the clock's: the two runs' rows compare exactly) and increasing from message to message, so a user's
    recent-items lists depend on the order the messages are applied in."""
    base_ms = int(time.time() * 1000) + 3_600_000
    return [[StreamEvent(f"pipe-{m}-{u}-{k}", base_ms + 10_000 * m + 100 * k, user, items[(u * 3 + k + m * 7) % len(items)],
                         KINDS[(u + k + m) % len(KINDS)], f"s-{u}-{m}", price=2.0 + k, quantity=1.0)
             for u, user in enumerate(known[m % 4 :]) for k in range(1 + (u + m) % 3)]
            for m in range(count)]


def _tables(spec_path: str, tables: tuple[str, ...]) -> dict[str, list[tuple]]:
    with sqlite3.connect(spec_path) as conn:
        return {table: conn.execute(
            f'SELECT entity_key, feature_name, value, value_text, event_ts, created_ts, typeof(value), typeof(value_text), '
            f'typeof(event_ts) FROM "{table}" ORDER BY 1, 2').fetchall() for table in tables}


def _counts(store: object, known: list[str]) -> dict[str, list]:
    refs = [f"{ACTIVITY_VIEW}:{name}" for name in COUNTED]
    return store.get_online_features(features=refs, entity_rows=[{"user_id": u} for u in known]).to_dict()  # type: ignore[attr-defined]


@pytest.mark.slow
def test_pipelined_parts_leave_the_rows_of_one_pass_and_lose_no_event(pipeline: Pipeline) -> None:
    known = users(pipeline, 60) + [f"pipe-new-{i}" for i in range(3)]  # new shoppers: rows created, not updated
    items = pd.read_parquet(pipeline.work_dir / "prepared" / "events.parquet", columns=["item_id"])["item_id"].drop_duplicates().head(23).tolist()
    features = FeatureSettings()
    messages = _messages(known, items, 4)
    tables = {}
    for name, pipelined in (("pipelined", True), ("one pass", False)):
        env, _ = private_env(pipeline, f"pipeline-{name.replace(' ', '-')}", copy_repo=True)
        store = open_store(Path(env["PROPENSITY_FEATURE_REPO"]))
        spec = sqlite_spec(store, {view: store.get_feature_view(view) for view in MAINTAINED_VIEWS})
        before = _counts(store, known)
        rows = SqliteRows(spec, pipelined=pipelined, pipeline_users=7)  # ~60 users a message: 8-9 parts
        assert (rows._statements is not None) == pipelined  # the pipelined run really runs its statements on the thread
        try:
            for message in messages:
                LocalFeatures(rows, features.recent_items_per_user, features.bought_items_per_user, frozenset(EVENT_TYPES)).apply(message)
        finally:
            rows.close()
        after = _counts(store, known)
        sent = [event for message in messages for event in message]
        for i, user in enumerate(known):  # each shopper's counts went up by exactly the events sent
            for feature, kind in COUNTED.items():
                expected = (before[feature][i] or 0) + sum(e.user_id == user and e.event_type == kind for e in sent)
                assert after[feature][i] == expected, (name, user, feature)
        tables[name] = _tables(spec.path, spec.tables)
    assert sum(len(rows) for rows in tables["one pass"].values()) > 1000
    # Every column, byte for byte (the value blobs, value_text, stamps, created_ts NULL) and every type: the lists of
    # recent items too, which a user's updates applied out of order would leave in another order.
    assert tables["pipelined"] == tables["one pass"]


@pytest.mark.slow
def test_a_statement_failing_in_the_last_part_commits_nothing_of_the_update(pipeline: Pipeline) -> None:
    known = users(pipeline, 30)
    items = pd.read_parquet(pipeline.work_dir / "prepared" / "events.parquet", columns=["item_id"])["item_id"].drop_duplicates().head(11).tolist()
    features = FeatureSettings()
    env, _ = private_env(pipeline, "pipeline-failure", copy_repo=True)
    store = open_store(Path(env["PROPENSITY_FEATURE_REPO"]))
    spec = sqlite_spec(store, {view: store.get_feature_view(view) for view in MAINTAINED_VIEWS})
    rows = SqliteRows(spec, pipeline_users=4)
    update = LocalFeatures(rows, features.recent_items_per_user, features.bought_items_per_user, frozenset(EVENT_TYPES))
    first, second = _messages(known, items, 2)
    try:
        update.apply(first)  # the cache now holds these users: the failing update must drop it
        before, counts_before = _tables(spec.path, spec.tables), _counts(store, known)
        # The shopper sorted last is in the last part: the parts before it have run their statements by then.
        last = max(event.user_id for event in second)
        key = serialize_entity_key(EntityKeyProto(join_keys=["user_id"], entity_values=[ValueProto(string_val=last)]),
                                   entity_key_serialization_version=spec.key_version)
        activity = spec.tables[list(spec.views).index(ACTIVITY_VIEW)]
        with sqlite3.connect(spec.path, isolation_level=None) as conn:
            for when in ("INSERT", "UPDATE"):
                conn.execute(f'CREATE TRIGGER refuse_{when.lower()} BEFORE {when} ON "{activity}" WHEN NEW.entity_key = X\'{key.hex()}\' '
                             f"BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
        with pytest.raises(sqlite3.IntegrityError, match="refused by the test"):
            update.apply(second)
        assert rows._cache == {}  # dropped with the transaction
        assert _tables(spec.path, spec.tables) == before  # nothing of the earlier parts was committed
        with sqlite3.connect(spec.path, isolation_level=None) as conn:
            conn.execute("DROP TRIGGER refuse_insert")
            conn.execute("DROP TRIGGER refuse_update")
        update.apply(second)  # retried (as from the log): counted once
    finally:
        rows.close()
    after = _counts(store, known)
    for i, user in enumerate(known):
        for feature, kind in COUNTED.items():
            expected = (counts_before[feature][i] or 0) + sum(e.user_id == user and e.event_type == kind for e in second)
            assert after[feature][i] == expected, (user, feature)
