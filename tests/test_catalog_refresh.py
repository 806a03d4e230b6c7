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
from server.item_cache import CatalogSourceStamp, CatalogSpec, ItemCache
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
