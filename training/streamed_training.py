"""The Dask engine's build and fit: the training rows go to a Parquet dataset one cut-off at a time, never whole in this process.

The same code as the local build (training/training_data.py) on one cut-off's entity rows at a time, with the same
item catalogs (one Feast read of every cut-off's) and retrieval weights fitted on the training period's buyers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import pandas as pd

from propensity.catalog import Catalog
from propensity.settings import Settings
from training.datasets import CutoffData, cutoff_chunks, historical_catalogs, historical_user_features
from training.prepare import PreparedData
from training.retrieval_fit import fit_retrieval_weights, training_buyers
from training.training_data import TrainingData, TrainingPlan, plan_training

if TYPE_CHECKING:  # importing training.dask_training imports Dask: only when the engine is asked for
    from training.dask_training import DaskFit


def plan_catalogs(settings: Settings, plan: TrainingPlan) -> dict[pd.Timestamp, Catalog]:
    """The item catalog at every cut-off, in one Feast read as the whole build reads them.

    One read, not one per cut-off: a catalog's item order is that read's row order, and the retrieval fit samples its
    negatives by catalog position and candidates that tie keep it, so per-cut-off reads gave other retrieval weights
    (up to 0.007 apart on the test shop) and so other candidates. The catalogs are the item table at each cut-off,
    not training rows: they do not grow with users.
    """
    return historical_catalogs(plan.store, plan.item_ids, plan.cutoffs, settings.item_feature_service)


def streamed_retrieval_weights(
    settings: Settings, plan: TrainingPlan, catalogs: Mapping[pd.Timestamp, Catalog], progress: Callable[[str], None] = print
) -> dict:
    """fit_retrieval_weights as the whole build fits them, from the training period's buyers only.

    It samples among exactly those rows (buyers at training cut-offs), in the same order, with the same catalogs, so
    the weights are the whole build's (tests/test_dask_training.py compares them).
    """
    buyers = plan.rows.iloc[training_buyers(plan.rows, plan.periods.train)].reset_index(drop=True)
    user_features = historical_user_features(plan.store, buyers, settings.user_feature_service)
    return fit_retrieval_weights(buyers, user_features, dict(catalogs), plan.periods.train, settings.training.seed, progress)


def training_chunks(
    settings: Settings, plan: TrainingPlan, catalogs: Mapping[pd.Timestamp, Catalog], weights: Mapping, progress: Callable[[str], None] = print
) -> Iterator[tuple[pd.Timestamp, CutoffData]]:
    """The model inputs one cut-off at a time (training.datasets.cutoff_chunks with this run's service and settings)."""
    return cutoff_chunks(plan.store, plan.rows, catalogs, settings.user_feature_service, settings.candidates, settings.training, weights, progress)


def train_on_dask(
    settings: Settings, prepared: PreparedData, progress: Callable[[str], None] = print
) -> tuple[TrainingData, DaskFit]:
    """The Dask engine's build and fit: the rows go to a Parquet dataset one cut-off at a time, never whole in this process.

    Returns the TrainingData of the held-out period (what the gate and the report read) and the fit: both models,
    and each model's base rate and the candidates' recall over all rows (from the per-cut-off counts).
    """
    from training.dask_training import fit_streamed  # Dask is imported only when asked for

    started = time.perf_counter()
    plan = plan_training(settings, prepared, progress)
    catalogs = plan_catalogs(settings, plan)
    retrieval = streamed_retrieval_weights(settings, plan, catalogs, progress)
    progress(f"  retrieval weights fitted ({time.perf_counter() - started:.1f}s); building the rows one cut-off at a time")
    chunks = training_chunks(settings, plan, catalogs, retrieval["weights"], progress)
    fit = fit_streamed(settings.training, chunks, plan.periods, settings.work_dir, progress)
    progress(f"  ranker rows: {fit.ranker_rows:,}; candidates cover {fit.candidate_recall:.1%} of items bought")
    built = TrainingData(plan.store, plan.cutoffs, plan.periods, plan.rows, pd.DataFrame(), catalogs, fit.held_out, retrieval)
    return built, fit
