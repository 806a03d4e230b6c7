"""Tests for the sampled served-feature log: sampling, Parquet layout, flushing and failure handling."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from server.served_log import ServedFeatureLogger, sampled

FEATURES = ("user_recency_days", "item_purchases_7d")


def _files(directory: Path) -> list[Path]:
    return sorted(directory.glob("served-*.parquet"))


def _wait_for_files(directory: Path, timeout: float = 5.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while not _files(directory) and time.monotonic() < deadline:
        time.sleep(0.02)
    return _files(directory)


def _log_one(logger: ServedFeatureLogger, request_id: str = "r1", n_items: int = 3) -> bool:
    features = np.arange(n_items * 2, dtype=np.float64).reshape(n_items, 2)
    return logger.maybe_log(request_id, "u1", "v1", FEATURES, features, [f"i{k}" for k in range(n_items)], np.linspace(0.1, 0.9, n_items))


def test_sampling_is_deterministic_and_close_to_the_rate() -> None:
    ids = [f"req-{k}" for k in range(10_000)]
    first = [sampled(i, 0.1) for i in ids]
    assert first == [sampled(i, 0.1) for i in ids]
    assert 0.085 < sum(first) / len(ids) < 0.115
    assert not any(sampled(i, 0.0) for i in ids[:100])
    assert all(sampled(i, 1.0) for i in ids[:100])
    # A lower rate samples a subset of a higher one: raising the rate only adds requests.
    assert all(sampled(i, 0.2) for i, s in zip(ids, first) if s)


def test_logger_samples_by_request_id(tmp_path: Path) -> None:
    logger = ServedFeatureLogger(tmp_path, 0.5, flush_seconds=60)
    try:
        decisions = [_log_one(logger, f"req-{k}") for k in range(200)]
        assert decisions == [sampled(f"req-{k}", 0.5) for k in range(200)]
    finally:
        logger.close()
    assert pq.read_table(_files(tmp_path)).num_rows == 3 * sum(decisions)


def test_parquet_rows_and_columns(tmp_path: Path) -> None:
    logger = ServedFeatureLogger(tmp_path, 1.0, flush_seconds=60)
    features = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    assert logger.maybe_log("req-a", "u1", "v7", FEATURES, features, ["a", "b", "c"], [0.2, 0.9, 0.5])
    features[:] = -1  # the caller may reuse its buffer once the call returned
    logger.flush()
    (path,) = _files(tmp_path)
    assert path.name == f"served-{os.getpid()}-000000.parquet"
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    table = pq.read_table(path)
    assert table.column_names == ["ts", "request_id", "user_id", "model_version", "item_id", "score", "rank", *FEATURES]
    rows = table.to_pylist()
    assert [(r["item_id"], r["score"], r["rank"]) for r in rows] == [("a", 0.2, 3), ("b", 0.9, 1), ("c", 0.5, 2)]
    assert [(r["user_recency_days"], r["item_purchases_7d"]) for r in rows] == [(1.0, 10.0), (2.0, 20.0), (3.0, 30.0)]
    assert {(r["request_id"], r["user_id"], r["model_version"]) for r in rows} == {("req-a", "u1", "v7")}
    assert abs(rows[0]["ts"].timestamp() - time.time()) < 60
    assert logger.rows_written == 3
    logger.close()


def test_requests_with_different_features_share_a_file(tmp_path: Path) -> None:
    logger = ServedFeatureLogger(tmp_path, 1.0, flush_seconds=60)
    logger.maybe_log("r1", "u1", "v1", ["f1"], np.array([[1.0]]), ["a"], [0.5])
    logger.maybe_log("r2", "u1", "v2", ["f1", "f2"], np.array([[2.0, 3.0]]), ["b"], [0.6])
    logger.close()
    rows = pq.read_table(_files(tmp_path)).to_pylist()
    assert [(r["model_version"], r["f1"], r["f2"]) for r in rows] == [("v1", 1.0, None), ("v2", 2.0, 3.0)]


def test_background_flush_by_rows_and_by_time(tmp_path: Path) -> None:
    by_rows = ServedFeatureLogger(tmp_path / "rows", 1.0, flush_rows=5, flush_seconds=60)
    by_time = ServedFeatureLogger(tmp_path / "time", 1.0, flush_rows=1000, flush_seconds=0.1)
    try:
        _log_one(by_rows, "r1")
        _log_one(by_time, "r1")
        time.sleep(0.3)
        assert _files(tmp_path / "rows") == []  # 3 rows < 5: waits for more
        assert len(_wait_for_files(tmp_path / "time")) == 1
        _log_one(by_rows, "r2")
        assert len(_wait_for_files(tmp_path / "rows")) == 1
        assert pq.read_table(_files(tmp_path / "rows")).num_rows == 6
    finally:
        by_rows.close()
        by_time.close()


def test_close_flushes_and_stops_logging(tmp_path: Path) -> None:
    logger = ServedFeatureLogger(tmp_path, 1.0, flush_seconds=60)
    _log_one(logger, "r1")
    assert _files(tmp_path) == []
    logger.close()
    assert pq.read_table(_files(tmp_path)).num_rows == 3
    assert not _log_one(logger, "r2")
    logger.close()  # twice is fine
    assert len(_files(tmp_path)) == 1


def test_sequence_continues_after_existing_files(tmp_path: Path) -> None:
    for _ in range(2):
        logger = ServedFeatureLogger(tmp_path, 1.0, flush_seconds=60)
        _log_one(logger)
        logger.close()
    assert [p.name for p in _files(tmp_path)] == [f"served-{os.getpid()}-00000{k}.parquet" for k in (0, 1)]


def test_unwritable_directory_never_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    calls: list[None] = []
    logger = ServedFeatureLogger(blocker / "served", 1.0, flush_seconds=60, on_error=lambda: calls.append(None))
    assert logger.errors == 1  # the directory could not be created
    assert _log_one(logger, "r1")  # buffered; the write fails later
    logger.flush()
    logger.close()
    assert logger.errors >= 2
    assert len(calls) == logger.errors
    assert logger.rows_written == 0


def test_bad_input_is_counted_not_raised(tmp_path: Path) -> None:
    logger = ServedFeatureLogger(tmp_path, 1.0, flush_seconds=60)
    assert not logger.maybe_log("r1", "u1", "v1", FEATURES, np.zeros((2, 3)), ["a", "b"], [0.1, 0.2])
    assert not logger.maybe_log("r2", "u1", "v1", ["score"], np.zeros((1, 1)), ["a"], [0.1])
    assert logger.errors == 2
    logger.close()
    assert _files(tmp_path) == []


class _Untouchable:
    """Fails when converted to an array: proves that unsampled requests copy nothing."""

    def __array__(self, *args, **kwargs):
        raise AssertionError("features were read for an unsampled request")


def test_unsampled_request_does_not_touch_its_arrays(tmp_path: Path) -> None:
    logger = ServedFeatureLogger(tmp_path, 0.01, flush_seconds=60)
    unsampled = next(f"req-{k}" for k in range(1000) if not sampled(f"req-{k}", 0.01))
    assert not logger.maybe_log(unsampled, "u1", "v1", FEATURES, _Untouchable(), ["a"], _Untouchable())  # type: ignore[arg-type]
    assert logger.errors == 0
    logger.close()


def test_buffer_is_bounded(tmp_path: Path) -> None:
    logger = ServedFeatureLogger(tmp_path, 1.0, flush_rows=1000, flush_seconds=60, max_buffer_rows=5)
    assert _log_one(logger, "r1")
    assert not _log_one(logger, "r2")  # 6 rows would exceed 5
    assert logger.dropped_rows == 3
    logger.close()
    assert pq.read_table(_files(tmp_path)).num_rows == 3


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_extreme_rates(tmp_path: Path, rate: float) -> None:
    logger = ServedFeatureLogger(tmp_path, rate, flush_seconds=60)
    assert _log_one(logger) is (rate == 1.0)
    logger.close()
