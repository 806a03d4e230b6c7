"""`propensity score-batch`: score every active user (and their top-N items) at one timestamp from the OFFLINE store.

Features come from `get_historical_features` with entity rows at the given timestamp (point-in-time,
so a campaign can be scored "as of" any past moment), then the serving code path: UserState ->
candidates -> assembly -> ModelBundle (calibrated predictions). Users are processed in chunks;
each chunk is appended to one Parquet file (user_id, propensity, rank, item_id, item_score).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from propensity.assembly import pair_matrix, user_vector
from propensity.candidates import generate_candidates
from propensity.retrieval import stored_weights
from propensity.feature_store import check_service, open_store
from propensity.model_registry import RANKER_MODEL, USER_MODEL, load_version
from propensity.settings import Settings
from propensity.user_state import UserState
from training.commands import add_score_batch_arguments
from training.datasets import HISTORY_DAYS, historical_catalogs

SCHEMA = pa.schema([("user_id", pa.string()), ("propensity", pa.float64()), ("rank", pa.int32()), ("item_id", pa.string()), ("item_score", pa.float64())])


@dataclass(frozen=True)
class BatchSummary:
    path: Path
    users: int
    rows: int
    seconds: float


def active_users(prepared_dir: Path, at: datetime, days: int = HISTORY_DAYS) -> list[str]:
    """Users with an event in the `days` before `at` (the same definition as training rows)."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    at = pd.Timestamp(at).tz_convert("UTC").to_pydatetime()
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
    chunk_size: int = 5000,
    version: str | None = None,
    users: list[str] | None = None,
    progress: Callable[[str], None] = print,
) -> BatchSummary:
    """Score users (default: every active user) at `at`; write one Parquet file with top_n items per user."""
    started = time.perf_counter()
    at = pd.Timestamp(at).tz_convert("UTC").to_pydatetime() if pd.Timestamp(at).tzinfo else pd.Timestamp(at).tz_localize("UTC").to_pydatetime()
    bundle = load_version(settings.model_dir, version)
    store = open_store(settings.feature_repo, settings.feature_store_yaml)
    for role, model in (("user", USER_MODEL), ("item", RANKER_MODEL)):
        service = bundle.metadata["feature_services"][role]
        check_service(store, service["name"], service["fingerprint"], f"{bundle.version}/{model}")
    users = users if users is not None else active_users(settings.prepared_dir, at)
    item_ids = pd.read_parquet(settings.prepared_dir / "items.parquet", columns=["item_id"])["item_id"].astype(str).tolist()
    catalog = next(iter(historical_catalogs(store, item_ids, [at], bundle.item_feature_service).values()))
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
            features = features.set_index("user_id").reindex(chunk).reset_index()
            states = [UserState.from_row(u, r, catalog) for u, r in zip(chunk, features.to_dict("records"))]
            rows = np.vstack([user_vector(s, as_of_ts) for s in states])
            propensity = np.where([s.known for s in states], bundle.predict_users(rows), bundle.base_rate)
            # All candidates of the chunk in one ranker call (vectorised), then top-N per user.
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
    score_batch(settings, at, Path(args.out).resolve(), top_n=args.top_n, chunk_size=args.chunk_size, version=args.version)
    return 0
