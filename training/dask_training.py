"""Fit both models through lightgbm.dask on a Dask cluster, from training rows written as partitioned Parquet.

The partitioning rule: every partition holds whole query groups (one user at one cut-off, with all
of that user's candidate rows), so LightGBM's lambdarank finds each group on one worker. The
result is an ordinary LightGBM Booster (no Dask object survives the fit), saved and served like a
locally trained one. Early stopping is replayed after the fit: the validation metric is computed
per iteration on the cluster, partition by partition, and the booster's best_iteration set from it.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from propensity.settings import TrainingSettings
from training.boosters import base_params, group_sizes
from training.datasets import CutoffData, TrainingSet
from training.models import FittedModel, candidate_ranking, finish_model, period_masks
from training.periods import Periods

LABEL, GROUP = "__label", "__group"


@contextlib.contextmanager
def dask_client(training: TrainingSettings) -> Iterator[object]:
    """A client of training.dask_scheduler, or of a LocalCluster of 2 one-thread workers when it is empty."""
    from distributed import Client, LocalCluster

    if training.dask_scheduler:
        with Client(training.dask_scheduler) as client:
            yield client
        return
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def write_partitions(data: TrainingSet, mask: np.ndarray, features: tuple[str, ...], directory: Path, partition_rows: int, min_partitions: int = 2) -> int:
    """Write the masked rows as Parquet files part-NNNNN.parquet, cut only between groups; returns the partition count."""
    directory.mkdir(parents=True, exist_ok=True)
    index = np.flatnonzero(mask)
    index = index[np.argsort(data.groups[index], kind="stable")]  # rows of one group are consecutive
    groups = data.groups[index]
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]]) if len(index) else np.empty(0, dtype=int)
    n_parts = max(min(min_partitions, len(starts)), math.ceil(len(index) / max(partition_rows, 1)))
    # Cut at the group start nearest each even split point: no group spans two files.
    wanted = np.linspace(0, len(index), n_parts + 1)[1:-1]
    cuts = np.unique(starts[np.clip(np.searchsorted(starts, wanted), 0, len(starts) - 1)]) if len(starts) else np.empty(0, dtype=int)
    bounds = [0, *[int(c) for c in cuts if c > 0], len(index)]
    for part, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        rows = index[lo:hi]
        columns = {name: data.features[rows, j].astype(np.float64) for j, name in enumerate(features)}
        columns[LABEL] = data.labels[rows].astype(np.float64)
        columns[GROUP] = data.groups[rows].astype(np.int64)
        pq.write_table(pa.table(columns), directory / f"part-{part:05d}.parquet")
    return len(bounds) - 1


def _read(client, directory: Path, features: tuple[str, ...]):
    """Features, labels and groups of the Parquet rows, one partition per file, persisted on the workers.

    Persisting the whole frame first fixes its partitions: otherwise Dask's optimizer may fuse the small
    files of a one-column selection (labels) differently from the feature columns. And only workers
    holding data train (lightgbm.dask), so the data is placed, and spread, before the fit.
    """
    import dask.dataframe as dd
    from distributed import wait

    frame = client.persist(dd.read_parquet(str(directory), split_row_groups=False))
    wait(frame)
    client.rebalance(frame)
    return frame[list(features)], frame[LABEL], frame[GROUP]


def _group_sizes(groups) -> object:
    """Query-group sizes per partition as a Dask array chunked like the rows' partitions (lightgbm.dask's `group`)."""
    sizes = groups.map_partitions(lambda s: pd.Series(group_sizes(s.to_numpy()), dtype="int64"), meta=(None, "int64"))
    return sizes.to_dask_array(lengths=True)


def _iteration_scores(part: pd.DataFrame, booster: lgb.Booster, features: list[str], objective: str) -> pd.DataFrame:
    """Per boosting iteration, this partition's summed validation metric and its count (logloss per row, NDCG@10 per group)."""
    x, y = part[features].to_numpy(), part[LABEL].to_numpy()
    n_iter = booster.current_iteration()
    raw = np.zeros(len(part))
    total = np.zeros(n_iter)
    if objective == "lambdarank":
        groups = part[GROUP].to_numpy()
        starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]]) if len(part) else np.empty(0, dtype=int)
        sizes = np.diff(np.r_[starts, len(part)])
        for i in range(n_iter):
            raw += booster.predict(x, start_iteration=i, num_iteration=1, raw_score=True)
            total[i] = sum(_ndcg10(y[s : s + n], raw[s : s + n]) for s, n in zip(starts, sizes))
        count = len(starts)
    else:
        for i in range(n_iter):
            raw += booster.predict(x, start_iteration=i, num_iteration=1, raw_score=True)
            p = np.clip(1 / (1 + np.exp(-raw)), 1e-15, 1 - 1e-15)
            total[i] = -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum()
        count = len(part)
    return pd.DataFrame({"iteration": np.arange(1, n_iter + 1), "total": total, "count": count})


def _ndcg10(labels: np.ndarray, scores: np.ndarray) -> float:
    """LightGBM's ndcg@10 for one group (a group without a positive counts as 1)."""
    ideal = np.sort(labels)[::-1][:10]
    discount = 1 / np.log2(np.arange(2, 12))
    best = float(((2**ideal - 1) * discount[: len(ideal)]).sum())
    if best <= 0:
        return 1.0
    top = labels[np.argsort(-scores, kind="stable")][:10]
    return float(((2**top - 1) * discount[: len(top)]).sum()) / best


def best_iteration(client, booster: lgb.Booster, valid_dir: Path, features: tuple[str, ...], objective: str, rounds: int) -> tuple[int, list[float]]:
    """Replay early stopping: the validation metric per iteration, computed on the cluster; first best before `rounds` without gain."""
    import dask.dataframe as dd

    frame = dd.read_parquet(str(valid_dir), split_row_groups=False)
    shared = client.scatter(booster, broadcast=True)
    meta = pd.DataFrame({"iteration": pd.Series(dtype="int64"), "total": pd.Series(dtype="float64"), "count": pd.Series(dtype="int64")})
    per_part = frame.map_partitions(_iteration_scores, shared, list(features), objective, meta=meta).compute()
    summed = per_part.groupby("iteration")[["total", "count"]].sum()
    curve = (summed["total"] / summed["count"]).tolist()
    sign = -1.0 if objective == "lambdarank" else 1.0  # NDCG is maximised, logloss minimised
    best, best_value = 1, math.inf
    for i, value in enumerate(curve, start=1):
        if sign * value < best_value:
            best, best_value = i, sign * value
        elif i - best >= rounds:
            break
    return best, curve


def fit_dask_booster(
    client, params: dict, train_dir: Path, valid_dir: Path, features: tuple[str, ...], training: TrainingSettings
) -> tuple[lgb.Booster, list[float]]:
    """One lightgbm.dask fit on the Parquet training rows; returns a plain Booster with best_iteration set."""
    import lightgbm.dask as lgb_dask

    x, y, groups = _read(client, train_dir, features)
    params = {k: v for k, v in params.items() if k not in ("num_threads", "metric", "eval_at")}
    objective = params["objective"]
    if objective == "lambdarank":
        model = lgb_dask.DaskLGBMRanker(client=client, n_estimators=training.num_boost_round, **params)
        model.fit(x, y, group=_group_sizes(groups))
    else:
        model = lgb_dask.DaskLGBMClassifier(client=client, n_estimators=training.num_boost_round, **params)
        model.fit(x, y)
    booster = model.booster_
    best, curve = best_iteration(client, booster, valid_dir, features, objective, training.early_stopping_rounds)
    booster.best_iteration = best
    return booster, curve


def fit_model_dask(
    client,
    name: str,
    data: TrainingSet,
    features: tuple[str, ...],
    periods: Periods,
    training: TrainingSettings,
    directory: Path,
    objectives: tuple[str, ...] = ("binary",),
    progress: Callable[[str], None] = print,
) -> FittedModel:
    """training.models.fit_model on Dask: per objective a lightgbm.dask fit, the best on validation kept and calibrated."""
    train, valid, test = period_masks(name, data, periods)
    n_workers = max(len(client.scheduler_info()["workers"]), 1)
    train_dir, valid_dir = directory / name / "train", directory / name / "validation"
    started = time.perf_counter()
    n_train = write_partitions(data, train, features, train_dir, training.dask_partition_rows, n_workers)
    n_valid = write_partitions(data, valid, features, valid_dir, training.dask_partition_rows, n_workers)
    progress(f"  {name}: training rows as {n_train} + {n_valid} Parquet partitions ({time.perf_counter() - started:.1f}s), {n_workers} Dask workers")
    candidates: dict[str, tuple[lgb.Booster, dict, dict]] = {}
    for objective in objectives:
        params = base_params(training, objective)
        booster, _ = fit_dask_booster(client, params, train_dir, valid_dir, features, training)
        raw_valid = booster.predict(data.features[valid], num_iteration=booster.best_iteration)
        selection = candidate_ranking(raw_valid, data, valid) if len(objectives) > 1 else {}
        candidates[objective] = (booster, params, selection)
        if len(objectives) > 1:
            progress(f"  {name} [{objective}, dask]: validation NDCG@10 {selection.get('ndcg_at_10', float('nan')):.3f} within candidates ({booster.best_iteration} trees)")
    return finish_model(name, data, (train, valid, test), candidates, objectives, training, progress, engine="dask")


def fit_models_dask(
    training: TrainingSettings, data: CutoffData, periods: Periods, work_dir: Path, progress: Callable[[str], None] = print
) -> tuple[FittedModel, FittedModel]:
    """The user model and the ranker on the Dask cluster of training.dask_scheduler (its workers must see work_dir)."""
    from propensity.assembly import RANKER_FEATURES, USER_MODEL_FEATURES
    from training.models import RANKER_OBJECTIVES

    work_dir.mkdir(parents=True, exist_ok=True)
    rows = Path(tempfile.mkdtemp(prefix="dask-training-rows-", dir=work_dir))
    try:
        with dask_client(training) as client:
            progress(f"  training on Dask: scheduler {client.scheduler.address}")
            user = fit_model_dask(client, "user_propensity", data.users, USER_MODEL_FEATURES, periods, training, rows, ("binary",), progress)
            ranker = fit_model_dask(client, "item_ranker", data.pairs, RANKER_FEATURES, periods, training, rows, RANKER_OBJECTIVES, progress)
    finally:
        shutil.rmtree(rows, ignore_errors=True)
    return user, ranker
