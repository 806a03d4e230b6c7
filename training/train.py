"""Train the user propensity model and the (user, item) ranker, evaluate on the latest cut-off, save a version."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version as package_version

import lightgbm as lgb
import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

from propensity.assembly import RANKER_FEATURES, USER_MODEL_FEATURES
from propensity.feature_store import open_store, service_fingerprint
from propensity.model_registry import RANKER_MODEL, USER_MODEL, load_version, new_version_id, promote, save_version
from propensity.settings import Settings
from training.datasets import TrainingSet, assemble, cutoff_times, entity_rows, historical_catalogs, historical_user_features
from training.prepare import PreparedData
from training.report import write_training_report


@dataclass(frozen=True)
class TrainingResult:
    version: str
    metrics: dict[str, dict[str, float]]
    seconds: float


def train(settings: Settings, prepared: PreparedData, promote_to_current: bool = True, progress: Callable[[str], None] = print) -> TrainingResult:
    """Build point-in-time training rows from Feast, fit both models, save (and promote) a new version."""
    started = time.perf_counter()
    store = open_store(settings.feature_repo, settings.feature_store_yaml)
    events = pd.read_parquet(prepared.directory / "events.parquet", columns=["event_time"])
    cutoffs = cutoff_times(prepared.as_of, events["event_time"].min().to_pydatetime(), settings.training)
    progress(f"training: {len(cutoffs)} cut-offs {cutoffs[0]:%Y-%m-%d} .. {cutoffs[-1]:%Y-%m-%d}, horizon {settings.training.horizon_days} days")
    rows = entity_rows(prepared.directory, cutoffs, settings.training)
    progress(f"  {len(rows):,} user rows, {rows['label'].mean():.1%} bought within the horizon")
    user_features = historical_user_features(store, rows, settings.user_feature_service)
    item_ids = pd.read_parquet(prepared.directory / "items.parquet", columns=["item_id"])["item_id"].astype(str).tolist()
    catalogs = historical_catalogs(store, item_ids, cutoffs, settings.item_feature_service)
    progress(f"  point-in-time features joined ({time.perf_counter() - started:.1f}s)")
    data = assemble(rows, user_features, catalogs, settings.candidates, settings.training, progress)
    progress(f"  ranker rows: {len(data.pairs.labels):,}; candidates cover {data.candidate_recall:.1%} of items bought")

    n_validation = settings.training.validation_cutoffs
    validation_from = np.datetime64(pd.Timestamp(cutoffs[-n_validation]).tz_convert(None))
    user_booster, user_metrics = _fit("user_propensity", data.users, USER_MODEL_FEATURES, validation_from, settings, progress)
    ranker, ranker_metrics = _fit("item_ranker", data.pairs, RANKER_FEATURES, validation_from, settings, progress)
    ranker_metrics["candidate_recall"] = data.candidate_recall
    ranker_metrics.update(_ranking_metrics(ranker, data.pairs, validation_from))

    version = new_version_id()
    metadata = {
        "version": version,
        "trained_at": datetime.now(timezone.utc).isoformat(),
        "horizon_days": settings.training.horizon_days,
        "train_window": {"start": cutoffs[0].isoformat(), "end": cutoffs[-n_validation - 1].isoformat()},
        "validation_window": {"start": cutoffs[-n_validation].isoformat(), "end": cutoffs[-1].isoformat()},
        "cutoffs": [c.isoformat() for c in cutoffs],
        "data": {**prepared.to_json(), "directory": None},
        "feature_services": {
            "user": {"name": settings.user_feature_service, "fingerprint": service_fingerprint(store, settings.user_feature_service)},
            "item": {"name": settings.item_feature_service, "fingerprint": service_fingerprint(store, settings.item_feature_service)},
        },
        "models": {
            USER_MODEL: {
                "feature_names": list(USER_MODEL_FEATURES),
                "metrics": user_metrics,
                "base_rate": float(data.users.labels.mean()),
                "params": _params(settings),
                "best_iteration": user_booster.best_iteration,
            },
            RANKER_MODEL: {
                "feature_names": list(RANKER_FEATURES),
                "metrics": ranker_metrics,
                "base_rate": float(data.pairs.labels.mean()),
                "params": _params(settings),
                "best_iteration": ranker.best_iteration,
            },
        },
        "candidates": settings.candidates.model_dump(),
        "library_versions": {
            name: package_version(name) for name in ("lightgbm", "feast", "numpy", "pandas", "scikit-learn")
        }
        | {"python": platform.python_version()},
    }
    directory = save_version(settings.model_dir, version, {USER_MODEL: user_booster, RANKER_MODEL: ranker}, metadata)
    write_training_report(directory, metadata, {USER_MODEL: (user_booster, data.users), RANKER_MODEL: (ranker, data.pairs)}, validation_from)
    if settings.server.scoring_backend != "lightgbm":
        # Build the compiled predictors now, so servers load them from disk instead of compiling.
        t0 = time.perf_counter()
        bundle = load_version(settings.model_dir, version)
        if bundle.compile():
            worst = max(m.max_abs_difference for m in bundle.compiled.values())
            progress(f"  compiled predictors built and verified in {time.perf_counter() - t0:.1f}s (max abs difference vs LightGBM {worst:.1e})")
        else:
            progress("  compiled predictors unavailable; servers will score with LightGBM")
    if promote_to_current:
        promote(settings.model_dir, version)
    seconds = time.perf_counter() - started
    progress(
        f"trained {version} in {seconds:.1f}s: user propensity AUC {user_metrics['auc']:.3f}, "
        f"item ranker AUC {ranker_metrics['auc']:.3f}, recall@10 {ranker_metrics.get('recall_at_10', float('nan')):.3f} "
        f"(validation cut-off {cutoffs[-1]:%Y-%m-%d}); report: {directory / 'report.md'}"
    )
    return TrainingResult(version, {USER_MODEL: user_metrics, RANKER_MODEL: ranker_metrics}, seconds)


def _params(settings: Settings) -> dict:
    t = settings.training
    return {
        "objective": "binary",
        "learning_rate": t.learning_rate,
        "num_leaves": t.num_leaves,
        "min_data_in_leaf": t.min_data_in_leaf,
        "feature_fraction": 0.9,
        "bagging_fraction": 0.9,
        "bagging_freq": 1,
        "seed": t.seed,
        "deterministic": True,
        "num_threads": 2,
        "verbosity": -1,
    }


def _split(data: TrainingSet, validation_from: np.datetime64) -> tuple[np.ndarray, np.ndarray]:
    cut = pd.DatetimeIndex(data.cutoffs).tz_convert(None).to_numpy() if len(data.cutoffs) else np.empty(0, dtype="datetime64[ns]")
    validation = cut >= validation_from
    return ~validation, validation


def _fit(name: str, data: TrainingSet, features: tuple[str, ...], validation_from: np.datetime64, settings: Settings, progress: Callable[[str], None]) -> tuple[lgb.Booster, dict[str, float]]:
    train_mask, valid_mask = _split(data, validation_from)
    y_train, y_valid = data.labels[train_mask], data.labels[valid_mask]
    for part, y in (("training", y_train), ("validation", y_valid)):
        if len(np.unique(y)) < 2:
            raise ValueError(f"{name}: the {part} period has only one label class ({len(y)} rows); use a longer log or other cut-offs")
    train_set = lgb.Dataset(data.features[train_mask], y_train, feature_name=list(features), free_raw_data=True)
    valid_set = lgb.Dataset(data.features[valid_mask], y_valid, reference=train_set)
    booster = lgb.train(
        _params(settings),
        train_set,
        num_boost_round=settings.training.num_boost_round,
        valid_sets=[valid_set],
        valid_names=["validation"],
        callbacks=[lgb.early_stopping(settings.training.early_stopping_rounds, verbose=False)],
    )
    predicted = booster.predict(data.features[valid_mask], num_iteration=booster.best_iteration)
    metrics = {
        "auc": float(roc_auc_score(y_valid, predicted)),
        "pr_auc": float(average_precision_score(y_valid, predicted)),
        "logloss": float(log_loss(y_valid, predicted, labels=[0, 1])),
        "positive_rate": float(y_valid.mean()),
        "train_rows": int(train_mask.sum()),
        "validation_rows": int(valid_mask.sum()),
        "best_iteration": int(booster.best_iteration),
    }
    progress(f"  {name}: validation AUC {metrics['auc']:.3f}, PR-AUC {metrics['pr_auc']:.3f} ({metrics['validation_rows']:,} rows, {metrics['best_iteration']} trees)")
    return booster, metrics


def _ranking_metrics(ranker: lgb.Booster, pairs: TrainingSet, validation_from: np.datetime64, k: int = 10) -> dict[str, float]:
    """Recall@k and hit rate@k over validation users who bought a candidate."""
    _, valid = _split(pairs, validation_from)
    scores = ranker.predict(pairs.features[valid], num_iteration=ranker.best_iteration)
    frame = pd.DataFrame({"group": pairs.groups[valid], "label": pairs.labels[valid], "score": scores})
    frame = frame[frame.groupby("group")["label"].transform("sum") > 0]
    if frame.empty:
        return {}
    frame["rank"] = frame.groupby("group")["score"].rank(ascending=False, method="first")
    hits = frame[frame["rank"] <= k].groupby("group")["label"].sum()
    totals = frame.groupby("group")["label"].sum()
    return {f"recall_at_{k}": float((hits / totals).mean()), f"hit_rate_at_{k}": float((hits > 0).mean()), "ranking_users": int(len(totals))}
