"""Training rows: cut-offs -> entity rows and labels -> point-in-time features from Feast -> model inputs.

Features come only from `get_historical_features` at each cut-off, so a value recorded after
a cut-off cannot reach that cut-off's row; labels come only from events after the cut-off.
Candidate generation and assembly are the serving code (propensity.candidates, propensity.assembly).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pandas as pd

from propensity.assembly import USER_MODEL_FEATURES, pair_matrix, user_matrix
from propensity.candidates import generate_candidates
from propensity.catalog import Catalog
from propensity.settings import CandidateSettings, TrainingSettings
from propensity.user_state import USER_INPUTS, UserBatch, UserState

if TYPE_CHECKING:  # only the type: score-batch --users-only imports this module before Feast (training.batch_scoring)
    from feast import FeatureStore

HISTORY_DAYS = 90  # users with an event this long before a cut-off get a training row


@dataclass
class TrainingSet:
    """Model inputs and labels for one model, with the cut-off of every row."""

    features: np.ndarray
    labels: np.ndarray
    cutoffs: np.ndarray  # the cut-off of every row, naive UTC datetime64
    groups: np.ndarray  # user row id per row (ranking groups)


@dataclass
class CutoffData:
    users: TrainingSet
    pairs: TrainingSet
    n_buyers: int
    candidate_recall: float  # share of bought items that were among the candidates
    bought: int = 0  # items bought by the buyers (the recall's denominator: recall pools over chunks of cut-offs)
    bought_covered: int = 0  # of those, items among the buyer's candidates


def cutoff_times(as_of: datetime, first_event: datetime, settings: TrainingSettings) -> list[datetime]:
    """Weekly (by default) cut-offs ending one horizon before as-of, oldest first, each with some history."""
    latest = as_of - timedelta(days=settings.horizon_days)
    cutoffs = [latest - timedelta(days=settings.cutoff_step_days * i) for i in range(settings.n_cutoffs)]
    usable = sorted(c for c in cutoffs if c >= first_event + timedelta(days=7))
    if len(usable) < 2:
        raise ValueError(
            f"need at least two cut-offs with 7 days of history before them and {settings.horizon_days} days after; "
            f"the log spans {first_event:%Y-%m-%d} .. {as_of:%Y-%m-%d}, too short for these training settings"
        )
    return usable


def entity_rows(prepared_dir: Path, cutoffs: list[datetime], settings: TrainingSettings) -> pd.DataFrame:
    """One row per (user active in the 90 days before a cut-off, cut-off) with the items bought in the horizon."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    cut = pd.DataFrame({"event_timestamp": pd.to_datetime(cutoffs, utc=True)})
    con.register("cutoffs", cut)
    frame = con.execute(
        f"""
        WITH ev AS (SELECT user_id, item_id, event_type, event_time FROM read_parquet('{prepared_dir / 'events.parquet'}')),
        active AS (
            SELECT DISTINCT e.user_id, c.event_timestamp
            FROM cutoffs c JOIN ev e
              ON e.event_time < c.event_timestamp AND e.event_time >= c.event_timestamp - INTERVAL {HISTORY_DAYS} DAY
        ),
        bought AS (
            SELECT e.user_id, c.event_timestamp, list(DISTINCT e.item_id ORDER BY e.item_id) AS bought_items
            FROM cutoffs c JOIN ev e
              ON e.event_type = 'purchase' AND e.event_time >= c.event_timestamp
             AND e.event_time < c.event_timestamp + INTERVAL {settings.horizon_days} DAY
            GROUP BY ALL
        )
        SELECT a.user_id, a.event_timestamp, coalesce(b.bought_items, []) AS bought_items
        FROM active a LEFT JOIN bought b USING (user_id, event_timestamp)
        ORDER BY a.event_timestamp, a.user_id
        """
    ).df()
    con.close()
    frame["label"] = frame["bought_items"].map(len).gt(0).astype(np.int8)
    # Deterministic cap per cut-off: keeps training time bounded on very large logs.
    frame = frame.sample(frac=1.0, random_state=settings.seed).groupby("event_timestamp").head(settings.max_users_per_cutoff)
    return frame.sort_values(["event_timestamp", "user_id"]).reset_index(drop=True)


def historical_user_features(store: FeatureStore, rows: pd.DataFrame, service: str) -> pd.DataFrame:
    """Point-in-time user features for each entity row (same order as rows)."""
    entity = rows[["user_id", "event_timestamp"]].assign(row_id=np.arange(len(rows)))
    features = store.get_historical_features(entity_df=entity, features=store.get_feature_service(service)).to_df()
    return features.sort_values("row_id").reset_index(drop=True)


def historical_catalogs(store: FeatureStore, item_ids: list[str], cutoffs: list[datetime], service: str) -> dict[pd.Timestamp, Catalog]:
    """The item catalog as it was at each cut-off."""
    entity = pd.DataFrame(
        {
            "item_id": np.tile(np.asarray(item_ids, dtype=object), len(cutoffs)),
            "event_timestamp": np.repeat(pd.to_datetime(cutoffs, utc=True), len(item_ids)),
        }
    )
    frame = store.get_historical_features(entity_df=entity, features=store.get_feature_service(service)).to_df()
    return {pd.Timestamp(ts): Catalog.from_frame(group) for ts, group in frame.groupby("event_timestamp")}


def ranker_users(rows: pd.DataFrame, training: TrainingSettings) -> np.ndarray:
    """Which entity rows also give ranker rows: buyers, and a share of non-buyers (they only add negatives).

    At most ranker_max_users_per_cutoff per cut-off, buyers first, so that the ranker's row count (about
    200 candidates per user) stays bounded however many users a cut-off has. Deterministic for a seed.
    """
    rng = np.random.default_rng(training.seed)
    buyer = rows["label"].to_numpy().astype(bool)
    draw = np.zeros(len(rows))
    draw[~buyer] = rng.random(int((~buyer).sum()))  # one draw per non-buyer, in row order
    wanted = buyer | (draw <= training.ranker_non_buyer_share)
    # Within a cut-off: buyers before non-buyers, each in random order; keep the first N wanted rows.
    priority = np.random.default_rng(training.seed + 1).random(len(rows))
    order = pd.DataFrame({"cut": rows["event_timestamp"].to_numpy(), "non_buyer": ~buyer, "priority": priority, "wanted": wanted})
    order = order[order["wanted"]].sort_values(["cut", "non_buyer", "priority"], kind="stable")
    keep = order.groupby("cut", sort=False).head(training.ranker_max_users_per_cutoff).index
    chosen = np.zeros(len(rows), dtype=bool)
    chosen[keep] = True
    return chosen


def assemble(
    rows: pd.DataFrame,
    user_features: pd.DataFrame,
    catalogs: dict[pd.Timestamp, Catalog],
    candidate_settings: CandidateSettings,
    training: TrainingSettings,
    progress: Callable[[str], None] = print,
    retrieval_weights: Mapping[str, Mapping[str, float]] | None = None,
    for_ranker: np.ndarray | None = None,
    first_row: int = 0,
) -> CutoffData:
    """Model inputs for both models, built with the serving code path (candidates picked with retrieval_weights).

    `rows` may be one chunk (one cut-off) of the entity rows: `first_row` is its position in the whole, so row ids
    (ranking groups) are the whole's, and `for_ranker` is ranker_users of the whole, sliced to the chunk, so a chunked
    build picks the same ranker users as a whole one.
    """
    if for_ranker is None:
        for_ranker = ranker_users(rows, training)
    n = len(user_features)
    # Each row's cut-off as naive UTC datetime64 (TrainingSet.cutoffs): period masks compare millions of pair rows,
    # which as Timestamp objects took pandas seconds per comparison.
    row_cutoffs = pd.DatetimeIndex(pd.to_datetime(user_features["event_timestamp"], utc=True)) if n else pd.DatetimeIndex([], tz="UTC")
    user_cutoffs = row_cutoffs.tz_convert(None).to_numpy(dtype="datetime64[ns]")
    # The user model's rows: user_matrix (the bulk scorer's and the server's batch path) a cut-off at a time, as
    # one user_vector per row would give them (tests/test_user_batch.py), without a Python object per user row.
    user_x = np.empty((n, len(USER_MODEL_FEATURES)))
    covered = 0
    for cutoff, catalog in catalogs.items():
        at = np.flatnonzero(row_cutoffs == pd.Timestamp(cutoff))
        covered += len(at)
        if len(at):
            chunk = user_features.iloc[at]
            columns = {name: chunk[name].to_numpy() for name in USER_INPUTS if name in chunk}
            user_x[at] = user_matrix(UserBatch(chunk["user_id"].astype(str).tolist(), columns, catalog), pd.Timestamp(cutoff).timestamp())
    if covered != n:
        missing = sorted(set(row_cutoffs) - {pd.Timestamp(c) for c in catalogs})
        raise ValueError(f"no catalog for the cut-off(s) {', '.join(map(str, missing[:3]))} of {n - covered:,} user rows")
    # The ranker's rows: candidates and pair features per user, through the serving code (UserState, generate_candidates).
    ranked = np.flatnonzero(np.asarray(for_ranker, dtype=bool))
    records = user_features.iloc[ranked].to_dict("records")
    bought_lists, labels = rows["bought_items"].to_numpy(), rows["label"].to_numpy()
    pair_x, pair_y, pair_rows = [], [], []  # pair_rows: (entity row, candidate count) of each user's block
    bought_total = bought_covered = buyers = 0
    for done, (i, record) in enumerate(zip(ranked, records), start=1):
        cutoff = pd.Timestamp(record["event_timestamp"])
        catalog = catalogs[cutoff]
        as_of_ts = cutoff.timestamp()
        user = UserState.from_row(str(record["user_id"]), record, catalog)
        candidate_set = generate_candidates(user, catalog, candidate_settings, as_of_ts, retrieval_weights)
        candidates = candidate_set.item_idx
        if done % 2000 == 0:
            progress(f"  ranker rows: {done:,}/{len(ranked):,} users")
        if not len(candidates):
            continue
        bought = bought_lists[i]
        target = np.isin(candidates, catalog.lookup(bought)).astype(np.int8)
        if labels[i]:
            buyers += 1
            bought_total += len(bought)
            bought_covered += int(target.sum())
        pair_x.append(pair_matrix(user, catalog, candidates, as_of_ts, user_row=user_x[i], signals=candidate_set.signals).astype(np.float32))
        pair_y.append(target)
        pair_rows.append((i, len(candidates)))
    pair_row, pair_count = (np.asarray(column, dtype=np.int64) for column in zip(*pair_rows)) if pair_rows else (np.empty(0, np.int64),) * 2
    users = TrainingSet(user_x.astype(np.float32), np.asarray(labels), user_cutoffs, first_row + np.arange(n))
    pairs = TrainingSet(
        np.vstack(pair_x) if pair_x else np.empty((0, 0), dtype=np.float32),
        np.concatenate(pair_y) if pair_y else np.empty(0),
        np.repeat(user_cutoffs[pair_row], pair_count),
        np.repeat(first_row + pair_row, pair_count),
    )
    return CutoffData(users, pairs, buyers, bought_covered / bought_total if bought_total else float("nan"), bought_total, bought_covered)


def cutoff_slices(rows: pd.DataFrame) -> list[tuple[pd.Timestamp, int, int]]:
    """(cut-off, first row, end row) of each cut-off's entity rows, which entity_rows keeps contiguous (sorted by cut-off)."""
    stamps = pd.DatetimeIndex(pd.to_datetime(rows["event_timestamp"], utc=True))
    if not stamps.is_monotonic_increasing:
        raise ValueError("entity rows must be sorted by event_timestamp (entity_rows sorts them) to be built one cut-off at a time")
    starts = np.flatnonzero(np.r_[True, stamps[1:] != stamps[:-1]]) if len(stamps) else np.empty(0, dtype=int)
    ends = np.r_[starts[1:], len(stamps)]
    return [(stamps[s], int(s), int(e)) for s, e in zip(starts, ends)]


def cutoff_chunks(
    store: FeatureStore,
    rows: pd.DataFrame,
    catalogs: Mapping[pd.Timestamp, Catalog],
    user_service: str,
    candidate_settings: CandidateSettings,
    training: TrainingSettings,
    retrieval_weights: Mapping[str, Mapping[str, float]] | None,
    progress: Callable[[str], None] = print,
) -> Iterator[tuple[pd.Timestamp, CutoffData]]:
    """The model inputs one cut-off at a time: that cut-off's point-in-time user features from Feast, then `assemble`.

    The same code as the whole build (historical_user_features, assemble), on one cut-off's entity rows, with the
    catalogs the whole build reads (historical_catalogs over all cut-offs at once: a catalog's item order is the
    order of that read, and candidate ties and the retrieval fit's negative samples follow it). Nothing of a chunk is kept here once it is yielded: a caller that drops it before asking for the next holds one
    cut-off's rows at a time (training.dask_training writes each to Parquet).
    """
    for_ranker = ranker_users(rows, training)  # over the whole, as the whole build draws it
    slices = cutoff_slices(rows)
    for k, (cutoff, lo, hi) in enumerate(slices, start=1):
        progress(f"  cut-off {cutoff:%Y-%m-%d} ({k}/{len(slices)}): {hi - lo:,} user rows, point-in-time features and assembly")
        chunk = rows.iloc[lo:hi]
        user_features = historical_user_features(store, chunk, user_service)
        data = assemble(chunk, user_features, {cutoff: catalogs[cutoff]}, candidate_settings, training, progress, retrieval_weights, for_ranker[lo:hi], lo)
        del chunk, user_features
        yield cutoff, data
        del data  # before the next cut-off is built, not when it replaces this one

