"""`python -m bench.user_read`: where the time of one user's online read goes, Feast's generic path vs the server's.

Per request the server needs one user row of the user feature service. Both paths are measured on
the bench shop (var/bench) over >= 1,000 distinct users, round-robin, p50/p99 in milliseconds:

- Feast's `get_online_features(service).to_dict()` + the TTL rule (what the server did before), split
  into planning and response assembly (everything Feast does outside the store call), the store read
  with Feast's protobuf decoding (`OnlineStore.online_read`), conversion to Python (`to_dict`) and
  the TTL check;
- the server's plan-once read (server.online_features.OnlineUserFeatures) end to end, and its steps
  replayed one by one: entity keys, the store round trip, protobuf decoding, conversion to Python and
  the TTL check (server.store_reads).

    python -m bench.user_read                       # SQLite, the default profile
    python -m bench.user_read --profile redis       # the same shop materialized into Redis (db 14)

Writes docs/benchmarks/user_read_<profile>.json and prints a Markdown table (docs/benchmarks/user_read.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from propensity.settings import PROJECT_ROOT

SERVICE = "propensity_user_v2"


def _timed(fn: Callable[[str], dict[str, float]], users: list[str], passes: int) -> dict[str, dict[str, float]]:
    """Run fn per user (it returns per-step seconds) and summarise each step as p50/p99 ms."""
    for user in users[:100]:
        fn(user)
    gc.collect()
    gc.freeze()
    steps: dict[str, list[float]] = {}
    try:
        for _ in range(passes):
            for user in users:
                for name, seconds in fn(user).items():
                    steps.setdefault(name, []).append(seconds * 1000)
    finally:
        gc.unfreeze()
    return {name: {"p50": round(float(np.median(v)), 4), "p99": round(float(np.percentile(v, 99)), 4)} for name, v in steps.items()}


def feast_generic(store, service_name: str) -> Callable[[str], dict[str, float]]:
    """The old path, with the online store's read timed from inside Feast."""
    service = store.get_feature_service(service_name)
    ttl = {}
    for projection in service.feature_view_projections:
        view_ttl = store.get_feature_view(projection.name).ttl
        for feature in projection.features:
            ttl[feature.name] = view_ttl.total_seconds() if view_ttl else float("inf")
    online = store._get_provider().online_store
    # Redis reads every view's hash fields in _read_hash_fields (its own batched path); SQLite in online_read,
    # which also parses the protobuf values.
    method = "_read_hash_fields" if hasattr(online, "_read_hash_fields") else "online_read"
    inner = getattr(online, method)
    spent = [0.0]

    def timed_read(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0

    setattr(online, method, timed_read)

    def run(user: str) -> dict[str, float]:
        spent[0] = 0.0
        t0 = time.perf_counter()
        response = store.get_online_features(features=service, entity_rows=[{"user_id": user}])
        t1 = time.perf_counter()
        columns = response.to_dict(include_event_timestamps=True)
        t2 = time.perf_counter()
        now = time.time()
        {name: columns[name][0] if not columns[name + "__ts"][0] or now - columns[name + "__ts"][0] <= limit else None for name, limit in ttl.items()}
        t3 = time.perf_counter()
        return {"planning and response assembly": t1 - t0 - spent[0], "store read (SQLite: + protobuf decode)": spent[0],
                "conversion to Python": t2 - t1, "TTL check": t3 - t2, "total": t3 - t0}

    return run


def plan_once(store, service_name: str) -> tuple[Callable[[str], dict[str, float]], Callable[[str], dict[str, float]]]:
    """The server's reader end to end, and its steps replayed one at a time."""
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto
    from google.protobuf.timestamp_pb2 import Timestamp

    from server.online_features import OnlineUserFeatures
    from server.store_reads import RedisRead, SqliteRead, _entity_keys, _stored_epoch, fresh, python_value

    reader = OnlineUserFeatures(store, service_name)
    backend = reader._reader

    def end_to_end(user: str) -> dict[str, float]:
        t0 = time.perf_counter()
        reader.fetch([user])
        return {"total": time.perf_counter() - t0}

    def steps(user: str) -> dict[str, float]:
        t0 = time.perf_counter()
        keys = _entity_keys(backend._plans, [user], backend._version)
        t1 = time.perf_counter()
        if isinstance(backend, SqliteRead):
            rows = backend._conn.execute(backend._query(1), keys * len(backend._tables)).fetchall()
            t2 = time.perf_counter()
            protos = [(r[0], r[2], ValueProto.FromString(r[3]), r[4]) for r in rows]
            t3 = time.perf_counter()
            values = [(view, name, python_value(p), stamp) for view, name, p, stamp in protos]
            t4 = time.perf_counter()
            now = time.time()
            oldest = [now - plan.ttl_seconds for plan in backend._plans]
            {name: value for view, name, value, stamp in values if not stamp or _stored_epoch(stamp) >= oldest[view]}
        elif isinstance(backend, RedisRead):
            client = backend._online._get_client(backend._config.online_store)
            reply = client.hmget(keys[0] + backend._project, backend._fields)
            t2 = time.perf_counter()
            protos = [ValueProto.FromString(v) if v else None for v in reply]
            t3 = time.perf_counter()
            [python_value(p) if p is not None else None for p in protos]
            t4 = time.perf_counter()
            now = time.time()
            for plan, (_, _, ts_index) in zip(backend._plans, backend._layout):
                if reply[ts_index]:
                    stamp = Timestamp.FromString(reply[ts_index])
                    fresh(stamp.seconds + stamp.nanos / 1e9, plan.ttl_seconds, now)
        else:
            raise SystemExit(f"no step replay for {type(backend).__name__}")
        t5 = time.perf_counter()
        return {"entity keys": t1 - t0, "store round trip": t2 - t1, "protobuf decode": t3 - t2, "conversion to Python": t4 - t3, "TTL check": t5 - t4}

    return end_to_end, steps


def redis_copy(repo: Path, db: int) -> tuple[Path, Path]:
    """The bench shop's repository copied with the redis profile and materialized into Redis database db."""
    from training.publish import publish_features

    target = PROJECT_ROOT / "var" / "bench-user-read-redis"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(repo, target, ignore=shutil.ignore_patterns("registry*.db", "online_store.db"))
    shutil.copytree(PROJECT_ROOT / "feature_repo" / "profiles", target / "profiles", dirs_exist_ok=True)
    os.environ["PROPENSITY_REDIS_DB"] = str(db)
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=db).flushdb()
    as_of = pd.read_parquet(target / "data" / "offline" / "user_activity.parquet", columns=["event_timestamp"])["event_timestamp"].max()
    yaml_file = target / "profiles" / "redis.yaml"
    publish_features(target, as_of.to_pydatetime(), progress=lambda m: print(f"  {m}", flush=True), yaml_file=yaml_file)
    return target, yaml_file


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(prog="python -m bench.user_read", description=__doc__.splitlines()[0])
    parser.add_argument("--state", default=str(PROJECT_ROOT / "var" / "bench"))
    parser.add_argument("--profile", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--redis-db", type=int, default=14)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "docs" / "benchmarks"))
    args = parser.parse_args(argv)

    from propensity.feature_store import open_store

    repo = Path(args.state) / "feature_repo"
    if not (repo / "data" / "online_store.db").exists():
        raise SystemExit(f"{repo}: no bench shop; run `make bench` (or python -m bench.run) once to build it")
    yaml_file = None
    if args.profile == "redis":
        print(f"materializing the bench shop into Redis db {args.redis_db}", flush=True)
        repo, yaml_file = redis_copy(repo, args.redis_db)
    store = open_store(repo, yaml_file)
    users = pd.read_parquet(repo / "data" / "offline" / "user_activity.parquet", columns=["user_id"])["user_id"].astype(str).unique()
    users = sorted(users)[: args.users]
    end_to_end, steps = plan_once(store, SERVICE)
    results = {
        "profile": args.profile, "service": SERVICE, "users": len(users), "passes": args.passes,
        "feast_get_online_features": _timed(feast_generic(store, SERVICE), users, args.passes),
        "plan_once_read": _timed(end_to_end, users, args.passes)["total"],
        "plan_once_steps": _timed(steps, users, args.passes),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"user_read_{args.profile}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    lines = [f"### {results['profile']}: one user row of {results['service']} ({results['users']:,} users x {results['passes']} passes)", "",
             "| path | step | p50 ms | p99 ms |", "|---|---|---:|---:|"]
    for step, value in results["feast_get_online_features"].items():
        lines.append(f"| Feast get_online_features | {step} | {value['p50']:.3f} | {value['p99']:.3f} |")
    for step, value in results["plan_once_steps"].items():
        lines.append(f"| plan-once read (steps replayed) | {step} | {value['p50']:.3f} | {value['p99']:.3f} |")
    value = results["plan_once_read"]
    lines.append(f"| **plan-once read (server.online_features)** | **total** | **{value['p50']:.3f}** | **{value['p99']:.3f}** |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
