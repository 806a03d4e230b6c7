"""Tests for the serving process's background machinery: the build process and the catalog's transfer from it."""

from __future__ import annotations

import dataclasses
import fcntl
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from propensity.catalog import Catalog
from server import item_cache
from server.background import build_turn
from server.build_process import BuildFailed, BuildProcess
from server.item_cache import catalog_digest, pack_catalog, unpack_catalog
from tests import background_hooks


def test_the_build_process_runs_functions_in_another_process_and_reports_failures() -> None:
    builder = BuildProcess()
    try:
        child = builder.call(background_hooks.pid)
        assert child != os.getpid() and builder.pid == child
        assert builder.call(background_hooks.pid) == child  # one long-lived helper, not one per call
        with pytest.raises(BuildFailed, match="ValueError: broken on purpose"):
            builder.call(background_hooks.fail, "broken on purpose")
        assert builder.call(background_hooks.pid) == child  # a failing function does not cost the helper
        with pytest.raises(BuildFailed, match="died"):
            builder.call(background_hooks.die)
        assert builder.call(background_hooks.pid) not in (child, os.getpid())  # a dead helper is replaced
    finally:
        builder.close()
    assert builder.pid is None
    with pytest.raises(BuildFailed, match="closed"):
        builder.call(background_hooks.pid)


def test_the_build_process_runs_in_a_scheduling_group_of_its_own_at_the_lowest_priority() -> None:
    """A build charged to the serving workers' session spent their share of the CPU (docs/benchmarks/tail.md)."""
    builder = BuildProcess()
    try:
        session, autogroup = builder.call(background_hooks.scheduling_group)
        assert session != os.getsid(0)  # left the server's session
        if autogroup is not None and background_hooks.scheduling_group()[1] is not None:
            assert autogroup.endswith("nice 19"), autogroup
    finally:
        builder.close()


def _catalog(n: int) -> Catalog:
    ids = [f"i{k:05d}" for k in range(n)]
    rng = np.random.default_rng(1)
    return Catalog.from_frame(pd.DataFrame({
        "item_id": ids,
        "category_id": [f"c{k % 7}" if k % 11 else None for k in range(n)],
        "item_price": rng.random(n),
        "item_purchases_7d": rng.integers(0, 9, n),
        "neighbor_item_ids": [[ids[(k + 1) % n], ids[(k + 5) % n]] for k in range(n)],
        "neighbor_scores": [[2.0, 1.0] for _ in range(n)],
        "als_factors": [[float(k), 1.0] for k in range(n)],
    }))


def _assert_same(a: Catalog, b: Catalog) -> None:
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape, field.name
            assert (list(x) == list(y)) if x.dtype == object else np.array_equal(x, y, equal_nan=True), field.name
        elif field.name == "neighbour_matrices":
            assert x.keys() == y.keys() and all(sp.csr_matrix(x[k] != y[k]).nnz == 0 for k in x), field.name
        else:
            assert x == y, field.name


def test_a_catalog_travels_in_pieces_and_comes_back_equal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(item_cache, "PIECE_ITEMS", 40)  # the index and id arrays of 250 items: 7 pieces each
    catalog = _catalog(250)
    pieces = pack_catalog(catalog)
    assert [kind for name, kind, _ in pieces if name == "index"] == ["dict"] * 7
    assert [kind for name, kind, _ in pieces if name == "item_ids"] == ["objects"] * 7
    _assert_same(catalog, unpack_catalog(pieces))
    assert catalog_digest(pieces) == catalog_digest(pack_catalog(_catalog(250)))  # same content, same digest
    assert catalog_digest(pieces) != catalog_digest(pack_catalog(_catalog(251)))


def _take_turn(lock: str, record: str, hold_seconds: float) -> None:
    with build_turn(Path(lock), lambda: False):
        start = time.monotonic()
        time.sleep(hold_seconds)
        with open(record, "a") as out:
            out.write(f"{start} {time.monotonic()}\n")


def test_the_workers_catalog_builds_take_turns_and_a_stopping_worker_stops_waiting(tmp_path: Path) -> None:
    lock, record = tmp_path / "catalog-build.lock", tmp_path / "turns.txt"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_take_turn, args=(str(lock), str(record), 0.3)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    turns = sorted(tuple(map(float, line.split())) for line in record.read_text().splitlines())
    assert len(turns) == 3
    for (_, end), (start, _) in zip(turns, turns[1:]):
        assert start >= end, f"two builds overlapped: {turns}"

    with open(lock, "a") as held:  # another worker's build in progress
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(BuildFailed, match="stopped while waiting"):
            with build_turn(lock, lambda: True):
                pytest.fail("the turn was taken while another worker held it")
    with build_turn(lock, lambda: False), build_turn(None, lambda: True):
        pass  # free again once released; no lock at all (one process) never waits
