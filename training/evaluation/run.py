"""`propensity evaluate`: fit both models as training does, score the held-out test period against baselines, write the report.

Output directory layout (one run = one dataset label, e.g. uci_h30):
  <out>/<label>/report.md + *.png    the dataset's report and plots
  <out>/metrics.json                 {label: {propensity, ranking, comparisons, best_baseline, oracle, goals, fairness, info}}, merged across runs
  <out>/README.md                    the headline (conclusive claims, goals) over every label in metrics.json
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from propensity.model_registry import RANKER_MODEL, USER_MODEL
from propensity.settings import Settings, TrainingSettings
from training import plots
from training.evaluation import fairness
from training.evaluation import oracle as oracles
from training.evaluation.comparison import against_best_baseline, compare_propensity, compare_rankings
from training.evaluation.fairness import evaluate_fairness
from training.evaluation.goals import dataset_goals
from training.evaluation.propensity_scores import MODEL, ScoredRows, propensity_table, score_test_rows
from training.evaluation.ranking import K, RankingTables, rank_test_buyers, summarise
from training.evaluation.report import write_report
from training.evaluation.summary import merge_metrics, write_summary
from training.periods import Periods
from training.prepare import PreparedData, load_prepared
from training.train import fit_models
from training.training_data import build_training_data
from training.version_facts import sensitive_inputs
from training.tuning import TuningBudget

if TYPE_CHECKING:
    from training.models import FittedModel
    from training.training_data import TrainingData


def evaluate(
    settings: Settings,
    out_dir: Path,
    label: str,
    budget: TuningBudget | None,
    n_boot: int = 200,
    command: str = "",
    progress: Callable[[str], None] = print,
    test_cutoffs: int = 1,
) -> dict:
    """Evaluate on the test period (the last test_cutoffs cut-offs) of settings' work dir; write <out_dir>/<label>/, merge metrics.json."""
    started = time.perf_counter()
    seed = settings.training.seed
    prepared = load_prepared(settings.prepared_dir)
    split = lambda cutoffs: evaluation_periods(cutoffs, settings.training, test_cutoffs)  # noqa: E731 - the minimised models split alike
    built = build_training_data(settings, prepared, progress, split=split)
    progress(f"evaluation periods: {len(built.periods.train)} train, {len(built.periods.validation)} validation, {len(built.periods.test)} test cut-off(s)")
    models = fit_models(settings, built, budget, progress)
    fit_seconds = time.perf_counter() - started
    target = out_dir / label
    target.mkdir(parents=True, exist_ok=True)

    rows = score_test_rows(built, models[USER_MODEL], seed, progress)
    ranking = rank_test_buyers(built, models[RANKER_MODEL], settings.prepared_dir, progress)
    progress(f"  paired bootstrap ({n_boot} resamples) of lightgbm against {len(rows.baselines) + len(ranking.baselines)} baselines")
    comparisons = compare_propensity(rows.y, rows.scores, MODEL, rows.baselines, n_boot, seed) + compare_rankings(
        ranking.tables, MODEL, ranking.baselines, n_boot, seed
    )
    oracle = oracle_section(settings, prepared, built.periods, rows, ranking)
    result: dict[str, Any] = {
        "propensity": propensity_table(rows, n_boot, seed),
        "ranking": summarise(ranking.tables, n_boot, seed),
        "comparisons": [c.to_json() for c in comparisons],
        "best_baseline": [c.to_json() for c in against_best_baseline(comparisons)],
        "oracle": oracle,
        "info": _info(settings, prepared, built, models, rows, ranking, budget, n_boot, fit_seconds, command),
    }
    result["goals"] = dataset_goals(result["comparisons"], oracle)
    result["fairness"] = evaluate_fairness(settings, prepared, built, models, rows.threshold, split, budget, n_boot, seed, progress)
    fairness.write_plot(target, result["fairness"])
    user_model = models[USER_MODEL]
    test = built.periods.masks(built.data.users)[2]
    plots.write_plots(target, rows.y, {k: v for k, v in rows.scores.items() if k != "base_rate_baseline"}, user_model, models[RANKER_MODEL], built.data.users.features[test])
    write_report(target, label, result)
    merge_metrics(out_dir, label, result)
    write_summary(out_dir)
    progress(f"evaluation {label} written to {target} in {time.perf_counter() - started:.0f}s")
    return result


def evaluation_cutoffs(training: TrainingSettings, n_cutoffs: int | None, test_cutoffs: int) -> int:
    """Cut-offs to build: n_cutoffs when given, else the configured count plus the extra test cut-offs (train and validation keep theirs)."""
    if test_cutoffs < 1:
        raise ValueError(f"--test-cutoffs must be at least 1, not {test_cutoffs}")
    return n_cutoffs or training.n_cutoffs + test_cutoffs - 1


def evaluation_periods(cutoffs: Sequence[datetime], training: TrainingSettings, test_cutoffs: int) -> Periods:
    """The last test_cutoffs cut-offs pooled as test, validation_cutoffs before them, the rest train; an error if any period is empty."""
    needed = training.validation_cutoffs + test_cutoffs + 1
    if len(cutoffs) < needed:
        raise ValueError(
            f"{len(cutoffs)} usable cut-offs, but {test_cutoffs} test + {training.validation_cutoffs} validation + at least 1 train "
            f"need {needed}; use more cut-offs (--n-cutoffs) or a longer log"
        )
    return Periods.split(list(cutoffs), training.validation_cutoffs, test_cutoffs)


def oracle_section(settings: Settings, prepared: PreparedData, periods: Periods, rows: ScoredRows, ranking: RankingTables) -> dict:
    """The oracle comparison when the raw data dir has an oracle at a test cut-off with the evaluation's horizon, else why not."""
    oracle, reason = oracles.find_oracle([Path(prepared.source), settings.data_dir])
    if oracle is None:
        return oracles.not_compared(reason)
    test = [pd.Timestamp(c) for c in periods.test]
    cutoff, reason = oracles.matching_cutoff(oracle, prepared.shift_days, test, settings.training.horizon_days)
    if cutoff is None:
        return oracles.not_compared(reason)
    buyers = ranking.buyers.at(cutoff)
    users = rows.at(cutoff)
    return oracles.compare_with_oracle(
        oracle,
        cutoff,
        buyers=[u for u, keep in zip(ranking.buyers.user_ids, buyers) if keep],
        relevant=[r for r, keep in zip(ranking.buyers.relevant, buyers) if keep],
        tables={name: table[buyers].reset_index(drop=True) for name, table in ranking.tables.items()},
        user_ids=rows.user_ids[users].tolist(),
        y=rows.y[users],
        model_scores=rows.scores[MODEL][users],
        k=K,
    )


def _info(
    settings: Settings,
    prepared: PreparedData,
    built: TrainingData,
    models: dict[str, FittedModel],
    rows: ScoredRows,
    ranking: RankingTables,
    budget: TuningBudget | None,
    n_boot: int,
    fit_seconds: float,
    command: str,
) -> dict:
    user_model, ranker = models[USER_MODEL], models[RANKER_MODEL]
    return {
        "dataset": prepared.source,
        "horizon_days": settings.training.horizon_days,
        "n_events": prepared.n_events,
        **built.periods.to_json(),
        "test_cutoffs": [pd.Timestamp(c).isoformat() for c in built.periods.test],
        "test_rows": len(rows.y),
        "test_positive_rows": int(rows.y.sum()),
        "test_positive_rate": float(rows.y.mean()),
        "test_buyers_ranked": len(ranking.buyers.row_ids),
        "test_buyers_without_candidates": ranking.without_candidates,
        "candidate_recall_test": ranking.candidate_recall,
        "threshold": rows.threshold,
        "bootstrap": n_boot,
        "user_model": {"calibration": user_model.calibration["method"], "params": user_model.params, "trees": user_model.booster.best_iteration},
        "ranker": {
            "objective": ranker.objective,
            "calibration": ranker.calibration["method"],
            "validation_selection": ranker.alternatives,
            "params": ranker.params,
        },
        "sensitive_inputs": sensitive_inputs(settings, built.store),
        "tuning": None if budget is None else {"trials": budget.n_trials, "seconds": budget.seconds, "folds": budget.folds},
        "fit_seconds": round(fit_seconds, 1),
        "command": command,
    }


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    """Entry point: settings come from propensity.settings.settings_from_args(args)."""
    test_cutoffs = getattr(args, "test_cutoffs", 1)
    updates = {"n_cutoffs": evaluation_cutoffs(settings.training, args.n_cutoffs, test_cutoffs)}
    if args.horizon_days:
        updates["horizon_days"] = args.horizon_days
    settings = settings.model_copy(update={"training": settings.training.model_copy(update=updates)})
    budget = TuningBudget(n_trials=args.trials, seconds=args.tuning_seconds, seed=settings.training.seed) if args.trials > 0 else None
    command = " ".join(shlex.quote(str(a)) for a in ["propensity", *sys.argv[1:]])  # exactly what was run
    evaluate(settings, Path(args.out).resolve(), args.label, budget, n_boot=args.bootstrap, command=command, test_cutoffs=test_cutoffs)
    return 0
