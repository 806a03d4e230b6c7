"""The catalog refresh skips its ~1-2 s re-read when nothing the catalog is read from changed, and re-reads after any write."""

from __future__ import annotations

import asyncio
import functools
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from propensity.feature_store import offline_table, open_store
from server import background
from server.background import Background
from server.item_cache import CatalogSourceStamp, CatalogSpec, FreshnessTracker, ItemCache
from tests import background_hooks
from tests.conftest import Pipeline, private_env


def _set_available(repo: Path, item_id: str, available: int) -> None:
    """Write one item's item_stats row through Feast, as a materialization or push would, with one value changed."""
    store = open_store(repo)
    view = store.get_feature_view("item_stats")
    names = [field.name for field in view.features]
    row = store.get_online_features(features=[f"item_stats:{n}" for n in names], entity_rows=[{"item_id": item_id}]).to_df()
    row["item_available"] = available
    row[view.batch_source.timestamp_field] = pd.Timestamp(datetime.now(timezone.utc))
    store.write_to_online_store("item_stats", row[["item_id", view.batch_source.timestamp_field, *names]])


def test_an_unchanged_source_skips_the_re_read_and_any_write_brings_it_back(pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env, _ = private_env(pipeline, "catalog-stamp", copy_repo=True)
    repo = Path(env["PROPENSITY_FEATURE_REPO"])
    spec = CatalogSpec(repo, None, "propensity_item_v2")
    stamp = CatalogSourceStamp(spec)
    assert stamp() is not None and stamp() == stamp()

    builds = tmp_path / "builds"
    builds.mkdir()
    # Runs in the build process: the real build, recorded, so the test can count re-reads.
    monkeypatch.setattr(background, "build_catalog_pieces", functools.partial(background_hooks.counted_build, str(builds)))
    items = ItemCache(spec)
    jobs = Background(items, models=None, freshness=None, metrics=None, catalog_seconds=3600, model_seconds=3600)  # type: ignore[arg-type]
    item = str(items.catalog.item_ids[int(np.flatnonzero(items.catalog.available)[0])])
    try:
        loaded = items.loaded_at
        assert asyncio.run(jobs.refresh_catalog()) is False
        assert not list(builds.iterdir()), "the catalog was re-read although nothing changed"
        assert items.loaded_at > loaded  # confirmed current, so its age metric does not grow

        before = stamp()
        _set_available(repo, item, 0)
        assert stamp() != before
        assert asyncio.run(jobs.refresh_catalog()) is True
        assert len(list(builds.iterdir())) == 1
        assert not items.catalog.available[items.catalog.index[item]]  # the written value is served

        assert asyncio.run(jobs.refresh_catalog()) is False  # stamped before that read: still current
        assert len(list(builds.iterdir())) == 1

        offline = offline_table(open_store(repo), open_store(repo).get_feature_view("item_stats"))
        os.utime(offline, ns=(offline.stat().st_atime_ns, offline.stat().st_mtime_ns + 1_000_000_000))
        assert asyncio.run(jobs.refresh_catalog()) is False  # re-read (a new item list) though with the same content
        assert len(list(builds.iterdir())) == 2
    finally:
        asyncio.run(jobs.stop())


def _age(path: Path, seconds: float = 30.0) -> None:
    """Set a file's modification time `seconds` into the past, as if it had settled long ago."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns - int(seconds * 1e9)))


def test_the_stamp_skips_its_sql_while_the_database_files_are_settled_and_unchanged(pipeline: Pipeline) -> None:
    env, _ = private_env(pipeline, "catalog-stamp-files", copy_repo=True)
    repo = Path(env["PROPENSITY_FEATURE_REPO"])
    stamp = CatalogSourceStamp(CatalogSpec(repo, None, "propensity_item_v2"))
    db = Path(stamp._db)  # noqa: SLF001 - the file the test ages and writes
    _age(db)
    first = stamp()
    assert stamp() == stamp() == first and stamp.aggregates == 1  # settled and unchanged: the SQL ran once

    item = pd.read_parquet(offline_table(open_store(repo), open_store(repo).get_feature_view("item_stats")))["item_id"].iloc[0]
    _set_available(repo, str(item), 0)  # a write: the file changes, and is too recent to be trusted by its time alone
    changed = stamp()
    assert changed != first and stamp.aggregates == 2
    assert stamp() == changed and stamp.aggregates == 3  # still within the settling second: the SQL runs again
    _age(db)
    assert stamp() == changed and stamp() == changed and stamp.aggregates == 4


def test_freshness_re_reads_the_registry_only_when_it_changed(pipeline: Pipeline) -> None:
    env, _ = private_env(pipeline, "freshness-registry", copy_repo=True)
    repo = Path(env["PROPENSITY_FEATURE_REPO"])
    store = open_store(repo)
    pushed: dict[str, float] = {}
    tracker = FreshnessTracker(store, lambda: dict(pushed))
    registry = tracker._registry  # noqa: SLF001
    assert registry is not None and registry.is_file()
    _age(registry)
    first = tracker.read()
    assert tracker.read().keys() == first.keys() and tracker.registry_reads == 1  # unchanged registry: reused
    view = sorted(first)[0]
    pushed[view] = datetime.now(timezone.utc).timestamp()  # a push is seen without a registry read
    assert tracker.read()[view][0] < 5.0 and tracker.registry_reads == 1
    registry.write_bytes(registry.read_bytes())  # what `feast materialize` / `feast apply` do to it
    tracker.read()
    assert tracker.registry_reads == 2
    _age(registry)
    tracker.read()
    tracker.read()
    assert tracker.registry_reads == 3
