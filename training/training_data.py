"""The training rows, built the local engine's way: cut-offs -> entity rows and labels -> point-in-time features -> model inputs.

plan_training is the part every engine shares (cut-offs, periods, entity rows); build_training_data then reads all
point-in-time features and assembles the whole set in memory (the local engine, `propensity evaluate`). The Dask
engine builds the same rows one cut-off at a time instead (training/streamed_training.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import pandas as pd
from feast import FeatureStore

from propensity.catalog import Catalog
from propensity.feature_store import open_store
from propensity.settings import Settings
from training.datasets import CutoffData, assemble, cutoff_times, entity_rows, historical_catalogs, historical_user_features
from training.periods import Periods
from training.prepare import PreparedData
from training.retrieval_fit import fit_retrieval_weights


@dataclass
class TrainingPlan:
    """What is decided before any feature is read: the store, the cut-offs and their periods, the entity rows (ids and labels)."""

    store: FeatureStore
    cutoffs: list[datetime]
    periods: Periods
    rows: pd.DataFrame
    item_ids: list[str]


@dataclass
class TrainingData:
    """Everything built before fitting: cut-offs and their periods, entity rows, point-in-time features, model inputs.

    On the Dask engine (training.streamed_training.train_on_dask) `data` holds the held-out period's rows only, and user_features and catalogs are
    empty: the rest went to the Parquet dataset one cut-off at a time.
    """

    store: FeatureStore
    cutoffs: list[datetime]
    periods: Periods
    rows: pd.DataFrame
    user_features: pd.DataFrame
    catalogs: dict[pd.Timestamp, Catalog]
    data: CutoffData
    retrieval: dict  # the fitted retrieval weights and what they were fitted on (training/retrieval_fit.py)


def build_training_data(
    settings: Settings,
    prepared: PreparedData,
    progress: Callable[[str], None] = print,
    split: Callable[[list[datetime]], Periods] | None = None,
) -> TrainingData:
    """Cut-offs -> entity rows and labels -> point-in-time features from Feast -> model inputs (serving code path).

    split divides the cut-offs into periods (default: the last one test, validation_cutoffs before it). It is
    decided here, not by the caller afterwards, because the retrieval weights are fitted on its training period.
    """
    started = time.perf_counter()
    plan = plan_training(settings, prepared, progress, split)
    store, cutoffs, periods, rows, item_ids = plan.store, plan.cutoffs, plan.periods, plan.rows, plan.item_ids
    user_features = historical_user_features(store, rows, settings.user_feature_service)
    catalogs = historical_catalogs(store, item_ids, cutoffs, settings.item_feature_service)
    progress(f"  point-in-time features joined ({time.perf_counter() - started:.1f}s)")
    retrieval = fit_retrieval_weights(rows, user_features, catalogs, periods.train, settings.training.seed, progress)
    data = assemble(rows, user_features, catalogs, settings.candidates, settings.training, progress, retrieval["weights"])
    progress(f"  ranker rows: {len(data.pairs.labels):,}; candidates cover {data.candidate_recall:.1%} of items bought")
    return TrainingData(store, cutoffs, periods, rows, user_features, catalogs, data, retrieval)


def plan_training(
    settings: Settings, prepared: PreparedData, progress: Callable[[str], None] = print, split: Callable[[list[datetime]], Periods] | None = None
) -> TrainingPlan:
    """The cut-offs, their periods and the entity rows with labels (the part of the build every engine shares)."""
    store = open_store(settings.feature_repo, settings.feature_store_yaml)
    events = pd.read_parquet(prepared.directory / "events.parquet", columns=["event_time"])
    cutoffs = cutoff_times(prepared.as_of, events["event_time"].min().to_pydatetime(), settings.training)
    periods = split(cutoffs) if split else Periods.split(cutoffs, settings.training.validation_cutoffs)
    progress(
        f"training: {len(cutoffs)} cut-offs {cutoffs[0]:%Y-%m-%d} .. {cutoffs[-1]:%Y-%m-%d}, horizon {settings.training.horizon_days} days "
        f"({len(periods.train)} train, {len(periods.validation)} validation, {len(periods.test)} test)"
    )
    rows = entity_rows(prepared.directory, cutoffs, settings.training)
    progress(f"  {len(rows):,} user rows, {rows['label'].mean():.1%} bought within the horizon")
    item_ids = pd.read_parquet(prepared.directory / "items.parquet", columns=["item_id"])["item_id"].astype(str).tolist()
    return TrainingPlan(store, cutoffs, periods, rows, item_ids)
