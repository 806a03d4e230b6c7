"""The bench shop's user features in the local Redis, for the Redis profile's user-read floor.

Same definitions and offline tables as var/bench/feature_repo, published through a
feature_store.yaml of the bench's own (var/bench/redis/feature_store.yaml): Redis online store,
a registry file of its own, and the Feast project `propensity_bench`. Feast's Redis keys end with
the project name, so these rows never collide with the tests' or `make run`'s (project
`propensity`, and the tests use databases 7-15 besides). Only the user feature service's views
are materialized (the floor reads users only); a stamp records for which bench shop, and a probe
read re-materializes when Redis lost the rows (it runs without persistence).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

from bench.state import BenchState

PROJECT = "propensity_bench"
DEFAULT_ADDRESS = "127.0.0.1:6379"
DATABASE = 0


def redis_address() -> str:
    return os.environ.get("PROPENSITY_REDIS_ADDRESS") or DEFAULT_ADDRESS


def profile_text(address: str, db: int = DATABASE) -> str:
    """The bench's Redis feature_store.yaml (relative paths resolve against the Feast repository)."""
    return f"""# Written by bench/redis_store.py: the bench shop's online store in Redis, under a project of its own.
project: {PROJECT}
provider: local
registry: data/registry-bench-redis.db
online_store:
  type: redis
  connection_string: "{address},db={db}"
offline_store:
  type: duckdb
entity_key_serialization_version: 3
"""


def reachable(address: str, timeout: float = 2.0) -> str | None:
    """None when Redis at host:port accepts connections, else why not."""
    host, _, port = address.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port or 6379)), timeout=timeout):
            return None
    except OSError as error:
        return f"Redis at {address} is not accepting connections ({error}); start it with scripts/services.sh"


def ensure_redis_store(state: BenchState, service_name: str, probe_users: Sequence[str], expected: Callable[[str], dict],
                       progress: Callable[[str], None] = print) -> tuple[object | None, str]:
    """(Feast store on Redis, how it was obtained) or (None, why not). Materializes when needed."""
    address = redis_address()
    why = reachable(address)
    if why:
        return None, why
    from feast import FeatureStore

    from bench.floor import user_reader
    from propensity.feature_store import feast_apply

    directory = state.root / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    yaml_file = directory / "feature_store.yaml"
    yaml_file.write_text(profile_text(address))
    stamp_file = directory / "materialized.json"
    shop_stamp = json.loads(state.stamp.read_text()).get("built_at") if state.stamp.exists() else None
    wanted = {"shop_built_at": shop_stamp, "address": address, "db": DATABASE, "project": PROJECT, "service": service_name}

    def open_store() -> FeatureStore:
        return FeatureStore(repo_path=str(state.feature_repo), fs_yaml_file=yaml_file.resolve())

    def matches(store: FeatureStore) -> bool:
        read = user_reader(store, service_name)
        return all(_same(read(u), expected(u)) for u in probe_users)

    if stamp_file.exists() and json.loads(stamp_file.read_text()) == wanted:
        try:
            store = open_store()
            if matches(store):
                return store, f"reused project {PROJECT} in Redis {address} db {DATABASE}"
        except Exception as error:  # noqa: BLE001 - anything wrong with the cached copy means: publish again
            progress(f"  redis: cached copy unusable ({type(error).__name__}: {error}); publishing again")
    t0 = time.perf_counter()
    stamp_file.unlink(missing_ok=True)
    feast_apply(state.feature_repo, yaml_file)
    store = open_store()
    from training.prepare import load_prepared

    as_of = load_prepared(state.work_dir / "prepared").as_of
    views = sorted({p.name for p in store.get_feature_service(service_name).feature_view_projections})
    with (directory / "materialize.log").open("w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        store.materialize(start_date=as_of - timedelta(days=3650), end_date=as_of + timedelta(seconds=1), feature_views=views)
    store = open_store()
    if not matches(store):
        return None, "Redis rows differ from the SQLite rows after materializing"
    stamp_file.write_text(json.dumps(wanted))
    return store, f"materialized {', '.join(views)} into Redis {address} db {DATABASE}, project {PROJECT}, in {time.perf_counter() - t0:.1f}s"


def _same(a: dict, b: dict) -> bool:
    """Rows equal (lists and arrays compared as lists); a row with no value at all never matches."""
    def norm(value: object) -> object:
        return list(value) if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)) else value

    return any(v is not None for v in a.values()) and {k: norm(v) for k, v in a.items()} == {k: norm(v) for k, v in b.items()}
