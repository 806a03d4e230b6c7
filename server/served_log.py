"""A sampled log of served features and scores, written as Parquet, for training/serving skew checks."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)
FIXED_COLUMNS = ("ts", "request_id", "user_id", "model_version", "item_id", "score", "rank")
# A shopper forgotten this recently has every buffered row dropped at flush. Longer than any request takes from its
# feature read to its sample (deadlines are seconds), so a request that read the old features just before the
# erasure and was sampled just after it is never written. A returning shopper's first samples are lost: harmless.
RECENTLY_FORGOTTEN_SECONDS = 30.0


class ErasureFence(Protocol):
    """What the logger needs of propensity.erasure.WriteFence: the erasure lock, and the tombstones added since."""

    def holding(self) -> contextlib.AbstractContextManager[None]: ...

    def new_hashes(self) -> dict: ...

    def matching(self, hashes: dict | set, user_ids: Sequence[str]) -> list[str]: ...


def sampled(request_id: str, rate: float) -> bool:
    """Whether `request_id` is logged at `rate`: a stable hash, so every process and rerun agrees."""
    if rate <= 0.0:
        return False
    if rate >= 1.0:
        return True
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * 2**64


@dataclass(frozen=True)
class _Batch:
    """One sampled request, copied so the caller may reuse its arrays."""

    ts: float
    request_id: str
    user_id: str
    model_version: str
    feature_names: tuple[str, ...]
    features: np.ndarray
    item_ids: tuple[str, ...]
    scores: np.ndarray

    def table(self) -> pa.Table:
        n = len(self.item_ids)
        # Rank 1 is the highest score; ties keep the caller's order.
        order = np.argsort(-self.scores, kind="stable")
        rank = np.empty(n, dtype=np.int32)
        rank[order] = np.arange(1, n + 1, dtype=np.int32)
        columns = {
            "ts": pa.array(np.full(n, int(self.ts * 1e6), dtype=np.int64), pa.timestamp("us", tz="UTC")),
            "request_id": pa.array([self.request_id] * n, pa.string()),
            "user_id": pa.array([self.user_id] * n, pa.string()),
            "model_version": pa.array([self.model_version] * n, pa.string()),
            "item_id": pa.array(self.item_ids, pa.string()),
            "score": pa.array(self.scores),
            "rank": pa.array(rank),
        }
        for j, name in enumerate(self.feature_names):
            columns[name] = pa.array(self.features[:, j])
        return pa.table(columns)


class ServedFeatureLogger:
    """Buffers sampled requests and writes them as `served-<pid>-<seq>.parquet` files from a background thread.

    A file is written when `flush_rows` rows are buffered or `flush_seconds` have passed, and on
    `flush()`/`close()`. Nothing here raises into the caller: failures are logged and counted (`errors`,
    plus `on_error()` when given). Requests whose feature lists differ (e.g. two model versions) share a
    file; columns a request lacks are null. At most `max_buffer_rows` wait in memory; beyond that new
    samples are dropped and counted in `dropped_rows`.
    """

    def __init__(
        self,
        directory: str | Path,
        sample_rate: float,
        flush_rows: int = 1000,
        flush_seconds: float = 5.0,
        *,
        max_buffer_rows: int | None = None,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.sample_rate = sample_rate
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.max_buffer_rows = max_buffer_rows if max_buffer_rows is not None else 20 * flush_rows
        self.errors = 0
        self.dropped_rows = 0
        self.rows_written = 0
        self.files_written = 0
        self._on_error = on_error
        self._buffer: list[_Batch] = []
        self._buffered_rows = 0
        self._lock = threading.Lock()  # guards the buffer and counters
        self._write_lock = threading.Lock()  # one writer at a time keeps file sequence numbers unique
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._seq: int | None = None
        self._fence: ErasureFence | None = None
        self._recently_forgotten: dict[str, float] = {}  # tombstone hash -> when this logger first saw it
        self.forgotten_rows = 0  # rows dropped at flush because their shopper was forgotten meanwhile
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            self._failed("cannot create served-feature log directory %s", self.directory)
        self._thread = threading.Thread(target=self._run, name="served-feature-log", daemon=True)
        self._thread.start()

    def maybe_log(
        self,
        request_id: str,
        user_id: str,
        model_version: str,
        feature_names: Sequence[str],
        features: np.ndarray,
        item_ids: Sequence[str],
        scores: Sequence[float] | np.ndarray,
    ) -> bool:
        """Buffer one row per item when the request is sampled; True when it was. Unsampled calls only hash the id."""
        try:
            if self._closed or not sampled(request_id, self.sample_rate):
                return False
            batch = _Batch(
                time.time(), request_id, user_id, model_version, tuple(feature_names),
                np.array(features, dtype=np.float64, copy=True), tuple(item_ids), np.array(scores, dtype=np.float64, copy=True),
            )
            _check(batch)
            with self._lock:
                if self._buffered_rows + len(batch.item_ids) > self.max_buffer_rows:
                    self.dropped_rows += len(batch.item_ids)
                    return False
                self._buffer.append(batch)
                self._buffered_rows += len(batch.item_ids)
                if self._buffered_rows >= self.flush_rows:
                    self._wake.notify()
            return True
        except Exception:
            self._failed("served-feature log: request %s not logged", request_id)
            return False

    def forget(self, user_ids: Sequence[str]) -> int:
        """Drop these users' buffered rows (erasure); returns how many. When it returns, no write that could still
        name them is in flight, so the files already written are all there is to scrub (propensity.erasure)."""
        users = set(user_ids)
        with self._write_lock, self._lock:
            kept = [batch for batch in self._buffer if batch.user_id not in users]
            dropped = self._buffered_rows - sum(len(batch.item_ids) for batch in kept)
            self._buffer, self._buffered_rows = kept, self._buffered_rows - dropped
        return dropped

    def attach_fence(self, fence: ErasureFence) -> None:
        """Check every flush against the tombstones, under the erasure lock (docs/privacy.md, served-feature log).

        Any process's erasure then reaches this buffer too: a flush either completes before the erasure starts (which
        then scrubs the file) or starts after it ended and drops the shopper's rows. With several workers, each does."""
        self._fence = fence

    def flush(self) -> None:
        """Write everything buffered now, in the caller's thread."""
        held = self._fence.holding() if self._fence is not None else contextlib.nullcontext()
        try:
            with held, self._write_lock:  # the buffer is taken under the erasure lock: nothing sampled before a check escapes it
                with self._lock:
                    batches, self._buffer, self._buffered_rows = self._buffer, [], 0
                if batches and self._fence is not None:
                    batches = self._drop_forgotten(batches)
                if batches:
                    self._write(batches)
        except Exception:  # the erasure lock cannot be taken: the buffer (if taken) is not written unchecked
            self._failed("served-feature log: erasure lock unavailable in %s; buffered rows dropped", self.directory)

    def _drop_forgotten(self, batches: list[_Batch]) -> list[_Batch]:
        assert self._fence is not None
        try:
            now = time.time()
            for user_hash in self._fence.new_hashes():
                self._recently_forgotten[user_hash] = now
            self._recently_forgotten = {h: t for h, t in self._recently_forgotten.items() if now - t <= RECENTLY_FORGOTTEN_SECONDS}
            if not self._recently_forgotten:
                return batches
            gone = set(self._fence.matching(self._recently_forgotten, [batch.user_id for batch in batches]))
        except Exception:
            # Cannot tell who was forgotten (unreadable tombstones): writing could bring a shopper back, so nothing is.
            self._failed("served-feature log: tombstones unreadable; %d buffered rows dropped", sum(len(b.item_ids) for b in batches))
            return []
        kept = [batch for batch in batches if batch.user_id not in gone]
        with self._lock:
            self.forgotten_rows += sum(len(batch.item_ids) for batch in batches) - sum(len(batch.item_ids) for batch in kept)
        return kept

    def close(self, timeout: float = 10.0) -> None:
        """Stop the background thread and write what is left; later calls to maybe_log do nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)
        self.flush()

    def _run(self) -> None:
        while True:
            with self._lock:
                deadline = time.monotonic() + self.flush_seconds
                while not self._closed and self._buffered_rows < self.flush_rows:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wake.wait(remaining)
                if self._closed:
                    return  # close() writes the rest
            self.flush()

    def _write(self, batches: list[_Batch]) -> None:
        """Write one file; the caller holds _write_lock (one writer at a time keeps sequence numbers unique)."""
        tmp: Path | None = None
        try:
            table = pa.concat_tables([b.table() for b in batches], promote_options="permissive")
            final = self._next_path()
            tmp = final.with_name(f".{final.name}.tmp")
            pq.write_table(table, tmp)
            os.replace(tmp, final)  # readers never see a half-written file
            with self._lock:
                self.rows_written += table.num_rows
                self.files_written += 1
        except Exception:
            self._failed("served-feature log: %d rows not written to %s", sum(len(b.item_ids) for b in batches), self.directory)
            if tmp is not None:
                try:
                    tmp.unlink(missing_ok=True)
                except OSError:
                    pass  # the directory itself is the problem; already reported

    def _next_path(self) -> Path:
        pid = os.getpid()
        if self._seq is None:  # a reused pid must not overwrite an earlier run's files
            taken = [int(p.stem.rsplit("-", 1)[1]) for p in self.directory.glob(f"served-{pid}-*.parquet")]
            self._seq = max(taken, default=-1) + 1
        path = self.directory / f"served-{pid}-{self._seq:06d}.parquet"
        self._seq += 1
        return path

    def _failed(self, message: str, *args: object) -> None:
        with self._lock:
            self.errors += 1
        log.warning(message, *args, exc_info=True)
        if self._on_error is not None:
            try:
                self._on_error()
            except Exception:
                log.exception("served-feature log error callback failed")


def _check(batch: _Batch) -> None:
    n_items, n_features = len(batch.item_ids), len(batch.feature_names)
    if batch.features.shape != (n_items, n_features) or batch.scores.shape != (n_items,):
        raise ValueError(
            f"features {batch.features.shape} and scores {batch.scores.shape} do not match "
            f"{n_items} items x {n_features} features"
        )
    clash = set(batch.feature_names) & set(FIXED_COLUMNS)
    if clash:
        raise ValueError(f"feature names {sorted(clash)} clash with the log's own columns")
