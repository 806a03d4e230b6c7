"""Feature store profiles: named feature_store.yaml files for Redis and PostgreSQL, their defaults and a reachability check.

The profiles live in feature_repo/profiles/ and read their connections from ${VAR}s. Feast expands
those with os.path.expandvars, which has no default syntax, so apply_defaults() fills in the
local servers for every variable that is unset before a store is opened.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from sqlalchemy.engine import URL, make_url

# Profile name -> file under <repo>/profiles/; "local" is the repository's own feature_store.yaml.
PROFILES: dict[str, str | None] = {
    "local": None,
    "redis": "redis.yaml",
    "postgres": "postgres.yaml",
    "production": "production.yaml",
    "spark": "spark.yaml",  # Spark offline store and materialization (docs/scale.md)
}

# The variables the profiles use, with the local servers of scripts/services.sh as defaults.
DEFAULTS: dict[str, str] = {
    "PROPENSITY_REDIS_ADDRESS": "127.0.0.1:6379",  # Feast's format: host:port[,password=...][,ssl=true]
    "PROPENSITY_REDIS_DB": "0",  # Redis database number: isolates tests and environments on one server
    "PROPENSITY_PG_URL": "postgresql+psycopg://postgres@127.0.0.1:5432",  # SQLAlchemy URL of the server, no database
    "PROPENSITY_PG_DATABASE": "propensity",  # the registry's database: one per environment (or test)
    "PROPENSITY_SPARK_MASTER": "local[*]",  # the spark profile's master: spark://host:7077 or k8s://... on a cluster
    # Spark's Python workers run Feast's materialization code: this interpreter here, the executors' on a cluster
    # (pyspark's local mode reads only this variable, never spark.pyspark.python).
    "PYSPARK_PYTHON": sys.executable,
    "PROPENSITY_SPARK_SHUFFLE_PARTITIONS": "200",  # Spark's own default; a few on one machine, ~3x the cores on a cluster
    # The driver's heap. Feast's Spark retrieval collects the training rows into the driver (toPandas), so it must
    # hold them: Spark's own 1g ran out of heap on the 20M-event shop's 350,000 user rows (docs/benchmarks/scale.md).
    "PROPENSITY_SPARK_DRIVER_MEMORY": "1g",
}

_TIMEOUT_SECONDS = 3.0


class StoreUnreachableError(ConnectionError):
    """A server that a feature store profile needs does not accept connections."""


@dataclass(frozen=True)
class Endpoint:
    """A server a profile connects to: what it is for, and where."""

    role: str  # "online store (Redis)" or "registry (PostgreSQL)"
    host: str
    port: int
    database: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def profile_yaml(name: str, repo: Path) -> Path | None:
    """The feature_store.yaml of profile name in the repository at repo; None for "local" (the repository's own)."""
    if name not in PROFILES:
        raise ValueError(f"unknown feature store profile {name!r}; known: {', '.join(PROFILES)}")
    file_name = PROFILES[name]
    if file_name is None:
        return None
    path = repo / "profiles" / file_name
    if not path.exists():
        raise FileNotFoundError(f"{path}: feature store profile {name!r} is missing from the repository")
    return path


def apply_defaults() -> dict[str, str]:
    """Set every unset PROPENSITY_* variable the profiles use to its local default; return the ones set."""
    applied = {key: value for key, value in DEFAULTS.items() if not os.environ.get(key)}
    os.environ.update(applied)
    return applied


def endpoints(yaml_file: Path) -> list[Endpoint]:
    """The servers a feature_store.yaml needs (Redis online store, SQL registry on PostgreSQL), variables expanded."""
    config = _load(yaml_file)
    found: list[Endpoint] = []
    online = config.get("online_store") or {}
    if isinstance(online, dict) and online.get("type") == "redis":
        for part in str(online.get("connection_string", "localhost:6379")).split(","):
            part = part.strip()
            if part and "=" not in part:
                host, _, port = part.rpartition(":")
                found.append(Endpoint("online store (Redis)", host or "localhost", int(port or 6379)))
    url = _registry_url(config)
    if url is not None:
        found.append(Endpoint("registry (PostgreSQL)", url.host or "localhost", url.port or 5432, url.database or ""))
    return found


def check_reachable(yaml_file: Path) -> None:
    """Raise StoreUnreachableError naming host:port when a server the profile needs is down (or its database is missing)."""
    for endpoint in endpoints(yaml_file):
        try:
            with socket.create_connection((endpoint.host, endpoint.port), timeout=_TIMEOUT_SECONDS):
                pass
        except OSError as error:
            raise StoreUnreachableError(
                f"{yaml_file.name}: {endpoint.role} at {endpoint.address} is not accepting connections ({error}); "
                "start the local servers with scripts/services.sh, or point the profile elsewhere (docs/stores.md)"
            ) from error
        if endpoint.database:
            _check_database(yaml_file, endpoint)


def ensure_database(yaml_file: Path) -> bool:
    """Create the PostgreSQL database of a profile's SQL registry if it does not exist; True if it was created."""
    url = _registry_url(_load(yaml_file))
    if url is None or not url.database:
        return False
    import psycopg
    from psycopg import sql

    with psycopg.connect(_libpq(url.set(database="postgres")), autocommit=True, connect_timeout=int(_TIMEOUT_SECONDS)) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (url.database,)).fetchone():
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(str(url.database))))
    return True


def _check_database(yaml_file: Path, endpoint: Endpoint) -> None:
    import psycopg

    url = _registry_url(_load(yaml_file))
    assert url is not None
    try:
        with psycopg.connect(_libpq(url), connect_timeout=int(_TIMEOUT_SECONDS)):
            pass
    except psycopg.OperationalError as error:
        raise StoreUnreachableError(
            f"{yaml_file.name}: {endpoint.role} at {endpoint.address}, database {endpoint.database!r}: "
            f"{str(error).strip()}; create it with `createdb -h {endpoint.host} -p {endpoint.port} -U {url.username or 'postgres'} "
            f"{endpoint.database}`, scripts/services.sh or `python -m propensity.store_profiles --create-database {yaml_file.stem}`"
        ) from error


def _load(yaml_file: Path) -> dict:
    """A feature_store.yaml read the way Feast reads it: variables expanded (after the defaults)."""
    apply_defaults()
    return yaml.safe_load(os.path.expandvars(yaml_file.read_text())) or {}


def _registry_url(config: dict) -> URL | None:
    """The SQLAlchemy URL of a SQL registry on PostgreSQL; None for a file registry or another database."""
    registry = config.get("registry")
    if not (isinstance(registry, dict) and registry.get("registry_type") == "sql"):
        return None
    url = make_url(str(registry.get("path", "")))
    return url if url.get_backend_name() == "postgresql" else None


def _libpq(url: URL) -> str:
    """A libpq connection string from a SQLAlchemy URL (drops the +driver part)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def main(argv: list[str] | None = None) -> int:
    """`python -m propensity.store_profiles [--create-database] PROFILE [REPO]`: check a profile's servers."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m propensity.store_profiles", description=main.__doc__)
    parser.add_argument("profile", choices=[name for name, file in PROFILES.items() if file])
    parser.add_argument("repo", nargs="?", type=Path, default=Path(__file__).resolve().parents[1] / "feature_repo")
    parser.add_argument("--create-database", action="store_true", help="create the SQL registry's database if missing")
    args = parser.parse_args(argv)
    yaml_file = profile_yaml(args.profile, args.repo)
    assert yaml_file is not None
    if args.create_database and ensure_database(yaml_file):
        print(f"created the registry database of {yaml_file.name}")
    try:
        check_reachable(yaml_file)
    except StoreUnreachableError as error:
        print(error)
        return 1
    print(f"{yaml_file.name}: " + (", ".join(f"{e.role} at {e.address}" for e in endpoints(yaml_file)) or "no servers") + " reachable")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
