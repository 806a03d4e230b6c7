"""Training through lightgbm.dask on a real 2-worker LocalCluster: same quality as the local fit, same registry, same serving."""

from __future__ import annotations

import re
import shutil
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from bench.dask_quality import fixed
from propensity.assembly import RANKER_FEATURES
from propensity.model_registry import RANKER_MODEL, USER_MODEL, current_version, load_version
from propensity.settings import Settings
from training.dask_training import GROUP, LABEL, RANKER, USER, TrainingRows, write_partitions
from training.datasets import TrainingSet
from training.periods import naive_utc
from training.prepare import load_prepared
from training.streamed_training import plan_catalogs, streamed_retrieval_weights, training_chunks
from training.train import train
from training.training_data import build_training_data, plan_training

from .conftest import Pipeline

distributed = pytest.importorskip("distributed")

# Issue 14 asks for 0.01, but on this shop (518 validation users) the local engine misses 0.01 against itself: the same
# rows fitted locally with LightGBM seeds 1-7 and 42 instead of 13 gave a user-model validation AUC of 0.830-0.851
# (seed 13: 0.851) and a lambdarank ranker AUC of 0.874-0.901 (seed 13: 0.883; the ranker's AUC pools scores across
# users, which lambdarank does not order, and rises with the tree count while its NDCG@10 stays flat, so it follows
# where early stopping lands, 7 to 53 trees). A 2-worker fit is one more such draw (bins and bagging per worker), so the
# tolerances are that spread. Fixing the tree count does not close it: at 60 trees, without bagging and feature
# sampling, 2-worker fits still differ from the local fit by up to 0.021 (user model) and 0.017 (ranker) over 5 seeds,
# because each worker finds the bin boundaries of its features from its own rows. docs/dask_training.md has the figures.
USER_AUC_TOLERANCE = 0.03
RANKER_AUC_TOLERANCE = 0.035
RANKER_NDCG_TOLERANCE = 0.05  # validation NDCG@10 within candidates, what the objective is chosen on (seeds: 0.437-0.478)
# Where 0.01 is a property of the engine: one worker, no bagging and no feature sampling (the row order of the Parquet files
# then changes nothing), fixed tree count. The Dask path then fits the local fit's model: equal AUC to 4 decimals
# on this shop, so any difference comes from the rows, features, labels or query groups the Dask path hands LightGBM.
# (Only while a model's training rows stay below LightGBM's bin_construct_sample_cnt, 200,000: above it the bins come
# from a sample of rows taken by position, and the files' row order differs. This shop has about 70,000 ranker rows.)
SAME_FIT_TREES = 60
SAME_FIT_PARAMS = {"bagging_fraction": 1.0, "bagging_freq": 0, "feature_fraction": 1.0}
SAME_FIT_TOLERANCE = 0.001


def test_partitions_hold_whole_groups_and_every_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), rng.integers(1, 30, size=40))  # uneven group sizes
    data = TrainingSet(rng.random((len(groups), 2)), rng.integers(0, 2, len(groups)), np.zeros(len(groups)), groups)
    mask = rng.random(len(groups)) < 0.8
    n = write_partitions(data, mask, ("a", "b"), tmp_path, partition_rows=100, min_partitions=2)
    parts = [pq.read_table(path).to_pandas() for path in sorted(tmp_path.glob("part-*.parquet"))]
    assert n == len(parts) >= int(mask.sum()) // 100
    assert sum(len(p) for p in parts) == int(mask.sum())
    seen = [set(p[GROUP]) for p in parts]
    assert all(a.isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1 :]), "a group spans two partitions"
    # The groups are dealt at random (so every worker gets a sample of all of them), into files of near-equal size.
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 29, sizes
    assert any(max(a) > min(b) for a, b in zip(seen, seen[1:])), "the files hold runs of consecutive groups"
    again = tmp_path / "again"
    write_partitions(data, mask, ("a", "b"), again, partition_rows=100, min_partitions=2)
    assert [set(pq.read_table(path).to_pandas()[GROUP]) for path in sorted(again.glob("part-*.parquet"))] == seen, "not deterministic"
    for part in parts:  # rows of a group are consecutive (lightgbm's query groups)
        g = part[GROUP].to_numpy()
        assert len(np.unique(g)) == int((np.r_[True, g[1:] != g[:-1]]).sum())


@pytest.mark.slow
def test_dask_trained_models_match_local_ones_and_serve(pipeline: Pipeline, tmp_path: Path) -> None:
    work = tmp_path / "var"
    shutil.copytree(pipeline.work_dir / "prepared", work / "prepared")
    local_root = pipeline.work_dir / "models"
    local = load_version(local_root, current_version(local_root))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        settings = Settings(
            data_dir=pipeline.data_dir,
            work_dir=work,
            feature_repo=pipeline.feature_repo,
            # lightgbm.dask fits every round (early stopping is replayed afterwards): 200 bounds the test's time and is
            # past every early stop of the local fit (at most ~85 trees + 30 rounds), so its reference is unchanged.
            training={"engine": "dask", "dask_scheduler": cluster.scheduler_address, "num_boost_round": 200},
            server={"scoring_backend": "lightgbm"},
        )
        lines: list[str] = []
        result = train(settings, load_prepared(settings.prepared_dir), progress=lines.append)
        log = "\n".join(lines)
        assert f"scheduler {cluster.scheduler_address}" in log and "2 Dask workers" in log, log
    assert not list(work.glob("dask-training-rows-*")), "the Parquet training rows are removed after the fit"
    # The rows went to Parquet one cut-off at a time: one write per cut-off, and the most rows the driver held at once
    # is the largest cut-off's (user + ranker rows), far below the whole set.
    written = [(int(u.replace(",", "")), int(r.replace(",", ""))) for u, r in re.findall(r"cut-off \S+: ([\d,]+) user rows and ([\d,]+) ranker rows written", log)]
    assert len(written) == len(load_version(settings.model_dir, result.version).metadata["cutoffs"]), log
    largest = int(re.search(r"at most ([\d,]+) rows in memory at once", log).group(1).replace(",", ""))
    assert largest == max(u + r for u, r in written) < 0.5 * sum(u + r for u, r in written), (largest, written)

    # The Dask version is an ordinary registry version: plain LightGBM text models, loaded by the serving code.
    served = load_version(settings.model_dir, result.version)
    assert (settings.model_dir / "versions" / result.version / f"{USER_MODEL}.txt").read_text().startswith("tree\n")
    assert served.metadata["models"][USER_MODEL]["params"]["engine"] == "dask"
    assert "engine" not in local.metadata["models"][USER_MODEL]["params"]

    # Both bundles scored through ModelBundle on the same validation rows.
    built = build_training_data(settings, load_prepared(settings.prepared_dir), progress=lambda _: None)
    _, valid, _ = built.periods.masks(built.data.users)
    users = built.data.users
    dask_auc = roc_auc_score(users.labels[valid], served.predict_users(users.features[valid]))
    local_auc = roc_auc_score(users.labels[valid], local.predict_users(users.features[valid]))
    assert dask_auc == pytest.approx(result.metrics[USER_MODEL]["auc"], abs=1e-9)  # served = evaluated
    assert local_auc == pytest.approx(local.metadata["models"][USER_MODEL]["metrics"]["auc"], abs=1e-9)  # same rows as the local fit
    assert abs(dask_auc - local_auc) <= USER_AUC_TOLERANCE, (dask_auc, local_auc)

    pairs = built.data.pairs
    _, valid, _ = built.periods.masks(pairs)
    assert pairs.features.shape[1] == len(RANKER_FEATURES)
    dask_ranker = roc_auc_score(pairs.labels[valid], served.predict_items(pairs.features[valid]))
    local_ranker = roc_auc_score(pairs.labels[valid], local.predict_items(pairs.features[valid]))
    assert dask_ranker == pytest.approx(result.metrics[RANKER_MODEL]["auc"], abs=1e-9)
    assert abs(dask_ranker - local_ranker) <= RANKER_AUC_TOLERANCE, (dask_ranker, local_ranker, served.metadata["models"][RANKER_MODEL]["objective"])
    dask_ndcg = served.metadata["models"][RANKER_MODEL]["metrics"]["ndcg_at_10"]
    local_ndcg = local.metadata["models"][RANKER_MODEL]["metrics"]["ndcg_at_10"]
    assert dask_ndcg >= local_ndcg - RANKER_NDCG_TOLERANCE, (dask_ndcg, local_ndcg)

    # The same fit through both engines (bench.dask_quality's comparison at equal hyperparameters, on one worker).
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        same = fixed(built, settings.training, client, SAME_FIT_TREES, SAME_FIT_PARAMS)
    assert sorted(same["dask"]) == ["item_ranker/binary", "item_ranker/lambdarank", "user_propensity/binary"], same
    for key, fit in same["local"].items():
        assert abs(same["dask"][key]["auc"] - fit["auc"]) <= SAME_FIT_TOLERANCE, (key, same)
        if "ndcg_at_10" in fit:
            assert abs(same["dask"][key]["ndcg_at_10"] - fit["ndcg_at_10"]) <= SAME_FIT_TOLERANCE, (key, same)


@pytest.mark.slow
def test_rows_stream_to_parquet_one_cutoff_at_a_time(pipeline: Pipeline, tmp_path: Path) -> None:
    """The Dask engine's build: the same rows as the whole build, one cut-off in memory at a time, on disk by cut-off date."""
    settings = Settings(data_dir=pipeline.data_dir, work_dir=pipeline.work_dir, feature_repo=pipeline.feature_repo)
    prepared = load_prepared(settings.prepared_dir)
    whole = build_training_data(settings, prepared, progress=lambda _: None)  # the local engine's build, for reference
    plan = plan_training(settings, prepared, progress=lambda _: None)
    catalogs = plan_catalogs(settings, plan)
    retrieval = streamed_retrieval_weights(settings, plan, catalogs, progress=lambda _: None)
    # Fitted on the same users, catalogs and samples; the weights are rounded to 6 decimals (a 6th-decimal difference
    # was seen in a CI run), so they are compared with a tolerance far below anything that changes a candidate set.
    assert {k: v for k, v in retrieval.items() if k != "weights"} == {k: v for k, v in whole.retrieval.items() if k != "weights"}
    for kind, weights in whole.retrieval["weights"].items():
        assert retrieval["weights"][kind] == pytest.approx(weights, abs=1e-5), kind

    alive: list[weakref.ref] = []  # the model inputs of every chunk handed out so far
    started: list[str] = []

    def progress(line: str) -> None:
        if "point-in-time features and assembly" in line:  # a cut-off's build starts: no earlier chunk may still be in memory
            started.append(line)
            assert not [ref for ref in alive if ref() is not None], f"an earlier cut-off's rows are still held when {line.strip()!r} starts"

    rows = TrainingRows(tmp_path / "rows", partition_rows=20_000, min_files=2)
    for cutoff, data in training_chunks(settings, plan, catalogs, retrieval["weights"], progress):
        assert set(naive_utc(data.users.cutoffs)) == set(naive_utc(data.pairs.cutoffs)) == {naive_utc([cutoff])[0]}
        alive += [weakref.ref(data.users.features), weakref.ref(data.pairs.features)]
        rows.append(cutoff, data, progress)
        del data
    assert len(started) == len(whole.cutoffs) == len(rows.summaries)

    total = len(whole.data.users.labels) + len(whole.data.pairs.labels)
    per_cutoff = []
    for cutoff in whole.cutoffs:
        in_whole = {name: naive_utc(part.cutoffs) == naive_utc([cutoff])[0] for name, part in ((USER, whole.data.users), (RANKER, whole.data.pairs))}
        per_cutoff.append(sum(int(mask.sum()) for mask in in_whole.values()))
        for name, part in ((USER, whole.data.users), (RANKER, whole.data.pairs)):
            # Partitioned by cut-off date; every file holds whole query groups, consecutive, and no group is in two files.
            directory = tmp_path / "rows" / name / f"cutoff={cutoff:%Y-%m-%d}"
            files = sorted(directory.glob("part-*.parquet"))
            assert len(files) >= 2, (name, cutoff, files)
            tables = [pq.read_table(f).to_pandas() for f in files]
            seen = [set(t[GROUP]) for t in tables]
            assert all(a.isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1 :]), f"{name} {cutoff:%Y-%m-%d}: a group spans two files"
            for t in tables:
                g = t[GROUP].to_numpy()
                assert len(np.unique(g)) == int((np.r_[True, g[1:] != g[:-1]]).sum()), f"{name}: a group's rows are not consecutive"
            # And the rows are the whole build's rows of that cut-off, value for value. Within a user, candidates that tie
            # on retrieval score may come in another order (the catalog's item order is Feast's row order), so each
            # cut-off's rows are compared as sorted tables.
            frame = pd.concat(tables, ignore_index=True)
            mask = in_whole[name]
            assert len(frame) == int(mask.sum()) and len(frame.columns) == part.features.shape[1] + 2
            np.testing.assert_array_equal(np.unique(frame[GROUP]), np.unique(part.groups[mask]))
            expected = pd.DataFrame(part.features[mask].astype(np.float64), columns=frame.columns[:-2]).assign(**{LABEL: part.labels[mask], GROUP: part.groups[mask]})
            np.testing.assert_array_equal(_sorted_rows(frame), _sorted_rows(expected))
    assert sorted(p.name for p in (tmp_path / "rows" / USER).iterdir()) == sorted(f"cutoff={c:%Y-%m-%d}" for c in whole.cutoffs)
    # What the driver held at once is one cut-off's rows, never the whole window's.
    assert rows.largest_chunk == max(per_cutoff) < total
    assert rows.base_rate(RANKER) == pytest.approx(float(whole.data.pairs.labels.mean()))
    assert rows.candidate_recall() == pytest.approx(whole.data.candidate_recall)

    # The held-out period read back is the whole build's test rows.
    held = rows.read(whole.periods.test)
    test = whole.periods.masks(whole.data.pairs)[2]
    np.testing.assert_array_equal(np.sort(held.pairs.groups), np.sort(whole.data.pairs.groups[test]))  # files deal the groups at random
    np.testing.assert_array_equal(_sorted_rows(pd.DataFrame(held.pairs.features).assign(g=held.pairs.groups)),
                                  _sorted_rows(pd.DataFrame(whole.data.pairs.features[test]).assign(g=whole.data.pairs.groups[test])))
    assert (whole.periods.masks(held.users)[2]).all()


def _sorted_rows(frame: pd.DataFrame) -> np.ndarray:
    """The rows as an array in one canonical order (by every column, missing values last)."""
    frame = frame.astype(np.float64)
    frame.columns = range(frame.shape[1])
    return frame.sort_values(list(frame.columns), na_position="last", kind="stable").to_numpy()
