"""The plan-once user read (server.online_features / server.store_reads) against Feast's own online read.

Real Feast stores from the session pipeline: the values must be exactly what get_online_features
returns, expired rows must read as missing, and pushes must be visible to the next read.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
from feast.data_source import PushMode

from propensity.feature_store import open_store
from server.online_features import OnlineUserFeatures
from tests.conftest import Pipeline, private_env, users

SERVICE = "propensity_user_v2"


def feast_rows(store, service: str, ids: list[str]) -> list[dict[str, object]]:
    """Feast's generic read with the TTL rule applied per feature (what the server did before the plan-once read)."""
    columns = store.get_online_features(features=store.get_feature_service(service), entity_rows=[{"user_id": u} for u in ids]).to_dict(
        include_event_timestamps=True
    )
    ttl = {}
    for projection in store.get_feature_service(service).feature_view_projections:
        view_ttl = store.get_feature_view(projection.name).ttl
        for feature in projection.features:
            ttl[feature.name] = view_ttl.total_seconds() if view_ttl else math.inf
    now = datetime.now(timezone.utc).timestamp()
    return [
        {name: columns[name][i] if not columns[name + "__ts"][i] or now - columns[name + "__ts"][i] <= limit else None for name, limit in ttl.items()}
        for i in range(len(ids))
    ]


def full_row(store, view_name: str, user: str, at: datetime, **values: object) -> pd.DataFrame:
    """One online row of a view with every feature set (Feast writes whole rows): the given values, 1s elsewhere."""
    from feast.types import Array, Float32, Float64, String

    row: dict[str, object] = {"user_id": user, "event_timestamp": at}
    for field in store.get_feature_view(view_name).features:
        if field.name in values:
            row[field.name] = values[field.name]
        elif isinstance(field.dtype, Array):
            row[field.name] = ["x"] if field.dtype.base_type == String else [1]
        else:
            row[field.name] = "x" if field.dtype == String else 1.0 if field.dtype in (Float32, Float64) else 1
    return pd.DataFrame({name: [value] for name, value in row.items()})


@pytest.fixture(scope="module")
def store(pipeline: Pipeline):
    return open_store(pipeline.feature_repo)


@pytest.mark.parametrize("service", ["propensity_user_v1", "propensity_user_v2"])
def test_plan_once_read_returns_exactly_what_feast_returns(pipeline: Pipeline, store, service: str) -> None:
    ids = users(pipeline, 80) + ["nobody-at-all", users(pipeline, 1)[0]]  # an unknown user and a repeated one
    reader = OnlineUserFeatures(store, service)
    assert reader.backend == "SqliteRead"
    ours, feast = reader.fetch(ids), feast_rows(store, service, ids)
    differences = [(ids[i], name, a[name], b[name]) for i, (a, b) in enumerate(zip(ours, feast)) for name in a if a[name] != b[name]]
    assert not differences, f"{len(differences)} values differ (user, feature, ours, Feast's): {differences[:5]}"
    # Real values, not a store of nulls; the unknown user has none.
    assert sum(v is not None for row in ours[:-2] for v in row.values()) > 0.5 * len(ours[:-2]) * len(reader.feature_names)
    assert all(v is None for v in ours[-2].values())
    assert any(isinstance(v, list) and v for v in ours[0].values())  # list features come back as Python lists


def test_columns_and_rows_agree(pipeline: Pipeline, store) -> None:
    ids = users(pipeline, 30)
    reader = OnlineUserFeatures(store, SERVICE)
    columns, rows = reader.fetch_columns(ids), reader.fetch(ids)
    assert list(columns) == list(reader.feature_names) == list(rows[0])
    assert all(columns[name][i] == rows[i][name] for i in range(len(ids)) for name in reader.feature_names)
    assert reader.fetch([]) == [] and all(v == [] for v in reader.fetch_columns([]).values())


def test_a_subset_read_returns_only_the_features_asked_for(pipeline: Pipeline, store) -> None:
    ids = users(pipeline, 20)
    wanted = {"views_7d", "recent_item_ids", "signup_ts"}
    subset = OnlineUserFeatures(store, SERVICE, only=wanted).fetch_columns(ids)
    full = OnlineUserFeatures(store, SERVICE).fetch_columns(ids)
    assert set(subset) == wanted
    assert all(subset[name] == full[name] for name in wanted)
    with pytest.raises(ValueError, match="no_such_feature"):
        OnlineUserFeatures(store, SERVICE, only={"views_7d", "no_such_feature"})


def test_values_past_the_ttl_read_as_missing_and_newer_pushes_are_seen_at_once(pipeline: Pipeline) -> None:
    env, _ = private_env(pipeline, "online-read-ttl", copy_repo=True)
    from pathlib import Path

    store = open_store(Path(env["PROPENSITY_FEATURE_REPO"]))
    reader = OnlineUserFeatures(store, SERVICE)
    activity_ttl = store.get_feature_view("user_activity").ttl
    profile_ttl = store.get_feature_view("user_profile").ttl
    assert activity_ttl < timedelta(days=200) < profile_ttl
    stale = datetime.now(timezone.utc) - timedelta(days=200)  # past user_activity's TTL, within user_profile's
    user = "ttl-shopper"
    store.write_to_online_store("user_activity", full_row(store, "user_activity", user, stale, views_7d=7, last_event_ts=int(stale.timestamp())))
    store.write_to_online_store("user_profile", full_row(store, "user_profile", user, stale, age=33.0, signup_ts=int(stale.timestamp())))
    row = reader.fetch([user])[0]
    assert row["views_7d"] is None and row["last_event_ts"] is None  # Feast itself would still return 7
    assert store.get_online_features(features=["user_activity:views_7d"], entity_rows=[{"user_id": user}]).to_dict()["views_7d"] == [7]
    assert row["age"] == 33.0 and row["signup_ts"] == int(stale.timestamp())
    assert row == feast_rows(store, SERVICE, [user])[0]

    # A push (what IngestEvents does) is visible to the same reader's next call: nothing is cached.
    push = next(v.stream_source.name for v in store.list_feature_views() if v.name == "user_activity")
    now = datetime.now(timezone.utc)
    store.push(push, full_row(store, "user_activity", user, now, views_7d=8, last_event_ts=int(now.timestamp())), to=PushMode.ONLINE)
    assert reader.fetch([user])[0]["views_7d"] == 8
    # ... and to a reader opened separately (another worker process).
    assert OnlineUserFeatures(open_store(Path(env["PROPENSITY_FEATURE_REPO"])), SERVICE).fetch([user])[0]["views_7d"] == 8
