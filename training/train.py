"""Train the user propensity model and the (user, item) ranker on time-ordered periods, save a version.

Cut-offs split into train < validation < test (training/periods.py): early stopping, objective
choice and calibration use validation only; test metrics are recorded as `test_*`.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version as package_version

import duckdb
import pandas as pd
from feast import FeatureStore

from propensity.assembly import RANKER_FEATURES, USER_MODEL_FEATURES
from propensity.catalog import Catalog
from propensity.feature_store import open_store, service_fingerprint, service_schema
from propensity.model_registry import RANKER_MODEL, USER_MODEL, ModelLoadError, check_continuation, load_version, new_version_id, save_version
from propensity.registry_history import promote_version
from propensity.settings import Settings
from propensity.user_state import read_inputs
from training.datasets import CutoffData, assemble, cutoff_times, entity_rows, historical_catalogs, historical_user_features
from training.models import RANKER_OBJECTIVES, FittedModel, fit_model
from training.periods import Periods
from training.prepare import PreparedData
from training.report import write_training_report
from training.retrieval_fit import fit_retrieval_weights
from training.tuning import TuningBudget

@dataclass(frozen=True)
class TrainingResult:
    version: str
    metrics: dict[str, dict[str, float]]
    seconds: float
    promoted: bool = False
    gate: dict | None = None  # the promotion gate's decision (training/lifecycle.py), None when promotion was not asked for


@dataclass
class TrainingData:
    """Everything built before fitting: cut-offs and their periods, entity rows, point-in-time features, model inputs."""

    store: FeatureStore
    cutoffs: list[datetime]
    periods: Periods
    rows: pd.DataFrame
    user_features: pd.DataFrame
    catalogs: dict[pd.Timestamp, Catalog]
    data: CutoffData
    retrieval: dict  # the fitted retrieval weights and what they were fitted on (training/retrieval_fit.py)


def default_budget(settings: Settings) -> TuningBudget | None:
    """The search budget from settings.training (PROPENSITY_TRAINING__TUNING_TRIALS / _SECONDS); 0 trials = off."""
    trials, seconds = settings.training.tuning_trials, settings.training.tuning_seconds
    return TuningBudget(n_trials=trials, seconds=seconds, seed=settings.training.seed) if trials > 0 else None


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
    user_features = historical_user_features(store, rows, settings.user_feature_service)
    item_ids = pd.read_parquet(prepared.directory / "items.parquet", columns=["item_id"])["item_id"].astype(str).tolist()
    catalogs = historical_catalogs(store, item_ids, cutoffs, settings.item_feature_service)
    progress(f"  point-in-time features joined ({time.perf_counter() - started:.1f}s)")
    retrieval = fit_retrieval_weights(rows, user_features, catalogs, periods.train, settings.training.seed, progress)
    data = assemble(rows, user_features, catalogs, settings.candidates, settings.training, progress, retrieval["weights"])
    progress(f"  ranker rows: {len(data.pairs.labels):,}; candidates cover {data.candidate_recall:.1%} of items bought")
    return TrainingData(store, cutoffs, periods, rows, user_features, catalogs, data, retrieval)


def fit_models(settings: Settings, built: TrainingData, budget: TuningBudget | None, progress: Callable[[str], None] = print) -> dict[str, FittedModel]:
    """Both models, fitted the one way training and evaluation share (through lightgbm.dask when training.engine is 'dask')."""
    if settings.training.engine == "dask":
        from training.dask_training import fit_models_dask  # Dask is imported only when asked for

        if budget and budget.n_trials > 0:
            progress("  tuning is not run on the Dask engine; fitting with the configured parameters")
        user, ranker = fit_models_dask(settings.training, built.data, built.periods, settings.work_dir, progress)
    else:
        user = fit_model("user_propensity", built.data.users, USER_MODEL_FEATURES, built.periods, settings.training, budget, ("binary",), progress)
        ranker = fit_model("item_ranker", built.data.pairs, RANKER_FEATURES, built.periods, settings.training, budget, RANKER_OBJECTIVES, progress)
    ranker.metrics.update(ranker.alternatives.get(ranker.objective, {}))  # validation recall@10 / NDCG@10 within candidates
    ranker.metrics["candidate_recall"] = built.data.candidate_recall
    return {USER_MODEL: user, RANKER_MODEL: ranker}


def current_services(settings: Settings, store: FeatureStore) -> dict[str, dict[str, str]]:
    return {
        "user": {"name": settings.user_feature_service, "fingerprint": service_fingerprint(store, settings.user_feature_service)},
        "item": {"name": settings.item_feature_service, "fingerprint": service_fingerprint(store, settings.item_feature_service)},
    }


def sensitive_inputs(settings: Settings, store: FeatureStore) -> dict[str, list[str]]:
    """Which of training.sensitive_attributes the user feature service serves, and which of those the models read."""
    served = {feature for _, feature, _ in service_schema(store, settings.user_feature_service)}
    sensitive = settings.training.sensitive_attributes
    return {
        "sensitive_attributes": list(sensitive),
        "served": [a for a in sensitive if a in served],
        "model_inputs": [a for a in sensitive if a in read_inputs(served)],
    }


def minimised_user_service(store: FeatureStore, service: str, sensitive: Sequence[str]) -> str:
    """The user feature service serving exactly what `service` serves without the sensitive attributes (`service` itself if it serves none).

    Leaving an attribute out is a feature-service change, so it is a published `_vN` (propensity_user_v3 is v2 without
    gender and age), never an edit of a live service; without one, this says so.
    """
    schema = service_schema(store, service)
    wanted = sorted(entry for entry in schema if entry[1] not in sensitive)
    if len(wanted) == len(schema):
        return service
    for candidate in sorted(s.name for s in store.list_feature_services()):
        if sorted(service_schema(store, candidate)) == wanted:
            return candidate
    raise ValueError(
        f"no feature service serves {service!r} without {sorted(set(sensitive) & {e[1] for e in schema})}; "
        "publish one as a new _vN in feature_repo/feature_services.py"
    )


def data_fingerprint(prepared: PreparedData) -> dict:
    """Count, time range, per-type counts and an order-independent content hash of the prepared events."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    path = prepared.directory / "events.parquet"
    n, first, last, content = con.execute(
        f"SELECT count(*), min(event_time), max(event_time), sum(hash(user_id, item_id, event_type, epoch_us(event_time)) % 1000000007) "
        f"FROM read_parquet('{path}')"
    ).fetchone()
    by_type = dict(con.execute(f"SELECT event_type, count(*) FROM read_parquet('{path}') GROUP BY 1 ORDER BY 1").fetchall())
    con.close()
    summary = {
        "source": prepared.source,
        "n_events": int(n),
        "min_event_time": pd.Timestamp(first).isoformat() if first is not None else None,
        "max_event_time": pd.Timestamp(last).isoformat() if last is not None else None,
        "events_by_type": {k: int(v) for k, v in by_type.items()},
        "shift_days": prepared.shift_days,
        "content_hash": int(content or 0),
    }
    summary["fingerprint"] = hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()[:16]
    return summary


def train(
    settings: Settings,
    prepared: PreparedData,
    promote_to_current: bool = True,
    progress: Callable[[str], None] = print,
    continue_from: str | None = None,
    budget: TuningBudget | None = None,
    force: bool = False,
    by: str | None = None,
    reason: str = "",
) -> TrainingResult:
    """Build point-in-time training rows from Feast, fit both models, save (and promote, past the gate) a new version.

    continue_from names an earlier version this one replaces; training refuses it (ContinuationError)
    when that version's feature services or their fingerprints differ from the current ones.
    Promotion goes through the gate (promote_past_gate); force promotes a version the gate refused, and the
    registry's history records the override.
    """
    started = time.perf_counter()
    store = open_store(settings.feature_repo, settings.feature_store_yaml)
    services = current_services(settings, store)
    if continue_from:
        check_continuation(settings.model_dir, continue_from, services)
    built = build_training_data(settings, prepared, progress)
    models = fit_models(settings, built, budget if budget is not None else default_budget(settings), progress)
    user, ranker = models[USER_MODEL], models[RANKER_MODEL]
    periods = built.periods

    version = new_version_id()
    metadata = {
        "version": version,
        "trained_at": datetime.now(timezone.utc).isoformat(),
        "horizon_days": settings.training.horizon_days,
        **periods.to_json(),
        "cutoffs": [c.isoformat() for c in built.cutoffs],
        "continues": continue_from,
        "data": {**prepared.to_json(), "directory": None},
        "data_fingerprint": data_fingerprint(prepared),
        "feature_services": services,
        # training.sensitive_attributes, which of them the user feature service serves, and which the models read
        # (an input the service lacks is missing for every row: the models cannot use it).
        "sensitive_inputs": sensitive_inputs(settings, store),
        "models": {
            name: {
                "feature_names": list(features),
                "metrics": model.metrics,
                "base_rate": float(data.labels.mean()),
                "objective": model.objective,
                "params": model.params,
                "calibration": model.calibration,
                "objective_selection": model.alternatives,
                "best_iteration": model.booster.best_iteration,
            }
            for name, model, features, data in (
                (USER_MODEL, user, USER_MODEL_FEATURES, built.data.users),
                (RANKER_MODEL, ranker, RANKER_FEATURES, built.data.pairs),
            )
        },
        "candidates": settings.candidates.model_dump(),
        "retrieval": built.retrieval,
        "library_versions": {
            name: package_version(name) for name in ("lightgbm", "feast", "numpy", "pandas", "scikit-learn")
        }
        | {"python": platform.python_version()},
    }
    directory = save_version(settings.model_dir, version, {USER_MODEL: user.booster, RANKER_MODEL: ranker.booster}, metadata)
    write_training_report(directory, metadata, {USER_MODEL: (user, built.data.users), RANKER_MODEL: (ranker, built.data.pairs)}, periods)
    if settings.server.scoring_backend != "lightgbm":
        # Build the compiled predictors now, so servers load them from disk instead of compiling.
        t0 = time.perf_counter()
        bundle = load_version(settings.model_dir, version)
        if bundle.compile():
            worst = max(m.max_abs_difference for m in bundle.compiled.values())
            progress(f"  compiled predictors built and verified in {time.perf_counter() - t0:.1f}s (max abs difference vs LightGBM {worst:.1e})")
        else:
            progress("  compiled predictors unavailable; servers will score with LightGBM")
    promoted, gate = False, None
    if promote_to_current:
        promoted, gate = promote_past_gate(settings, built, version, force, by, reason, progress)
    seconds = time.perf_counter() - started
    progress(
        f"trained {version} in {seconds:.1f}s: user propensity AUC {user.metrics['auc']:.3f}, "
        f"item ranker ({ranker.objective}) AUC {ranker.metrics['auc']:.3f}, recall@10 {ranker.metrics.get('recall_at_10', float('nan')):.3f} "
        f"(validation {periods.validation[-1]:%Y-%m-%d}"
        + (f", test {periods.test[-1]:%Y-%m-%d}" if periods.test else ", no test period") + f"); report: {directory / 'report.md'}"
    )
    return TrainingResult(version, {USER_MODEL: user.metrics, RANKER_MODEL: ranker.metrics}, seconds, promoted, gate)


def promote_past_gate(
    settings: Settings, built: TrainingData, version: str, force: bool, by: str | None, reason: str, progress: Callable[[str], None] = print
) -> tuple[bool, dict]:
    """Promote `version` if it is at least as good as the current one on the held-out period (or if forced); say why either way."""
    from training.lifecycle import promotion_gate  # imports the evaluation code, which imports this module

    root = settings.model_dir
    try:
        current = load_version(root)
    except ModelLoadError as error:  # none yet, or one that no longer loads: nothing to hold the new version to
        current = None
        progress(f"  promotion gate: no loadable current version ({error})")
    decision = promotion_gate(built, load_version(root, version), current, settings.training)
    gate = decision.to_json()
    forced = force and not decision.passed
    if decision.passed or force:
        default = "trained; passed the promotion gate" if decision.passed else "trained; promoted with --force past the gate"
        promote_version(root, version, by=by, reason=reason or default, forced=forced, gate=gate)
        progress(f"  promoted {version}{' (FORCED: the gate refused it)' if forced else ''}: " + "; ".join(decision.reasons))
        return True, gate
    progress(f"  NOT promoted: {version} is registered, {decision.current} stays current: " + "; ".join(decision.reasons)
             + f". Promote it anyway with `propensity models promote {version} --reason ...` or train with --force.")
    return False, gate
