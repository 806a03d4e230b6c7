"""Access to the Feast repository: open the store, apply definitions, fingerprint feature services."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from feast import FeatureStore, FeatureView
from feast.repo_config import RepoConfig

from propensity.settings import PROJECT_ROOT
from propensity.store_profiles import apply_defaults, check_reachable


def is_sqlite_online_store(config: RepoConfig) -> bool:
    """Feast's SQLite online store (the default profile), named by its short or its full type name."""
    kind = str(config.online_store.type).lower()
    return kind == "sqlite" or kind.endswith("sqliteonlinestore")


def sqlite_online_path(config: RepoConfig) -> Path:
    """The file Feast's SQLite online store keeps its tables in."""
    from feast.infra.online_stores.sqlite import SqliteOnlineStore

    return Path(SqliteOnlineStore._get_db_path(config))


def sqlite_online_table(config: RepoConfig, view: FeatureView) -> str:
    """The table Feast's SQLite online store keeps a feature view's rows in (one row per entity and feature)."""
    from feast.infra.online_stores.sqlite import _table_id

    return _table_id(config.project, view, config.registry.enable_online_feature_view_versioning)


class FeatureContractError(RuntimeError):
    """A model and a feature service disagree about the features."""


def open_store(repo: Path, yaml_file: Path | None = None, check_offline_store: bool = True) -> FeatureStore:
    """The Feast store of the repository at repo, configured by its feature_store.yaml or by a profile's yaml_file.

    check_offline_store=False: for a caller that never uses Feast's offline store (it reads the registry, and perhaps
    the online store). Feast's own loader checks the offline store's section at load by importing its implementation
    (DuckDB's imports ibis: measured below); here that check runs when the store is first used instead.
    """
    config = yaml_file or repo / "feature_store.yaml"
    if not config.exists():
        raise FileNotFoundError(f"{config}: no such feature_store.yaml (is {repo} the Feast repository?)")
    apply_defaults()  # profiles read ${PROPENSITY_*} connection variables
    if yaml_file is not None:
        check_reachable(config)  # "Redis at host:port is not accepting connections" instead of a late Feast error
    if check_offline_store:
        return FeatureStore(repo_path=str(repo), fs_yaml_file=config.resolve())
    return FeatureStore(repo_path=str(repo), config=_config_checking_offline_store_on_use(repo, config.resolve()))


def _config_checking_offline_store_on_use(repo: Path, config_file: Path) -> RepoConfig:
    """feast.repo_config.load_repo_config, with the offline store's section checked on first use rather than at load.

    RepoConfig validates an offline_store given as a mapping when it is built, and one given as a type name only
    when RepoConfig.offline_store is first read (Feast's own lazy path). So the config is built with the type name,
    then given the file's full section back, which that first read validates and uses exactly as Feast's loader would.
    """
    import yaml
    from feast.repo_config import FeastConfigError
    from pydantic import ValidationError

    raw = yaml.safe_load(os.path.expandvars(config_file.read_text()))
    offline = raw.get("offline_store") if isinstance(raw, dict) else None
    if isinstance(offline, dict) and isinstance(offline.get("type"), str):
        raw["offline_store"] = offline["type"]
    try:
        config = RepoConfig(**raw)
    except ValidationError as error:
        raise FeastConfigError(error, config_file) from None
    config.repo_path = repo
    if isinstance(offline, dict):
        config.offline_config = offline
    return config


def feast_apply(repo: Path, yaml_file: Path | None = None) -> str:
    """Run the plain `feast apply` a feature engineer would run, so both paths stay identical."""
    apply_defaults()  # the feast subprocess expands the profile's ${PROPENSITY_*} variables itself
    feast = Path(sys.executable).with_name("feast")
    profile = ["--feature-store-yaml", str(yaml_file.resolve())] if yaml_file else []
    result = subprocess.run(
        [str(feast), "--chdir", str(repo), *profile, "apply"], capture_output=True, text=True,
        env={**os.environ, "FEAST_USAGE": "False"},
    )
    if result.returncode != 0:
        raise RuntimeError(f"feast apply failed in {repo}:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def copy_definitions(destination: Path, source: Path | None = None) -> Path:
    """A private Feast repository: the definitions and feature_store.yaml of source (default the project's), no data."""
    source = source or PROJECT_ROOT / "feature_repo"
    destination.mkdir(parents=True, exist_ok=True)
    for path in [*source.glob("*.py"), source / "feature_store.yaml", source / ".feastignore"]:
        if path.exists():
            shutil.copy2(path, destination / path.name)
    return destination


def offline_table(store: FeatureStore, view: FeatureView) -> Path:
    """The Parquet table behind a feature view's batch source (relative paths are relative to the repository)."""
    path = Path(view.batch_source.path)
    return path if path.is_absolute() else Path(store.repo_path) / path


def service_schema(store: FeatureStore, service_name: str) -> list[tuple[str, str, str]]:
    """(feature view, feature, type) for every feature of a service, in service order."""
    service = store.get_feature_service(service_name)
    return [
        (projection.name_to_use(), field.name, str(field.dtype))
        for projection in service.feature_view_projections
        for field in projection.features
    ]


def service_fingerprint(store: FeatureStore, service_name: str) -> str:
    """A short hash of a service's features and types: equal hashes mean the same contract."""
    payload = json.dumps(service_schema(store, service_name)).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def check_service(store: FeatureStore, service_name: str, expected_fingerprint: str, model: str) -> None:
    """Refuse a model whose feature service changed since it was trained."""
    actual = service_fingerprint(store, service_name)
    if actual != expected_fingerprint:
        raise FeatureContractError(
            f"model {model}: feature service {service_name!r} has fingerprint {actual}, but the model was trained "
            f"against {expected_fingerprint}; its features or types changed. Retrain, or publish the change as a new _vN service."
        )
