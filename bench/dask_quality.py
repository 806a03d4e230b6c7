"""`python -m bench.dask_quality`: the Dask engine's model quality against the local engine's, seed by seed, on one build of the rows.

The rows are built once (the local build; the Dask engine's streamed build gives the same rows, tests/test_dask_training.py),
then for every LightGBM seed (`training.seed` of the fit) both engines fit them:

- `--mode production`: each engine as `propensity train` runs it (early stopping, both ranker objectives, the better one on
  validation NDCG@10, calibration): validation AUC, trees and NDCG@10 of the served models.
- `--mode fixed --trees N`: an engine comparison at equal hyperparameters: every (model, objective) fitted with exactly N
  trees on both engines, no early stopping, raw-score validation AUC. `--param bagging_fraction=1.0` etc. apply to both.

    PROPENSITY_CONFIG=/nonexistent python -m bench.dask_quality --data var/demo-data --work-dir var --feature-repo feature_repo \\
        --seeds 13 42 1 --mode production
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import lightgbm as lgb
import numpy as np
from sklearn.metrics import roc_auc_score

from propensity.assembly import RANKER_FEATURES, USER_MODEL_FEATURES
from propensity.settings import Settings, TrainingSettings
from training.boosters import base_params, group_sizes
from training.datasets import TrainingSet
from training.models import RANKER_OBJECTIVES, candidate_ranking, fit_model
from training.prepare import load_prepared
from training.training_data import TrainingData, build_training_data

if TYPE_CHECKING:  # Dask is imported only when a comparison runs
    from distributed import Client

MODELS = {"user_propensity": (USER_MODEL_FEATURES, ("binary",)), "item_ranker": (RANKER_FEATURES, RANKER_OBJECTIVES)}


def production(built: TrainingData, training: TrainingSettings, scheduler: str) -> dict[str, dict]:
    """Both engines as `propensity train` fits them; per engine and model: validation AUC, trees, objective, NDCG@10."""
    from training.dask_training import fit_models_dask

    quiet = lambda _: None  # noqa: E731
    local = {name: fit_model(name, getattr(built.data, part), features, built.periods, training, None, objectives, quiet)
             for (name, (features, objectives)), part in zip(MODELS.items(), ("users", "pairs"))}
    with tempfile.TemporaryDirectory(prefix="dask-quality-") as work:
        dask = dict(zip(MODELS, fit_models_dask(training.model_copy(update={"engine": "dask", "dask_scheduler": scheduler}), built.data, built.periods, Path(work), quiet)))

    def row(model) -> dict:
        return {"auc": model.metrics["auc"], "trees": model.metrics["best_iteration"], "objective": model.objective,
                "ndcg_at_10": model.alternatives.get(model.objective, {}).get("ndcg_at_10", float("nan"))}

    return {engine: {name: row(m) for name, m in fitted.items()} for engine, fitted in (("local", local), ("dask", dask))}


def local_fixed(params: dict, data: TrainingSet, train: np.ndarray, features: tuple[str, ...], trees: int) -> lgb.Booster:
    ranking = params["objective"] == "lambdarank"
    train_set = lgb.Dataset(data.features[train], data.labels[train], feature_name=list(features), group=group_sizes(data.groups[train]) if ranking else None)
    return lgb.train({k: v for k, v in params.items() if k not in ("metric", "eval_at")}, train_set, num_boost_round=trees)


def fixed(built: TrainingData, training: TrainingSettings, client: Client, trees: int, overrides: dict) -> dict[str, dict]:
    """Every (model, objective) with exactly `trees` trees on both engines: raw-score validation AUC (and NDCG@10 for the ranker)."""
    from training.dask_training import USER, TrainingRows, dask_booster, in_memory_chunks

    out: dict[str, dict] = {"local": {}, "dask": {}}
    with tempfile.TemporaryDirectory(prefix="dask-quality-") as work:
        rows = TrainingRows(Path(work) / "rows", training.dask_partition_rows, len(client.scheduler_info()["workers"]), training.seed)
        for cutoff, chunk in in_memory_chunks(built.data):
            rows.append(cutoff, chunk, lambda _: None)
        for (name, (features, objectives)), part in zip(MODELS.items(), ("users", "pairs")):
            data = getattr(built.data, part)
            train, valid, _ = built.periods.masks(data)
            for objective in objectives:
                params = {**base_params(training, objective), **overrides}
                boosters = {"local": local_fixed(params, data, train, features, trees),
                            "dask": dask_booster(client, params, [rows.files(name, [c]) for c in built.periods.train], features, trees)}
                for engine, booster in boosters.items():
                    scores = booster.predict(data.features[valid])
                    result = {"auc": float(roc_auc_score(data.labels[valid], scores))}
                    if name != USER:
                        result["ndcg_at_10"] = candidate_ranking(scores, data, valid).get("ndcg_at_10", float("nan"))
                    out[engine][f"{name}/{objective}"] = result
    return out


def _override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    if not key or not value:
        raise argparse.ArgumentTypeError(f"--param wants key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="raw event directory of a shop that `propensity run` has published")
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--feature-repo", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[13, 42, 1])
    parser.add_argument("--mode", choices=("production", "fixed"), default="production")
    parser.add_argument("--trees", type=int, default=60, help="trees per fit in --mode fixed")
    parser.add_argument("--rounds", type=int, default=None, help="num_boost_round in --mode production (default: the settings')")
    parser.add_argument("--param", type=_override, action="append", default=[], help="LightGBM parameter for both engines in --mode fixed, key=value")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    settings = Settings(data_dir=args.data, work_dir=args.work_dir, feature_repo=args.feature_repo)
    started = time.perf_counter()
    built = build_training_data(settings, load_prepared(settings.prepared_dir), progress=lambda _: None)
    print(f"rows built once in {time.perf_counter() - started:.0f}s: {len(built.data.users.labels):,} user rows, {len(built.data.pairs.labels):,} ranker rows; "
          f"validation {int(built.periods.masks(built.data.users)[1].sum()):,} user rows, {int(built.periods.masks(built.data.pairs)[1].sum()):,} ranker rows", flush=True)
    results = {}
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        for seed in args.seeds:
            update = {"seed": seed, **({"num_boost_round": args.rounds} if args.rounds else {})}
            training = settings.training.model_copy(update=update)
            started = time.perf_counter()
            if args.mode == "production":
                results[seed] = production(built, training, cluster.scheduler_address)
            else:
                results[seed] = fixed(built, training, client, args.trees, dict(args.param))
            print(f"seed {seed} ({time.perf_counter() - started:.0f}s)", flush=True)
            for key, local in results[seed]["local"].items():
                dask = results[seed]["dask"][key]
                extra = "".join(f"  {f}: {local[f]} / {dask[f]}" for f in ("trees", "objective") if f in local)
                ndcg = f"  NDCG@10 {local['ndcg_at_10']:.3f} / {dask['ndcg_at_10']:.3f}" if "ndcg_at_10" in local else ""
                print(f"  {key:28s} AUC local {local['auc']:.4f}  dask {dask['auc']:.4f}  diff {dask['auc'] - local['auc']:+.4f}{ndcg}{extra}", flush=True)
    print("\nper model: mean |dask - local| AUC, largest, and the difference of the means")
    for key in results[args.seeds[0]]["local"]:
        diffs = [results[s]["dask"][key]["auc"] - results[s]["local"][key]["auc"] for s in args.seeds]
        means = [statistics.mean(results[s][e][key]["auc"] for s in args.seeds) for e in ("local", "dask")]
        print(f"  {key:28s} mean |diff| {statistics.mean(map(abs, diffs)):.4f}  max |diff| {max(map(abs, diffs)):.4f}  "
              f"mean local {means[0]:.4f}  mean dask {means[1]:.4f}  diff of means {means[1] - means[0]:+.4f}")
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
