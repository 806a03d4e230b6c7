"""open_store(check_offline_store=False): Feast's configuration, with only the offline store's check moved to first use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from feast.repo_config import FeastConfigError, load_repo_config
from pydantic import ValidationError

from propensity.feature_store import copy_definitions, open_store

ROOT = Path(__file__).parents[1]


def test_the_same_configuration_as_feasts_loader(tmp_path: Path) -> None:
    repo = copy_definitions(tmp_path / "repo")
    deferred = open_store(repo, check_offline_store=False).config
    loaded = load_repo_config(repo, repo / "feature_store.yaml")
    assert deferred.offline_store == loaded.offline_store
    assert deferred.online_store == loaded.online_store
    assert deferred.registry == loaded.registry and deferred.project == loaded.project


def test_opening_does_not_import_the_offline_store(tmp_path: Path) -> None:
    """In a fresh interpreter: DuckDB's offline store (and with it ibis) is imported on first use, not at open."""
    repo = copy_definitions(tmp_path / "repo")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from propensity.feature_store import open_store\n"
        f"store = open_store(Path({str(repo)!r}), check_offline_store=False)\n"
        "print('AT OPEN', 'ibis' in sys.modules)\n"
        "print('ON USE', type(store.config.offline_store).__name__, 'ibis' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "FEAST_USAGE": "False"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["AT OPEN False", "ON USE DuckDBOfflineStoreConfig True"]


def test_a_bad_offline_section_still_fails_when_first_used(tmp_path: Path) -> None:
    repo = copy_definitions(tmp_path / "repo")
    config = repo / "feature_store.yaml"
    config.write_text(config.read_text().replace("  type: duckdb", "  type: duckdb\n  no_such_option: 1"))
    with pytest.raises(FeastConfigError, match="no_such_option"):
        open_store(repo)
    store = open_store(repo, check_offline_store=False)
    with pytest.raises(ValidationError, match="no_such_option"):
        store.config.offline_store  # noqa: B018
