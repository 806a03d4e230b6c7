"""Feature store profiles against the real Redis and PostgreSQL: same online values as SQLite, one shared SQL registry."""

from __future__ import annotations

import math
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from propensity.demo import DemoDataConfig, generate_demo_data
from propensity.feature_store import feast_apply, open_store
from propensity.settings import FeatureSettings
from propensity.store_profiles import (
    DEFAULTS,
    PROFILES,
    StoreUnreachableError,
    apply_defaults,
    check_reachable,
    endpoints,
    ensure_database,
    profile_yaml,
)
from propensity.feature_store import copy_definitions
from tests.conftest import PROJECT_ROOT, free_port
from training.feature_build import build_features
from training.prepare import prepare
from training.publish import publish_features

PROFILE_DIR = PROJECT_ROOT / "feature_repo" / "profiles"
# Redis databases this suite may claim (one per store under test); a lock key keeps concurrent runs apart.
TEST_REDIS_DBS = range(7, 16)
REDIS_LOCK = "propensity:test-lock"
USER_SERVICE, ITEM_SERVICE = "propensity_user_v1", "propensity_item_v1"


def _quiet(_message: str) -> None:
    pass


def copy_repo_with_profiles(destination: Path) -> Path:
    repo = copy_definitions(destination)
    shutil.copytree(PROFILE_DIR, repo / "profiles")
    return repo


def profile(name: str, repo: Path) -> Path:
    """The yaml file of a server profile (never None, unlike "local")."""
    path = profile_yaml(name, repo)
    assert path is not None
    return path


def _unreachable(reason: str) -> None:
    """Skip with the reason; in CI (CI=true) the servers are part of the job, so fail instead."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: these suites must run; .ci/run starts the servers with scripts/services.sh)")
    pytest.skip(reason)


def _normalised(values: dict[str, list]) -> dict[str, list]:
    """Online values with NaN as None, so equal stores compare equal."""
    def clean(value):
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return {name: [clean(v) for v in column] for name, column in values.items()}


# --- without servers --------------------------------------------------------------------------


def test_profile_yaml_names_the_files_in_the_repository(tmp_path: Path) -> None:
    repo = copy_repo_with_profiles(tmp_path / "repo")
    assert profile_yaml("local", repo) is None
    for name in ("redis", "postgres", "production", "spark"):
        assert profile_yaml(name, repo) == repo / "profiles" / f"{name}.yaml"
    with pytest.raises(ValueError, match="unknown feature store profile 'mongo'; known: local, redis, postgres, production, spark"):
        profile_yaml("mongo", repo)
    assert set(PROFILES) == {"local", "redis", "postgres", "production", "spark"}


def test_apply_defaults_fills_only_unset_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PROPENSITY_REDIS_DB", "3")
    applied = apply_defaults()
    assert "PROPENSITY_REDIS_DB" not in applied and os.environ["PROPENSITY_REDIS_DB"] == "3"
    assert os.environ["PROPENSITY_REDIS_ADDRESS"] == "127.0.0.1:6379"
    assert os.environ["PROPENSITY_PG_DATABASE"] == "propensity"
    assert apply_defaults() == {}


def test_profiles_expand_variables_and_resolve_paths_against_the_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A profile in profiles/ resolves registry and SQLite paths exactly like the repository's own feature_store.yaml."""
    from feast.repo_config import load_repo_config

    repo = copy_repo_with_profiles(tmp_path / "repo")
    monkeypatch.setenv("PROPENSITY_REDIS_DB", "9")
    monkeypatch.setenv("PROPENSITY_PG_DATABASE", "somewhere")
    apply_defaults()
    redis = load_repo_config(repo, profile("redis", repo))
    assert redis.online_store.connection_string.endswith(",db=9")
    assert redis.repo_path == repo and redis.registry.path == "data/registry-redis.db"  # joined to repo_path by Feast
    production = load_repo_config(repo, profile("production", repo))
    assert production.registry.path.endswith("@127.0.0.1:5432/somewhere")
    assert [e.role for e in endpoints(profile("production", repo))] == ["online store (Redis)", "registry (PostgreSQL)"]
    assert endpoints(repo / "feature_store.yaml") == []


def test_check_reachable_names_the_server_that_is_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = copy_repo_with_profiles(tmp_path / "repo")
    port = free_port()
    monkeypatch.setenv("PROPENSITY_REDIS_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(StoreUnreachableError, match=rf"redis.yaml: online store \(Redis\) at 127.0.0.1:{port} is not accepting"):
        check_reachable(profile("redis", repo))
    monkeypatch.setenv("PROPENSITY_PG_URL", f"postgresql+psycopg://postgres@127.0.0.1:{port}")
    with pytest.raises(StoreUnreachableError, match=rf"postgres.yaml: registry \(PostgreSQL\) at 127.0.0.1:{port} is not accepting"):
        check_reachable(profile("postgres", repo))


# --- against the real servers ------------------------------------------------------------------


@dataclass(frozen=True)
class Services:
    redis_dbs: tuple[int, int]  # (redis profile, production profile)
    pg_databases: tuple[str, str]  # (postgres profile, production profile)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """Two private Redis databases and two new PostgreSQL databases; the local servers must be up."""
    apply_defaults()
    probe = profile("production", PROJECT_ROOT / "feature_repo")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PROPENSITY_PG_DATABASE", "postgres")  # the servers, not the default registry database
        try:
            check_reachable(probe)
        except StoreUnreachableError as error:
            _unreachable(str(error))
    import psycopg
    import redis

    host, _, port = os.environ["PROPENSITY_REDIS_ADDRESS"].split(",")[0].rpartition(":")
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    claimed: list[redis.Redis] = []
    for db in TEST_REDIS_DBS:
        client = redis.Redis(host=host, port=int(port), db=db)
        if client.set(REDIS_LOCK, token, nx=True, ex=1800):
            for key in client.scan_iter(count=1000):
                if key != REDIS_LOCK.encode():
                    client.delete(key)
            claimed.append(client)
            if len(claimed) == 2:
                break
    if len(claimed) < 2:
        for client in claimed:
            client.flushdb()
        pytest.fail(f"no two free Redis databases among {list(TEST_REDIS_DBS)} (each holds a {REDIS_LOCK!r} key of another run)")
    names = (f"propensity_test_{token.replace('-', '_')}_registry", f"propensity_test_{token.replace('-', '_')}_production")
    pg_url = os.environ["PROPENSITY_PG_URL"]
    with pytest.MonkeyPatch.context() as env:
        try:
            for name in names:
                env.setenv("PROPENSITY_PG_DATABASE", name)
                assert ensure_database(probe)
            yield Services(tuple(c.connection_pool.connection_kwargs["db"] for c in claimed), names)  # type: ignore[arg-type]
        finally:
            for client in claimed:
                client.flushdb()
            from sqlalchemy.engine import make_url

            admin = make_url(pg_url).set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
            with psycopg.connect(admin, autocommit=True) as conn:
                for name in names:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass(frozen=True)
class Shop:
    repo: Path
    as_of: datetime
    users: list[str]
    items: list[str]


@pytest.fixture(scope="module")
def shop(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Shop:
    """A tiny shop's feature tables in a private repository copy, published to the local (SQLite) profile (servers checked first)."""
    root = tmp_path_factory.mktemp("store_profiles")
    repo = copy_repo_with_profiles(root / "feature_repo")
    midnight = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    generate_demo_data(root / "raw", DemoDataConfig(n_users=60, n_items=30, n_categories=4, n_days=20, seed=5, end_time=midnight), progress=None)
    prepared = prepare(root / "raw", root / "prepared", rebase_to=midnight, progress=_quiet)
    build_features(prepared.directory, repo / "data" / "offline", prepared.as_of, prepared.event_types, FeatureSettings(), progress=_quiet)
    publish_features(repo, prepared.as_of, progress=_quiet)
    users = pd.read_parquet(repo / "data" / "offline" / "user_activity.parquet", columns=["user_id"])["user_id"].drop_duplicates()
    items = pd.read_parquet(repo / "data" / "offline" / "item_stats.parquet", columns=["item_id"])["item_id"].drop_duplicates()
    return Shop(repo, prepared.as_of, sorted(users)[:6] + ["nobody"], sorted(items)[:6] + ["no-such-item"])


def _online(store, service: str, key: str, ids: list[str]) -> dict[str, list]:
    result = store.get_online_features(features=store.get_feature_service(service), entity_rows=[{key: i} for i in ids])
    return _normalised(result.to_dict())


@pytest.fixture(scope="module")
def redis_store(services: Services, shop: Shop):
    """The shop published (feast apply + materialize) through the redis profile into a private Redis database."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PROPENSITY_REDIS_DB", str(services.redis_dbs[0]))
        redis_yaml = profile("redis", shop.repo)
        publish_features(shop.repo, shop.as_of, progress=_quiet, yaml_file=redis_yaml)
        yield open_store(shop.repo, redis_yaml)


@pytest.mark.slow
def test_redis_serves_the_same_values_as_sqlite(shop: Shop, redis_store) -> None:
    sqlite_store = open_store(shop.repo)
    assert redis_store.config.online_store.type == "redis" and sqlite_store.config.online_store.type == "sqlite"
    for service, key, ids in ((USER_SERVICE, "user_id", shop.users), (ITEM_SERVICE, "item_id", shop.items)):
        from_redis, from_sqlite = _online(redis_store, service, key, ids), _online(sqlite_store, service, key, ids)
        assert from_redis == from_sqlite, service
        # Real values, not a store of nulls: the known entities have features, the unknown one has none.
        known = [v for name, column in from_redis.items() if name != key for v in column[:-1]]
        assert sum(v is not None for v in known) > len(known) // 2
        assert all(column[-1] is None for name, column in from_redis.items() if name != key)
    # Relative paths in profiles/redis.yaml landed in the repository, as with the default yaml.
    assert (shop.repo / "data" / "registry-redis.db").exists() and not (shop.repo / "profiles" / "data").exists()


@pytest.mark.slow
def test_the_servers_plan_once_read_matches_feast_on_redis_and_sqlite(shop: Shop, redis_store) -> None:
    """server.store_reads reads Feast's own Redis hashes and SQLite tables: the values are Feast's, in one round trip."""
    from server.online_features import OnlineUserFeatures

    sqlite_store = open_store(shop.repo)
    ids = shop.users + [shop.users[0]]  # an unknown user ("nobody") and a repeated one
    expected = _online(sqlite_store, USER_SERVICE, "user_id", ids)
    for store, backend in ((redis_store, "RedisRead"), (sqlite_store, "SqliteRead")):
        reader = OnlineUserFeatures(store, USER_SERVICE)
        assert reader.backend == backend
        assert _normalised(reader.fetch_columns(ids)) == {k: v for k, v in expected.items() if k != "user_id"}, backend
        subset = OnlineUserFeatures(store, USER_SERVICE, only={"views_7d", "recent_item_ids"}).fetch_columns(ids)
        assert _normalised(subset) == {k: expected[k] for k in ("views_7d", "recent_item_ids")}, backend


@pytest.mark.slow
def test_push_to_redis_is_visible_to_online_reads(shop: Shop, redis_store) -> None:
    from feast import PushSource
    from feast.data_source import PushMode
    from feast.types import Int64

    pushes = [s for s in redis_store.list_data_sources() if isinstance(s, PushSource)]
    if not pushes:
        pytest.skip("the feature repository defines no PushSource yet (streaming updates of user_activity/user_interests)")
    # A pushed view with a scalar Int64 feature (user_activity once streaming lands).
    push_names = {p.name for p in pushes}
    view, changed = next(
        (v, f) for v in sorted(redis_store.list_feature_views(), key=lambda v: v.name)
        if v.stream_source is not None and v.stream_source.name in push_names
        for f in v.features if f.dtype == Int64
    )
    user = shop.users[0]
    row = redis_store.get_online_features(features=[f"{view.name}:{f.name}" for f in view.features], entity_rows=[{"user_id": user}]).to_df()
    assert row[changed.name].iloc[0] != 4242
    row[changed.name] = 4242
    # Newer than the materialized snapshot (as-of midnight): Redis ignores pushes older than the stored row (FIELD-NOTES.md).
    row["event_timestamp"] = pd.Timestamp.now(tz="UTC")
    redis_store.push(view.stream_source.name, row, to=PushMode.ONLINE)
    after = _online_from_new_store(shop.repo, view.name, changed.name, user, redis_store.config.online_store.connection_string)
    assert after == 4242


def _online_from_new_store(repo: Path, view: str, feature: str, user: str, connection: str) -> object:
    """Read through a separately opened store, as another server process would."""
    store = open_store(repo, profile("redis", repo))
    assert store.config.online_store.connection_string == connection
    return store.get_online_features(features=[f"{view}:{feature}"], entity_rows=[{"user_id": user}]).to_dict()[feature][0]


@pytest.mark.slow
def test_sql_registry_is_shared_between_repository_copies(services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROPENSITY_PG_DATABASE", services.pg_databases[0])
    first, second = copy_repo_with_profiles(tmp_path / "first"), copy_repo_with_profiles(tmp_path / "second")
    check_reachable(profile("postgres", first))
    watcher = open_store(second, profile("postgres", second))  # opened before anything is registered
    assert watcher.list_feature_views() == [] and watcher.list_feature_services() == []

    feast_apply(first, profile("postgres", first))

    applier = open_store(first, profile("postgres", first))
    late = open_store(second, profile("postgres", second))
    watcher.refresh_registry()  # a server would see it after cache_ttl_seconds (60 in the profile)
    expected = sorted(v.name for v in applier.list_feature_views())
    assert expected == ["item_content", "item_copurchase", "item_factors", "item_neighbors", "item_stats", "user_activity", "user_interests", "user_profile", "user_purchase_history"]
    for store in (late, watcher):
        assert sorted(v.name for v in store.list_feature_views()) == expected
        assert sorted(s.name for s in store.list_feature_services()) == sorted(s.name for s in applier.list_feature_services())
        assert store.get_feature_service(USER_SERVICE) == applier.get_feature_service(USER_SERVICE)
    assert not (first / "data" / "registry.db").exists() and not (second / "data").exists()


@pytest.mark.slow
def test_production_profile_serves_another_copy_from_one_publish(services: Services, shop: Shop, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis + SQL registry: one copy applies and materializes, a copy without any data serves the same values as SQLite."""
    monkeypatch.setenv("PROPENSITY_REDIS_DB", str(services.redis_dbs[1]))
    monkeypatch.setenv("PROPENSITY_PG_DATABASE", services.pg_databases[1])
    check_reachable(profile("production", shop.repo))
    publish_features(shop.repo, shop.as_of, progress=_quiet, yaml_file=profile("production", shop.repo))

    server_copy = copy_repo_with_profiles(tmp_path / "server")
    served = open_store(server_copy, profile("production", server_copy))
    sqlite_store = open_store(shop.repo)
    for service, key, ids in ((USER_SERVICE, "user_id", shop.users), (ITEM_SERVICE, "item_id", shop.items)):
        assert _online(served, service, key, ids) == _online(sqlite_store, service, key, ids), service
