"""Fit both models through lightgbm.dask on a Dask cluster, from training rows written as a partitioned Parquet dataset.

The driver appends the rows one cut-off at a time (TrainingRows.append) to
`<dir>/<model>/cutoff=YYYY-MM-DD/part-NNNNN.parquet` and drops each cut-off before building the next; the workers
read the files with dask.dataframe.read_parquet. Everything the fit needs from the whole set comes from the files
or from per-cut-off summaries (row and positive counts): the periods are lists of cut-off directories, validation
and test scores are computed on the cluster, and only the held-out period (the gate's and the report's rows) is
read back to the driver.

The partitioning rule: every file holds whole query groups (one user at one cut-off, with all of that user's
candidate rows), so LightGBM's lambdarank finds each group on one worker. The result is an ordinary LightGBM
Booster (no Dask object survives the fit), saved and served like a locally trained one. Early stopping is replayed
after the fit: the validation metric is computed per iteration on the cluster, partition by partition, and the
booster's best_iteration set from it.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from propensity.assembly import RANKER_FEATURES, USER_MODEL_FEATURES
from propensity.settings import TrainingSettings
from training.boosters import base_params, group_sizes
from training.datasets import CutoffData, TrainingSet
from training.models import RANKER_OBJECTIVES, FittedModel, candidate_ranking, finish_scored, require_both_classes
from training.periods import Periods, naive_utc

LABEL, GROUP = "__label", "__group"
USER, RANKER = "user_propensity", "item_ranker"
MODEL_FEATURES = {USER: USER_MODEL_FEATURES, RANKER: RANKER_FEATURES}


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


def write_partitions(
    data: TrainingSet, mask: np.ndarray, features: tuple[str, ...], directory: Path, partition_rows: int, min_partitions: int = 2, seed: int = 0
) -> int:
    """Write the masked rows as Parquet files part-NNNNN.parquet of whole groups; returns the file count.

    The groups are dealt to the files in a seeded random order, not in group-id order: a file, and so a worker,
    then holds a sample of all the groups rather than a contiguous run of them, and LightGBM's per-worker bin
    boundaries and bagging see rows like the whole set's. Within a file a group's rows stay consecutive, in
    group order.
    """
    directory.mkdir(parents=True, exist_ok=True)
    index = np.flatnonzero(mask)
    index = index[np.argsort(data.groups[index], kind="stable")]  # rows of one group are consecutive
    groups = data.groups[index]
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]]) if len(index) else np.empty(0, dtype=int)
    sizes = np.diff(np.r_[starts, len(index)])
    n_parts = max(min(min_partitions, len(starts)), math.ceil(len(index) / max(partition_rows, 1)))
    # Deal the groups, in a seeded shuffled order, each to the file with the fewest rows so far: files of near-equal
    # size (at most one group apart) and no group in two files.
    part_of = np.empty(len(starts), dtype=np.int64)
    filled = np.zeros(n_parts, dtype=np.int64)
    for g in np.random.default_rng(seed).permutation(len(starts)):
        part_of[g] = k = int(np.argmin(filled))
        filled[k] += sizes[g]
    row_part = np.repeat(part_of, sizes)
    for part in range(n_parts):
        rows = index[row_part == part]
        columns = {name: data.features[rows, j].astype(np.float64) for j, name in enumerate(features)}
        columns[LABEL] = data.labels[rows].astype(np.float64)
        columns[GROUP] = data.groups[rows].astype(np.int64)
        pq.write_table(pa.table(columns), directory / f"part-{part:05d}.parquet")
    return n_parts


def _utc(cutoff: object) -> pd.Timestamp:
    stamp = pd.Timestamp(cutoff)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


@dataclass(frozen=True)
class ChunkSummary:
    """What the fit needs to know of one cut-off without reading its rows: counts per model, candidate coverage."""

    rows: dict[str, int]
    positives: dict[str, int]
    files: dict[str, list[Path]]
    n_buyers: int
    bought: int
    bought_covered: int


@dataclass
class TrainingRows:
    """The training rows of both models as a Parquet dataset partitioned by cut-off date, appended one cut-off at a time.

    `<root>/<model>/cutoff=YYYY-MM-DD/part-NNNNN.parquet`: each file holds whole query groups, at most
    `partition_rows` rows, and a cut-off has at least `min_files` files (one per worker, so every worker holds
    validation rows). `largest_chunk` is the most rows (both models) one append received: what the driver held at once.
    """

    root: Path
    partition_rows: int
    min_files: int = 2
    seed: int = 0  # deals each cut-off's groups to its files (write_partitions)
    summaries: dict[pd.Timestamp, ChunkSummary] = field(default_factory=dict)
    largest_chunk: int = 0

    def directory(self, model: str, cutoff: object) -> Path:
        return self.root / model / f"cutoff={_utc(cutoff):%Y-%m-%d}"

    def append(self, cutoff: object, data: CutoffData, progress: Callable[[str], None] = print) -> ChunkSummary:
        """Write one cut-off's rows of both models (refusing rows of any other cut-off) and keep its summary."""
        key = _utc(cutoff)
        started = time.perf_counter()
        rows, positives, files = {}, {}, {}
        for model, part in ((USER, data.users), (RANKER, data.pairs)):
            directory = self.directory(model, key)
            if key in self.summaries or directory.exists():
                raise ValueError(f"{model}: cut-off {key:%Y-%m-%d} is already in {self.root} (two cut-offs on one date, or appended twice)")
            stamps = naive_utc(part.cutoffs)
            if len(stamps) and not (stamps == naive_utc(np.asarray([key]))).all():
                others = sorted({str(s)[:10] for s in stamps} - {f"{key:%Y-%m-%d}"})
                raise ValueError(f"{model}: the chunk for cut-off {key:%Y-%m-%d} also holds rows of {others}: a chunk is one cut-off")
            n = len(part.labels)
            if n:
                write_partitions(part, np.ones(n, dtype=bool), MODEL_FEATURES[model], directory, self.partition_rows, self.min_files, self.seed)
            rows[model], positives[model] = n, int(np.asarray(part.labels).sum())
            files[model] = sorted(directory.glob("part-*.parquet")) if n else []
        summary = ChunkSummary(rows, positives, files, data.n_buyers, data.bought, data.bought_covered)
        self.summaries[key] = summary
        self.largest_chunk = max(self.largest_chunk, sum(rows.values()))
        progress(f"  cut-off {key:%Y-%m-%d}: {rows[USER]:,} user rows and {rows[RANKER]:,} ranker rows written as "
                 f"{len(files[USER])} + {len(files[RANKER])} Parquet files ({time.perf_counter() - started:.1f}s)")
        return summary

    def _of(self, cutoffs: Iterable[object]) -> list[ChunkSummary]:
        keys = [_utc(c) for c in cutoffs]
        missing = [f"{k:%Y-%m-%d}" for k in keys if k not in self.summaries]
        if missing:
            raise ValueError(f"cut-offs {missing} have no training rows in {self.root}")
        return [self.summaries[k] for k in keys]

    def files(self, model: str, cutoffs: Iterable[object]) -> list[str]:
        return [str(path) for summary in self._of(cutoffs) for path in summary.files[model]]

    def counts(self, model: str, cutoffs: Iterable[object]) -> tuple[int, int]:
        """(rows, positives) of a model over some cut-offs."""
        chosen = self._of(cutoffs)
        return sum(s.rows[model] for s in chosen), sum(s.positives[model] for s in chosen)

    def base_rate(self, model: str) -> float:
        rows, positives = self.counts(model, self.summaries)
        return positives / rows if rows else float("nan")

    def candidate_recall(self) -> float:
        bought = sum(s.bought for s in self.summaries.values())
        return sum(s.bought_covered for s in self.summaries.values()) / bought if bought else float("nan")

    def read(self, cutoffs: Iterable[object]) -> CutoffData:
        """Some cut-offs' rows of both models back in memory (the held-out period, for the promotion gate and the report).

        One file at a time into arrays of the final size and type: the driver's peak is these rows plus one file.
        """
        stamps_of = [_utc(c) for c in cutoffs]
        chosen = self._of(stamps_of)
        parts = {}
        for model, names in MODEL_FEATURES.items():
            n = sum(s.rows[model] for s in chosen)
            features, labels = np.empty((n, len(names)), dtype=np.float32), np.empty(n, dtype=np.int8)
            stamps, groups = np.empty(n, dtype="datetime64[ns]"), np.empty(n, dtype=np.int64)
            at = 0
            for cutoff, summary in zip(stamps_of, chosen):
                for path in summary.files[model]:
                    table = pq.read_table(path, columns=[*names, LABEL, GROUP])
                    end = at + table.num_rows
                    for j, name in enumerate(names):
                        features[at:end, j] = table[name].to_numpy()
                    labels[at:end], groups[at:end] = table[LABEL].to_numpy(), table[GROUP].to_numpy()
                    stamps[at:end] = cutoff.tz_convert(None).to_datetime64()
                    at = end
                    del table
            parts[model] = TrainingSet(features, labels, stamps, groups)
        bought = sum(s.bought for s in chosen)
        covered = sum(s.bought_covered for s in chosen)
        return CutoffData(parts[USER], parts[RANKER], sum(s.n_buyers for s in chosen), covered / bought if bought else float("nan"), bought, covered)


def _read_file(path: str, columns: list[str]) -> pd.DataFrame:
    return pq.read_table(path, columns=columns).to_pandas()


def _group_sizes_of(part: pd.DataFrame) -> pd.Series:
    return pd.Series(group_sizes(part[GROUP].to_numpy()), dtype="int64")


def _place(client, files_by_cutoff: list[list[str]], features: tuple[str, ...]):
    """Features, labels and query-group sizes of the Parquet rows, one partition per file, each file loaded on a chosen worker.

    File k of every cut-off goes to worker k (mod the worker count), so each worker holds a random share of every
    cut-off (write_partitions deals the groups to the files at random), never a run of early or late cut-offs.
    lightgbm.dask trains each worker on the partitions it holds and finds half of the features' bin boundaries on
    each worker's rows, so a skewed placement changes what the model learns. Placing the files explicitly replaces
    Dask's own placement and rebalancing, which follow memory, not cut-offs.
    """
    import dask.dataframe as dd
    from distributed import wait

    workers = sorted(client.scheduler_info()["workers"])
    columns = [*features, LABEL, GROUP]
    placed = [(path, [workers[k % len(workers)]]) for files in files_by_cutoff for k, path in enumerate(files)]
    parts = [client.submit(_read_file, path, columns, workers=on, allow_other_workers=False, pure=False) for path, on in placed]
    # The group sizes are computed next to their rows, as a Series per partition (a Dask array built from the frame
    # with to_dask_array(lengths=True) failed on these futures with a "cycle detected" error).
    sizes = [client.submit(_group_sizes_of, part, workers=on, allow_other_workers=False, pure=False) for part, (_, on) in zip(parts, placed)]
    wait(parts + sizes)
    meta = pd.DataFrame({name: pd.Series(dtype="float64") for name in columns}).astype({GROUP: "int64"})
    frame = dd.from_delayed(parts, meta=meta, verify_meta=False)
    return frame[list(features)], frame[LABEL], dd.from_delayed(sizes, meta=pd.Series(dtype="int64"), verify_meta=False)


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


def best_iteration(client, booster: lgb.Booster, valid_files: list[str], features: tuple[str, ...], objective: str, rounds: int) -> tuple[int, list[float]]:
    """Replay early stopping: the validation metric per iteration, computed on the cluster; first best before `rounds` without gain."""
    import dask.dataframe as dd

    frame = dd.read_parquet(valid_files, columns=[*features, LABEL, GROUP], split_row_groups=False)
    # hash=False: a fresh key per scatter. With content hashing, scattering the same booster twice (one objective's
    # replay after another's, or validation then test) reuses one key, and releasing the first future loses the data
    # under the second one's tasks ("lost dependencies").
    shared = client.scatter(booster, broadcast=True, hash=False)
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


def dask_booster(client, params: dict, train_files: list[list[str]], features: tuple[str, ...], rounds: int) -> lgb.Booster:
    """A lightgbm.dask fit of exactly `rounds` trees on the Parquet training rows (files per cut-off), as a plain Booster.

    No early stopping: fit_dask_booster replays it; bench/dask_quality.py and the tests compare the engines at a fixed
    tree count through this.
    """
    import lightgbm.dask as lgb_dask

    x, y, sizes = _place(client, train_files, features)
    params = {k: v for k, v in params.items() if k not in ("num_threads", "metric", "eval_at")}
    if params["objective"] == "lambdarank":
        model = lgb_dask.DaskLGBMRanker(client=client, n_estimators=rounds, **params)
        model.fit(x, y, group=sizes)
    else:
        model = lgb_dask.DaskLGBMClassifier(client=client, n_estimators=rounds, **params)
        model.fit(x, y)
    return model.booster_


def fit_dask_booster(
    client, params: dict, train_files: list[list[str]], valid_files: list[str], features: tuple[str, ...], training: TrainingSettings
) -> tuple[lgb.Booster, list[float]]:
    """One lightgbm.dask fit on the Parquet training rows (files per cut-off); returns a plain Booster with best_iteration set."""
    booster = dask_booster(client, params, train_files, features, training.num_boost_round)
    best, curve = best_iteration(client, booster, valid_files, features, params["objective"], training.early_stopping_rounds)
    booster.best_iteration = best
    return booster, curve


def _partition_scores(part: pd.DataFrame, boosters: dict[str, lgb.Booster], features: list[str]) -> pd.DataFrame:
    """Labels, groups and each booster's score (at its best iteration, as FittedModel.raw) of one partition."""
    x = part[features].to_numpy()
    scores = {o: b.predict(x, num_iteration=b.best_iteration) if len(part) else np.empty(0) for o, b in boosters.items()}
    return pd.DataFrame({LABEL: part[LABEL].to_numpy(), GROUP: part[GROUP].to_numpy(), **scores})


def period_scores(client, files: list[str], features: tuple[str, ...], boosters: dict[str, lgb.Booster]) -> pd.DataFrame:
    """Per row of the files: label, group and every booster's score, computed on the cluster (no model inputs reach the driver)."""
    import dask.dataframe as dd

    meta = pd.DataFrame({LABEL: pd.Series(dtype="float64"), GROUP: pd.Series(dtype="int64"), **{o: pd.Series(dtype="float64") for o in boosters}})
    if not files:
        return meta
    frame = dd.read_parquet(files, columns=[*features, LABEL, GROUP], split_row_groups=False)
    shared = client.scatter([boosters], broadcast=True, hash=False)[0]  # one future for the dict (a bare dict scatters per value); hash=False as in best_iteration
    return frame.map_partitions(_partition_scores, shared, list(features), meta=meta).compute().reset_index(drop=True)


def fit_model_dask(
    client,
    name: str,
    rows: TrainingRows,
    periods: Periods,
    training: TrainingSettings,
    objectives: tuple[str, ...] = ("binary",),
    progress: Callable[[str], None] = print,
) -> FittedModel:
    """training.models.fit_model on Dask: per objective a lightgbm.dask fit, the best on validation kept and calibrated."""
    features = MODEL_FEATURES[name]
    for part, cutoffs in (("training", periods.train), ("validation", periods.validation)):
        require_both_classes(name, part, *rows.counts(name, cutoffs))
    train_files, valid_files, test_files = (rows.files(name, c) for c in (periods.train, periods.validation, periods.test))
    train_by_cutoff = [rows.files(name, [c]) for c in periods.train]
    n_workers = max(len(client.scheduler_info()["workers"]), 1)
    progress(f"  {name}: {rows.counts(name, periods.train)[0]:,} training rows in {len(train_files)} Parquet files over {len(periods.train)} cut-offs, "
             f"{rows.counts(name, periods.validation)[0]:,} validation rows in {len(valid_files)}; {n_workers} Dask workers")
    # No max_rows_per_tree here: it bounds one machine's fit, and this engine exists for rows beyond one machine.
    boosters, params = {}, {objective: base_params(training, objective) for objective in objectives}
    for objective in objectives:
        boosters[objective], _ = fit_dask_booster(client, params[objective], train_by_cutoff, valid_files, features, training)
    valid = period_scores(client, valid_files, features, boosters)
    test = period_scores(client, test_files, features, boosters)
    candidates: dict[str, tuple[lgb.Booster, dict, dict]] = {}
    scored = TrainingSet(np.empty((len(valid), 0)), valid[LABEL].to_numpy(), np.empty(len(valid)), valid[GROUP].to_numpy())
    for objective, booster in boosters.items():
        selection = candidate_ranking(valid[objective].to_numpy(), scored, np.ones(len(valid), dtype=bool)) if len(objectives) > 1 else {}
        candidates[objective] = (booster, params[objective], selection)
        if len(objectives) > 1:
            progress(f"  {name} [{objective}, dask]: validation NDCG@10 {selection.get('ndcg_at_10', float('nan')):.3f} within candidates ({booster.best_iteration} trees)")
    objective_of = {id(b): o for o, b in boosters.items()}

    def scores_of(frame: pd.DataFrame) -> Callable[[lgb.Booster], np.ndarray]:
        return lambda booster: frame[objective_of[id(booster)]].to_numpy()

    return finish_scored(
        name, rows.counts(name, periods.train)[0], (valid[LABEL].to_numpy(), scores_of(valid)), (test[LABEL].to_numpy(), scores_of(test)),
        candidates, objectives, training, progress, engine="dask",
    )


@dataclass
class DaskFit:
    """Both models, and what the registry entry, the report and the promotion gate need of the rows without holding them all."""

    user: FittedModel
    ranker: FittedModel
    held_out: CutoffData  # the rows of the held-out period only (test, or validation without a test period)
    base_rates: dict[str, float]
    candidate_recall: float
    ranker_rows: int
    largest_chunk: int  # most rows the driver held at once while writing the dataset


def fit_dataset(client, rows: TrainingRows, periods: Periods, training: TrainingSettings, progress: Callable[[str], None] = print) -> DaskFit:
    """Both models fitted from the dataset; the held-out period read back for the gate and the report."""
    user = fit_model_dask(client, USER, rows, periods, training, ("binary",), progress)
    ranker = fit_model_dask(client, RANKER, rows, periods, training, RANKER_OBJECTIVES, progress)
    held_out = rows.read(periods.test or periods.validation)
    return DaskFit(
        user, ranker, held_out, {m: rows.base_rate(m) for m in MODEL_FEATURES}, rows.candidate_recall(),
        rows.counts(RANKER, rows.summaries)[0], rows.largest_chunk,
    )


def fit_streamed(
    training: TrainingSettings,
    chunks: Iterable[tuple[pd.Timestamp, CutoffData]],
    periods: Periods,
    work_dir: Path,
    progress: Callable[[str], None] = print,
) -> DaskFit:
    """Write each cut-off's rows to a Parquet dataset under work_dir as it arrives (dropping it), then fit on the cluster.

    The dataset lives under work_dir (the workers of training.dask_scheduler must see it) and is removed afterwards.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="dask-training-rows-", dir=work_dir))
    try:
        with dask_client(training) as client:
            progress(f"  training on Dask: scheduler {client.scheduler.address}")
            rows = TrainingRows(root, training.dask_partition_rows, max(len(client.scheduler_info()["workers"]), 1), training.seed)
            for cutoff, data in chunks:
                rows.append(cutoff, data, progress)
                del data  # the chunk is on disk: drop it before the next one is built
            progress(f"  training rows: {len(rows.summaries)} cut-offs in {root}, at most {rows.largest_chunk:,} rows in memory at once")
            return fit_dataset(client, rows, periods, training, progress)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def in_memory_chunks(data: CutoffData) -> Iterator[tuple[pd.Timestamp, CutoffData]]:
    """An in-memory CutoffData as per-cut-off chunks (for callers that built the whole set anyway: `propensity evaluate`)."""
    user_cut, pair_cut = naive_utc(data.users.cutoffs), naive_utc(data.pairs.cutoffs)

    def subset(part: TrainingSet, mask: np.ndarray) -> TrainingSet:
        return TrainingSet(part.features[mask], part.labels[mask], part.cutoffs[mask], part.groups[mask])

    for cutoff in np.unique(user_cut):
        u, p = user_cut == cutoff, pair_cut == cutoff
        yield _utc(cutoff), CutoffData(subset(data.users, u), subset(data.pairs, p), 0, float("nan"))


def fit_models_dask(
    training: TrainingSettings, data: CutoffData, periods: Periods, work_dir: Path, progress: Callable[[str], None] = print
) -> tuple[FittedModel, FittedModel]:
    """The user model and the ranker on the Dask cluster of training.dask_scheduler, from rows already in memory."""
    fit = fit_streamed(training, in_memory_chunks(data), periods, work_dir, progress)
    return fit.user, fit.ranker
