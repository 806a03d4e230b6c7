"""Train the user propensity model and the (user, item) ranker on time-ordered periods, save a version.

Cut-offs split into train < validation < test (training/periods.py): early stopping, objective
choice and calibration use validation only; test metrics are recorded as `test_*`.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version as package_version

from propensity.assembly import RANKER_FEATURES, USER_MODEL_FEATURES
from propensity.feature_store import open_store
from propensity.model_registry import RANKER_MODEL, USER_MODEL, check_continuation, load_version, new_version_id, save_version
from propensity.settings import Settings
from training.models import RANKER_OBJECTIVES, FittedModel, fit_model
from training.prepare import PreparedData
from training.promotion import promote_past_gate
from training.report import write_training_report
from training.streamed_training import train_on_dask
from training.training_data import TrainingData, build_training_data
from training.tuning import TuningBudget
from training.version_facts import current_services, data_fingerprint, sensitive_inputs


@dataclass(frozen=True)
class TrainingResult:
    version: str
    metrics: dict[str, dict[str, float]]
    seconds: float
    promoted: bool = False
    gate: dict | None = None  # the promotion gate's decision (training/lifecycle.py), None when promotion was not asked for


def default_budget(settings: Settings) -> TuningBudget | None:
    """The search budget from settings.training (PROPENSITY_TRAINING__TUNING_TRIALS / _SECONDS); 0 trials = off."""
    trials, seconds = settings.training.tuning_trials, settings.training.tuning_seconds
    return TuningBudget(n_trials=trials, seconds=seconds, seed=settings.training.seed) if trials > 0 else None


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
    return model_dict(user, ranker, built.data.candidate_recall)


def model_dict(user: FittedModel, ranker: FittedModel, candidate_recall: float) -> dict[str, FittedModel]:
    """Both models by registry name, the ranker's metrics completed with its within-candidates ranking and the candidates' recall."""
    ranker.metrics.update(ranker.alternatives.get(ranker.objective, {}))  # validation recall@10 / NDCG@10 within candidates
    ranker.metrics["candidate_recall"] = candidate_recall
    return {USER_MODEL: user, RANKER_MODEL: ranker}


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
    budget = budget if budget is not None else default_budget(settings)
    if settings.training.engine == "dask":
        # The rows are streamed to Parquet one cut-off at a time: built.data is only the held-out period.
        if budget and budget.n_trials > 0:
            progress("  tuning is not run on the Dask engine; fitting with the configured parameters")
        built, fit = train_on_dask(settings, prepared, progress)
        models, base_rates = model_dict(fit.user, fit.ranker, fit.candidate_recall), fit.base_rates
    else:
        built = build_training_data(settings, prepared, progress)
        models = fit_models(settings, built, budget, progress)
        base_rates = {USER_MODEL: float(built.data.users.labels.mean()), RANKER_MODEL: float(built.data.pairs.labels.mean())}
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
                "base_rate": base_rates[name],
                "objective": model.objective,
                "params": model.params,
                "calibration": model.calibration,
                "objective_selection": model.alternatives,
                "best_iteration": model.booster.best_iteration,
            }
            for name, model, features in ((USER_MODEL, user, USER_MODEL_FEATURES), (RANKER_MODEL, ranker, RANKER_FEATURES))
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
