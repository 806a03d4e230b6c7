"""`propensity score-batch`: score users (and their top-N items) at one timestamp from the OFFLINE store.

Both paths assemble the user model's input with the serving code (propensity.user_state.UserBatch ->
propensity.assembly.user_matrix), a whole chunk of users at a time:
- with items (default): features from Feast's `get_historical_features` with entity rows at the given
  timestamp (point-in-time, so a campaign can be scored "as of" any past moment), then the serving path
  per user: candidates -> pair assembly -> ModelBundle (calibrated predictions), top-N items per user.
  One Parquet file (user_id, propensity, rank, item_id, item_score).
- users only (`--users-only`): the purchase propensity at bulk speed. The same point-in-time rule runs
  in DuckDB over the tables behind the feature views (training.offline_user_features) and streams Arrow
  record batches; each is converted, assembled and predicted as a whole and written as it arrives
  (user_id, propensity; each user once, in no particular order), so memory stays bounded however many users there are.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from queue import Empty, Full, Queue
from typing import TypeVar

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from propensity.assembly import pair_matrix, user_matrix
from propensity.candidates import generate_candidates
from propensity.catalog import Catalog
from propensity.erasure import WriteFence, record_output
from propensity.retrieval import stored_weights
from propensity.model_registry import RANKER_MODEL, USER_MODEL, ModelBundle, load_version
from propensity.settings import Settings
from propensity.user_state import USER_INPUTS, USER_MODEL_INPUTS, UserBatch

# Feast is imported where it is used (propensity.feature_store, training.offline_user_features, training.datasets),
# not here: `score-batch` first makes that import cheaper (training.lean_startup, called by training.commands).

SCHEMA = pa.schema([("user_id", pa.string()), ("propensity", pa.float64()), ("rank", pa.int32()), ("item_id", pa.string()), ("item_score", pa.float64())])
USERS_SCHEMA = pa.schema([("user_id", pa.string()), ("propensity", pa.float64())])
T = TypeVar("T")
USERS_CHUNK = 100_000  # users per record batch on the users-only path
ITEMS_CHUNK = 5_000  # users per offline-store read and ranker call with items


@dataclass(frozen=True)
class BatchSummary:
    path: Path
    users: int
    rows: int
    seconds: float


def active_users(prepared_dir: Path, at: datetime, days: int | None = None) -> list[str]:
    """Users with an event in the `days` (default: training.datasets.HISTORY_DAYS) before `at` (the same definition as training rows)."""
    if days is None:
        from training.datasets import HISTORY_DAYS as days
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    at = _utc(at)
    users = con.execute(
        f"SELECT DISTINCT user_id FROM read_parquet('{prepared_dir / 'events.parquet'}') WHERE event_time < ? AND event_time >= ? ORDER BY user_id",
        [at, at - timedelta(days=days)],
    ).fetchall()
    con.close()
    return [str(u) for (u,) in users]


def score_batch(
    settings: Settings,
    at: datetime,
    out: Path,
    top_n: int = 10,
    chunk_size: int = ITEMS_CHUNK,
    version: str | None = None,
    users: list[str] | None = None,
    progress: Callable[[str], None] = print,
) -> BatchSummary:
    """Score users (default: every active user) at `at`; write one Parquet file with top_n items per user."""
    from propensity.feature_store import open_store
    from training.datasets import historical_catalogs

    started = time.perf_counter()
    at = _utc(at)
    bundle = load_version(settings.model_dir, version)
    store = open_store(settings.feature_repo, settings.feature_store_yaml)
    _check_services(store, bundle, (("user", USER_MODEL), ("item", RANKER_MODEL)))
    users = users if users is not None else active_users(settings.prepared_dir, at)
    catalog = next(iter(historical_catalogs(store, _item_ids(settings), [at], bundle.item_feature_service).values()))
    progress(f"score-batch: {len(users):,} users at {at.isoformat()} with model {bundle.version}, {catalog.size:,} items")
    out.parent.mkdir(parents=True, exist_ok=True)
    as_of_ts = at.timestamp()
    weights = stored_weights(bundle.metadata)
    written = 0
    with pq.ParquetWriter(out, SCHEMA) as writer:
        for start in range(0, len(users), chunk_size):
            chunk = users[start : start + chunk_size]
            entity = pd.DataFrame({"user_id": chunk, "event_timestamp": pd.Timestamp(at)})
            features = store.get_historical_features(entity_df=entity, features=store.get_feature_service(bundle.user_feature_service)).to_df()
            features = features.set_index("user_id").reindex(chunk)
            batch = UserBatch(chunk, {name: features[name].tolist() for name in USER_INPUTS if name in features}, catalog)
            rows = user_matrix(batch, as_of_ts)
            propensity = np.where(batch.known, bundle.predict_users(rows), bundle.base_rate)
            # All candidates of the chunk in one ranker call (vectorised), then top-N per user.
            states = [batch.user(i) for i in range(len(batch))]
            generated = [generate_candidates(s, catalog, settings.candidates, as_of_ts, weights) for s in states]
            candidate_sets = [g.item_idx for g in generated]
            sizes = np.array([len(c) for c in candidate_sets])
            matrices = [pair_matrix(s, catalog, g.item_idx, as_of_ts, user_row=r, signals=g.signals) for s, g, r in zip(states, generated, rows) if len(g.item_idx)]
            scores = bundle.predict_items(np.vstack(matrices)) if matrices else np.empty(0)
            table = _top_n(chunk, propensity, candidate_sets, sizes, scores, catalog.item_ids, top_n)
            writer.write_table(table)
            written += table.num_rows
            done = min(start + chunk_size, len(users))
            progress(f"  scored {done:,}/{len(users):,} users ({done / max(time.perf_counter() - started, 1e-9):,.0f} users/s)")
    seconds = time.perf_counter() - started
    progress(f"score-batch: wrote {written:,} rows for {len(users):,} users to {out} in {seconds:.1f}s")
    return BatchSummary(out, len(users), written, seconds)


def score_users_batch(
    settings: Settings,
    at: datetime,
    out: Path,
    chunk_size: int = USERS_CHUNK,
    version: str | None = None,
    users: list[str] | None = None,
    memory_limit: str = "2GB",
    progress: Callable[[str], None] = print,
) -> BatchSummary:
    """Purchase propensity of users (default: every active user) at `at`, streamed from the offline tables to Parquet.

    Equal to score_batch's propensity column (same users, same features by Feast's point-in-time rule, same assembly).
    """
    from training import offline_user_features as offline
    from training.datasets import HISTORY_DAYS

    started = time.perf_counter()
    at = _utc(at)
    threads = os.cpu_count() or 1
    con = offline.connect(memory_limit, threads, settings.work_dir / "tmp" / "duckdb")
    try:
        # DuckDB finds the users (its own threads, no GIL: 0.6-0.8 s on the 20M-event bench shop) while the model, the
        # registry's facts and the catalog load here.
        with ThreadPoolExecutor(1) as pool:
            counted = pool.submit(offline.set_users, con, users, settings.prepared_dir / "events.parquet", at, HISTORY_DAYS)
            bundle = load_version(settings.model_dir, version, num_threads=threads)  # a batch job may use every core
            if bundle.has_compiled_cache((USER_MODEL,)):  # the compiled trees training cached (verified against LightGBM within 1e-9): ~5x faster
                bundle.compile((USER_MODEL,))  # this path predicts with the user model only
            tables = _user_tables(settings, bundle)
            # The user model needs only which item ids are in the catalog (unknown recent items are dropped), not item features.
            catalog = Catalog.from_frame(pd.DataFrame({"item_id": _item_ids(settings)}))
            n_users = counted.result()
        out.parent.mkdir(parents=True, exist_ok=True)
        progress(f"score-batch --users-only: {n_users:,} users at {at.isoformat()} with model {bundle.version} "
                 f"({bundle.user_feature_service}: {', '.join(t.name for t in tables)})")
        as_of_ts = at.timestamp()
        done = 0
        # Unordered, the join streams: DuckDB produces the next record batch (in its own threads) while this one is
        # scored and written.
        streamed = offline.user_feature_batches(con, tables, at, chunk_size, ordered=False)
        with pq.ParquetWriter(out, USERS_SCHEMA) as writer, _prefetched(streamed) as batches:
            for record_batch in batches:
                writer.write_table(_propensities(record_batch, catalog, bundle, as_of_ts))
                done += record_batch.num_rows
                progress(f"  scored {done:,}/{n_users:,} users ({done / max(time.perf_counter() - started, 1e-9):,.0f} users/s)")
    finally:
        con.close()
    seconds = time.perf_counter() - started
    progress(f"score-batch --users-only: wrote {done:,} users to {out} in {seconds:.1f}s ({done / max(seconds, 1e-9):,.0f} users/s)")
    return BatchSummary(out, done, done, seconds)


def _user_tables(settings: Settings, bundle: ModelBundle) -> list:
    """The offline tables of the user model's features, after checking the model's feature service against the
    registry: recalled by the registry file's content when an earlier run read the same registry (no Feast import,
    training.registry_memo), else read through Feast and recorded for the next run."""
    from training import offline_user_features as offline
    from training import registry_memo

    service = bundle.metadata["feature_services"]["user"]
    memo = settings.work_dir / "cache" / "registry"
    registry = registry_memo.registry_file(settings.feature_repo, settings.feature_store_yaml)
    key = registry_memo.record_key(registry, settings.feature_repo, service["name"], USER_MODEL_INPUTS) if registry else None
    recalled = registry_memo.recall(memo, key) if key else None
    if recalled is not None and recalled[1] == service["fingerprint"]:
        return recalled[0]
    # Through Feast (a changed fingerprint too: check_service then refuses the model with its full message). The
    # registry only: the tables are read with this path's own DuckDB join, not through Feast's offline store.
    from propensity.feature_store import open_store

    store = open_store(settings.feature_repo, settings.feature_store_yaml, check_offline_store=False)
    _check_services(store, bundle, (("user", USER_MODEL),))
    tables = offline.service_tables(store, service["name"], only=USER_MODEL_INPUTS)  # what the user model reads
    if key is not None:  # the check above found the registry's fingerprint equal to the model's
        registry_memo.remember(memo, key, tables, service["fingerprint"])
    return tables


def _propensities(record_batch: pa.RecordBatch, catalog: Catalog, bundle: ModelBundle, as_of_ts: float) -> pa.Table:
    """One record batch of user feature rows -> (user_id, propensity), with no per-user Python loop."""
    from training import offline_user_features as offline

    user_ids = record_batch.column(offline.USER_KEY)
    columns = {name: record_batch.column(name) for name in record_batch.schema.names}
    batch = UserBatch(user_ids, columns, catalog)
    propensity = np.where(batch.known, bundle.predict_users(user_matrix(batch, as_of_ts)), bundle.base_rate)
    return pa.table({"user_id": user_ids, "propensity": propensity}, schema=USERS_SCHEMA)


@contextlib.contextmanager
def _prefetched(items: Iterator[T], depth: int = 1) -> Generator[Iterator[T]]:
    """items, each produced in a background thread while the caller works on the one before (at most depth + 2 alive).

    Leaving the block early (an error while scoring) stops the producer before the block's exit returns, so
    whatever the items come from (a DuckDB connection) can be closed safely afterwards.
    """
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        queue.put(item, timeout=0.1)
                        break
                    except Full:
                        continue
                if stop.is_set():
                    return
            queue.put(end)
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
            queue.put(_Failed(error))

    def consume() -> Iterator[T]:
        while (item := queue.get()) is not end:
            if isinstance(item, _Failed):
                raise item.error
            yield item

    thread = threading.Thread(target=produce, name="record-batches", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting for room, then let it see `stop`
            try:
                queue.get(timeout=0.1)
            except Empty:
                pass
        thread.join()


@dataclass(frozen=True)
class _Failed:
    error: BaseException


def _check_services(store, bundle: ModelBundle, roles: tuple[tuple[str, str], ...]) -> None:
    from propensity.feature_store import check_service

    for role, model in roles:
        service = bundle.metadata["feature_services"][role]
        check_service(store, service["name"], service["fingerprint"], f"{bundle.version}/{model}")


def _item_ids(settings: Settings) -> list[str]:
    return pd.read_parquet(settings.prepared_dir / "items.parquet", columns=["item_id"])["item_id"].astype(str).tolist()


def _utc(at: datetime) -> datetime:
    stamp = pd.Timestamp(at)
    return (stamp.tz_convert("UTC") if stamp.tzinfo else stamp.tz_localize("UTC")).to_pydatetime()


def _top_n(users: list[str], propensity: np.ndarray, candidates: list[np.ndarray], sizes: np.ndarray, scores: np.ndarray, item_ids: np.ndarray, n: int) -> pa.Table:
    out_user, out_p, out_rank, out_item, out_score = [], [], [], [], []
    offset = 0
    for user, p, idx, size in zip(users, propensity, candidates, sizes):
        s = scores[offset : offset + size]
        offset += size
        top = np.argsort(-s, kind="stable")[:n]
        if not len(top):  # no candidate: keep the user's propensity, no item
            out_user.append(user), out_p.append(float(p)), out_rank.append(0), out_item.append(None), out_score.append(None)
            continue
        out_user.extend([user] * len(top))
        out_p.extend([float(p)] * len(top))
        out_rank.extend(range(1, len(top) + 1))
        out_item.extend(item_ids[idx[top]].tolist())
        out_score.extend(s[top].tolist())
    return pa.table({"user_id": out_user, "propensity": out_p, "rank": out_rank, "item_id": out_item, "item_score": out_score}, schema=SCHEMA)


def cmd_score_batch(args: argparse.Namespace, settings: Settings) -> int:
    from training.prepare import load_prepared

    at = datetime.fromisoformat(args.at) if args.at else load_prepared(settings.prepared_dir).as_of
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    out = Path(args.out).resolve()
    record_output(settings, out)  # before writing: `propensity forget` must find it even if this run is cut short
    fence = WriteFence.begin(settings)  # a shopper forgotten while this runs is scrubbed from the output (docs/privacy.md)
    if args.users_only:
        score_users_batch(settings, at, out, chunk_size=args.chunk_size or USERS_CHUNK, version=args.version)
    else:
        score_batch(settings, at, out, top_n=args.top_n, chunk_size=args.chunk_size or ITEMS_CHUNK, version=args.version)
    fence.settle_files([out])
    return 0
