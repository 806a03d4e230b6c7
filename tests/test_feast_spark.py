"""The spark store profile: Feast's Spark offline store and Spark materialization give what the DuckDB profile gives.

One shop's feature tables (built once), two Feast stores over them: the repository's own yaml
(DuckDB offline store, local materialization) and profiles/spark.yaml (SparkSources over the same
Parquet, Spark offline store, spark.engine materialization), each with its own registry and SQLite
online store. Point-in-time training retrieval and the materialized online values must agree.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from propensity.demo import DemoDataConfig, generate_demo_data
from propensity.feature_store import copy_definitions, open_store
from propensity.settings import FeatureSettings
from propensity.store_profiles import profile_yaml
from tests.conftest import PROJECT_ROOT
from training.feature_build import build_features
from training.prepare import prepare
from training.publish import publish_features

pytestmark = pytest.mark.slow

USER_SERVICE, ITEM_SERVICE = "propensity_user_v1", "propensity_item_v1"


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class Stores:
    duck: object
    spark: object
    as_of: datetime
    users: list[str]
    items: list[str]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Stores:
    root = tmp_path_factory.mktemp("feast_spark")
    repo = copy_definitions(root / "feature_repo")
    shutil.copytree(PROJECT_ROOT / "feature_repo" / "profiles", repo / "profiles")
    midnight = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    generate_demo_data(root / "raw", DemoDataConfig(n_users=60, n_items=30, n_categories=4, n_days=20, seed=5, end_time=midnight), progress=None)
    prepared = prepare(root / "raw", root / "prepared", rebase_to=midnight, progress=_quiet)
    build_features(prepared.directory, repo / "data" / "offline", prepared.as_of, prepared.event_types, FeatureSettings(retrieval_snapshots=3), progress=_quiet)
    with pytest.MonkeyPatch.context() as env:
        # One small local Spark on the 2 shared cores (the profile reads these through ${VAR}s).
        env.setenv("PROPENSITY_SPARK_MASTER", "local[2]")
        env.setenv("PROPENSITY_SPARK_SHUFFLE_PARTITIONS", "4")
        publish_features(repo, prepared.as_of, progress=_quiet)
        spark_yaml = profile_yaml("spark", repo)
        publish_features(repo, prepared.as_of, progress=_quiet, yaml_file=spark_yaml)
        spark = open_store(repo, spark_yaml)
    users = pd.read_parquet(repo / "data" / "offline" / "user_activity.parquet", columns=["user_id"])["user_id"].drop_duplicates()
    items = pd.read_parquet(repo / "data" / "offline" / "item_stats.parquet", columns=["item_id"])["item_id"].drop_duplicates()
    return Stores(open_store(repo), spark, prepared.as_of, sorted(users)[:8] + ["nobody"], sorted(items)[:8] + ["no-such-item"])


def _plain(value: object) -> object:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is pd.NaT:
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _same(a: object, b: object) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, float(b), rel_tol=1e-9, abs_tol=1e-9)
    return a == b


def test_profile_uses_spark_offline_store_and_engine(stores: Stores) -> None:
    from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

    config = stores.spark.config
    assert config.offline_store.type == "spark" and config.batch_engine.type == "spark.engine"
    assert config.offline_store.spark_conf["spark.master"] == "local[2]"
    assert all(isinstance(v.batch_source, SparkSource) for v in stores.spark.list_feature_views())
    assert not any(isinstance(v.batch_source, SparkSource) for v in stores.duck.list_feature_views())


def test_point_in_time_retrieval_matches_duckdb(stores: Stores) -> None:
    """Training rows at midnights and mid-day, before the first snapshot and at as-of: same rows, same values."""
    moments = [stores.as_of - timedelta(days=d, hours=h) for d in (0, 1, 6, 13, 40) for h in (0, 7)]
    entity_rows = pd.DataFrame([{"user_id": u, "event_timestamp": t} for u in stores.users for t in moments])
    frames = []
    for store in (stores.duck, stores.spark):
        service = store.get_feature_service(USER_SERVICE)
        frame = store.get_historical_features(entity_df=entity_rows, features=service).to_df()
        frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
        frames.append(frame.sort_values(["user_id", "event_timestamp"]).reset_index(drop=True))
    duck, spark = frames
    assert len(duck) == len(entity_rows) and len(spark) == len(duck)
    assert sorted(spark.columns) == sorted(duck.columns)
    assert duck["views_7d"].notna().sum() > len(duck) // 4, "mostly empty rows prove nothing"
    for column in duck.columns:
        bad = [i for i, (a, b) in enumerate(zip(duck[column], spark[column])) if not _same(a, b)]
        assert not bad, f"{column}: {len(bad)} rows differ, first {duck.loc[bad[0], ['user_id', 'event_timestamp']].tolist()}: {duck[column][bad[0]]!r} vs {spark[column][bad[0]]!r}"


@pytest.mark.parametrize("service, key", [(USER_SERVICE, "user_id"), (ITEM_SERVICE, "item_id")])
def test_spark_materialization_fills_the_online_store_like_duckdb(stores: Stores, service: str, key: str) -> None:
    ids = stores.users if key == "user_id" else stores.items
    online = []
    for store in (stores.duck, stores.spark):
        result = store.get_online_features(features=store.get_feature_service(service), entity_rows=[{key: i} for i in ids]).to_dict()
        online.append(result)
    duck, spark = online
    assert spark.keys() == duck.keys()
    for name in duck:
        assert all(_same(a, b) for a, b in zip(duck[name], spark[name])), f"{service}.{name}: {duck[name]} vs {spark[name]}"
    known = [v for name, column in spark.items() if name != key for v in column[:-1]]
    assert sum(v is not None for v in known) > len(known) // 2, "the Spark-materialized store is mostly empty"
    assert all(column[-1] is None for name, column in spark.items() if name != key)
