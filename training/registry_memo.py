"""What score-batch --users-only reads from Feast's registry, remembered under the registry file's content.

That path needs three facts from the registry: the tables behind the user feature service's views, their columns
and TTLs (training.offline_user_features.service_tables), and the service's fingerprint, which must equal the one
the model was trained against. They are a function of the registry's bytes (and of the repository path that
relative sources resolve against). Reading them costs `import feast` first: about 1 s of the command's start-up on this
machine, more than DuckDB's whole search for the active users. So the first run reads them through Feast as
always and records them here, keyed by a hash of the registry file, the repository, the service and the features
read; a later run whose registry file hashes the same uses the record without importing Feast. Any `feast apply`
rewrites the registry, so its hash changes and the next run reads through Feast again.

Only a registry that is a local file (Feast's default, `registry: data/registry.db`) is remembered: a SQL or remote
registry can change without its bytes being here to hash, so those are always read through Feast.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection
from datetime import timedelta
from pathlib import Path

import yaml

from training.offline_user_features import ViewTable

FORMAT = 1  # bump when ViewTable or the record's layout changes: older records are then never matched


def registry_file(repo: Path, yaml_file: Path | None = None) -> Path | None:
    """The local file Feast keeps this repository's registry in, as feature_store.yaml names it; None when the
    registry is not a local file (SQL, remote, object storage) or the configuration cannot be read here."""
    config = yaml_file or repo / "feature_store.yaml"
    try:
        raw = yaml.safe_load(os.path.expandvars(config.read_text()))
    except (OSError, yaml.YAMLError):
        return None
    registry = raw.get("registry") if isinstance(raw, dict) else None
    if isinstance(registry, dict):
        if registry.get("registry_type", "file") != "file":
            return None
        registry = registry.get("path")
    if not isinstance(registry, str) or "://" in registry:
        return None
    path = Path(registry)
    return path if path.is_absolute() else repo / path  # Feast resolves a relative registry path against the repository


def record_key(registry: Path, repo: Path, service: str, only: Collection[str] | None) -> str | None:
    """The key a record is kept under: the registry's content, the repository and what is read (None: no registry file)."""
    try:
        content = registry.read_bytes()
    except OSError:
        return None
    digest = hashlib.sha256(content)
    digest.update(json.dumps([FORMAT, str(repo.resolve()), service, sorted(only) if only is not None else None]).encode())
    return digest.hexdigest()


def recall(directory: Path, key: str) -> tuple[list[ViewTable], str] | None:
    """The tables and fingerprint recorded under key, or None (none recorded, or a record that does not parse)."""
    try:
        record = json.loads((directory / f"{key}.json").read_text())
        tables = [
            ViewTable(
                name=t["name"], path=Path(t["path"]), key=t["key"], timestamp=t["timestamp"], created=t["created"],
                features=tuple((column, feature) for column, feature in t["features"]),
                ttl=timedelta(seconds=t["ttl_seconds"]) if t["ttl_seconds"] is not None else None,
            )
            for t in record["tables"]
        ]
        return tables, str(record["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember(directory: Path, key: str, tables: list[ViewTable], fingerprint: str) -> None:
    """Record what was read through Feast under key (written aside and renamed: a reader never sees half a record)."""
    record = {
        "fingerprint": fingerprint,
        "tables": [
            {"name": t.name, "path": str(t.path), "key": t.key, "timestamp": t.timestamp, "created": t.created,
             "features": [list(pair) for pair in t.features], "ttl_seconds": t.ttl.total_seconds() if t.ttl else None}
            for t in tables
        ],
    }
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{key}.{os.getpid()}.json"
    partial.write_text(json.dumps(record))
    os.replace(partial, directory / f"{key}.json")
