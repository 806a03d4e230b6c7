"""`propensity evaluate`: fit both models as training does, score the held-out test period against baselines, write the report.

Output directory layout (one run = one dataset label, e.g. uci_h30):
  <out>/<label>/report.md + *.png    the dataset's report and plots
  <out>/metrics.json                 {label: {model: {metric: value}}}, merged across runs
  <out>/README.md                    the headline table over every label in metrics.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, roc_auc_score

from propensity.model_registry import RANKER_MODEL, USER_MODEL
from propensity.settings import Settings
from propensity.user_state import UserState
from training import baselines, metrics, plots
from training.models import group_sizes
from training.prepare import load_prepared
from training.train import build_training_data, fit_models
from training.tuning import TuningBudget
from training.commands import add_evaluate_arguments

K = 10


def evaluate(settings: Settings, out_dir: Path, label: str, budget: TuningBudget | None, n_boot: int = 200, command: str = "", progress: Callable[[str], None] = print) -> dict:
    """Evaluate on the test period of settings' work dir; write <out_dir>/<label>/ and merge metrics.json; return this label's metrics."""
    started = time.perf_counter()
    prepared = load_prepared(settings.prepared_dir)
    built = build_training_data(settings, prepared, progress)
    if not built.periods.test:
        raise ValueError(f"{label}: {len(built.cutoffs)} cut-offs leave no test period; use more cut-offs (PROPENSITY_TRAINING__N_CUTOFFS)")
    models = fit_models(settings, built, budget, progress)
    fit_seconds = time.perf_counter() - started
    target = out_dir / label
    target.mkdir(parents=True, exist_ok=True)

    users = built.data.users
    train, valid, test = built.periods.masks(users)
    user_model = models[USER_MODEL]
    y_test = users.labels[test]
    scores = {
        "lightgbm": user_model.predict(users.features[test]),
        "lightgbm_uncalibrated": user_model.raw(users.features[test]),
    }
    progress("  fitting the MLP baseline")
    mlp = baselines.fit_mlp(users.features[train], users.labels[train], seed=settings.training.seed)
    scores["mlp_baseline"] = baselines.predict_mlp(mlp, users.features[test])
    scores["base_rate_baseline"] = np.full(len(y_test), users.labels[train].mean())
    threshold = _best_f1_threshold(users.labels[valid], user_model.predict(users.features[valid]))
    propensity = {}
    for name, p in scores.items():
        values = metrics.propensity_metrics(y_test, p, threshold)
        if name != "base_rate_baseline":
            values["roc_auc_ci_low"], values["roc_auc_ci_high"] = metrics.bootstrap_metric(y_test, p, roc_auc_score, n_boot=n_boot)
        propensity[name] = values

    ranking, candidate_recall, n_buyers = _ranking(settings, built, models, n_boot, progress)
    result = {
        "propensity": propensity,
        "ranking": ranking,
        "info": {
            "dataset": prepared.source,
            "horizon_days": settings.training.horizon_days,
            "n_events": prepared.n_events,
            **built.periods.to_json(),
            "test_rows": int(test.sum()),
            "test_positive_rate": float(y_test.mean()),
            "test_buyers_ranked": n_buyers,
            "candidate_recall_test": candidate_recall,
            "threshold": threshold,
            "user_model": {"calibration": user_model.calibration["method"], "params": user_model.params, "trees": user_model.booster.best_iteration},
            "ranker": {
                "objective": models[RANKER_MODEL].objective,
                "calibration": models[RANKER_MODEL].calibration["method"],
                "validation_selection": models[RANKER_MODEL].alternatives,
                "params": models[RANKER_MODEL].params,
            },
            "tuning": None if budget is None else {"trials": budget.n_trials, "seconds": budget.seconds, "folds": budget.folds},
            "fit_seconds": round(fit_seconds, 1),
            "command": command,
        },
    }
    plots.write_plots(target, y_test, {k: v for k, v in scores.items() if k != "base_rate_baseline"}, user_model, models[RANKER_MODEL], users.features[test])
    _write_report(target, label, result)
    _merge_metrics(out_dir, label, result)
    write_summary(out_dir)
    progress(f"evaluation {label} written to {target} in {time.perf_counter() - started:.0f}s")
    return result


def _best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold that maximises F1 on the validation period (stated in the report, applied to test)."""
    grid = np.unique(np.quantile(p, np.linspace(0.5, 0.995, 100)))
    return float(max(grid, key=lambda t: f1_score(y, p >= t, zero_division=0))) if len(grid) else 0.5


def _ranking(settings: Settings, built, models, n_boot: int, progress: Callable[[str], None]) -> tuple[dict, float, int]:
    """Per-user ranking metrics over test buyers: the ranker (each objective), candidate order and the baselines."""
    test_cutoff = pd.Timestamp(built.periods.test[-1])
    rows = built.rows
    at_test = (pd.to_datetime(rows["event_timestamp"], utc=True) == test_cutoff).to_numpy()
    buyer_rows = np.flatnonzero(at_test & (rows["label"].to_numpy() == 1))
    bought = {i: set(map(str, rows.at[i, "bought_items"])) for i in buyer_rows}
    pairs = built.data.pairs
    in_test = np.isin(pairs.groups, buyer_rows)
    groups = pairs.groups[in_test]
    sizes = group_sizes(groups)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    group_ids = groups[starts] if len(groups) else np.empty(0, dtype=int)
    labels = pairs.labels[in_test].astype(bool)
    features = pairs.features[in_test]
    # Buyers without any candidate still count (with zero hits), so the ranker is not flattered.
    order_users = list(buyer_rows)
    n_relevant = [len(bought[i]) for i in order_users]
    covered = {g: int(labels[s : s + n].sum()) for g, s, n in zip(group_ids, starts, sizes)}
    candidate_recall = float(sum(covered.values()) / max(sum(n_relevant), 1))
    progress(f"  ranking: {len(order_users):,} test buyers, candidates hold {candidate_recall:.1%} of the items they bought")

    def hits_for(score: np.ndarray | None) -> list[np.ndarray]:
        out = []
        spans = {g: (s, n) for g, s, n in zip(group_ids, starts, sizes)}
        for i in order_users:
            if i not in spans:
                out.append(np.zeros(0, dtype=bool))
                continue
            s, n = spans[i]
            flags = labels[s : s + n]
            out.append(flags if score is None else flags[np.argsort(-score[s : s + n], kind="stable")])
        return out

    tables: dict[str, pd.DataFrame] = {}
    ranker = models[RANKER_MODEL]
    for objective, booster in ranker.boosters.items():
        name = "lightgbm" if objective == ranker.objective else f"lightgbm_{objective}"
        tables[name if name == "lightgbm" else name] = metrics.ranking_from_hits(hits_for(booster.predict(features, num_iteration=booster.best_iteration)), n_relevant, K)
    tables["candidate_order_baseline"] = metrics.ranking_from_hits(hits_for(None), n_relevant, K)

    catalog = built.catalogs[test_cutoff]
    records = built.user_features.iloc[order_users].to_dict("records")
    history = baselines.purchase_history(settings.prepared_dir, [str(r["user_id"]) for r in records], test_cutoff.to_pydatetime())
    lists: dict[str, list[list[str]]] = {name: [] for name in baselines.RANKING_BASELINES}
    popular = baselines.global_popularity(catalog, K)
    for record in records:
        user = UserState.from_row(str(record["user_id"]), record, catalog)
        lists["global_popularity"].append(popular)
        lists["category_popularity"].append(baselines.category_popularity(user, catalog, K))
        lists["covisitation"].append(baselines.covisitation(user, catalog, K))
        lists["buy_again"].append(baselines.buy_again(history.get(user.user_id, []), catalog, K))
    relevant = [bought[i] for i in order_users]
    for name, ranked in lists.items():
        tables[f"{name}_baseline"] = metrics.ranking_metrics_per_user(ranked, relevant, K)
    result = {}
    for name, table in tables.items():
        ci = metrics.bootstrap_ci(table, n_boot=n_boot, seed=settings.training.seed)
        result[name] = {m: v[0] for m, v in ci.items()} | {f"{m}_ci_low": v[1] for m, v in ci.items()} | {f"{m}_ci_high": v[2] for m, v in ci.items()}
        result[name]["users"] = len(table)
    return result, candidate_recall, len(order_users)


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _write_report(target: Path, label: str, result: dict) -> None:
    info = result["info"]
    lines = [
        f"# Evaluation: {label}",
        "",
        f"- Dataset {info['dataset']} ({info['n_events']:,} events), horizon {info['horizon_days']} days",
        f"- Train cut-offs {info['train_window']['start'][:10]} .. {info['train_window']['end'][:10]}, validation "
        f"{info['validation_window']['start'][:10]} .. {info['validation_window']['end'][:10]}, test {info['test_window']['start'][:10]} (rebased dates)",
        f"- Early stopping, ranker objective choice, calibration and threshold: validation only; everything below is the test period",
        f"- User model calibration: {info['user_model']['calibration']}; ranker objective: {info['ranker']['objective']} "
        f"(validation NDCG@10 within candidates: "
        + ", ".join(f"{o} {v.get('ndcg_at_10', float('nan')):.3f}" for o, v in info["ranker"]["validation_selection"].items())
        + f"), calibrated with {info['ranker']['calibration']}",
        f"- Tuning: {info['tuning'] or 'off'}; fit time {info['fit_seconds']} s",
        f"- Reproduce: `{info['command']}`",
        "",
        f"## Propensity (test rows {info['test_rows']:,}, positive rate {info['test_positive_rate']:.3f}; threshold {info['threshold']:.3f} = best F1 on validation)",
        "",
        "| model | ROC-AUC (95% CI) | PR-AUC | log loss | Brier | ECE | precision | recall | F1 | lift top decile |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result["propensity"].items():
        ci = f" ({m['roc_auc_ci_low']:.3f}-{m['roc_auc_ci_high']:.3f})" if "roc_auc_ci_low" in m else ""
        lines.append(
            f"| {name} | {m['roc_auc']:.3f}{ci} | {m['pr_auc']:.3f} | {m['log_loss']:.4f} | {m['brier']:.4f} | {m['ece']:.4f} | "
            f"{m['precision_at_threshold']:.3f} | {m['recall_at_threshold']:.3f} | {m['f1_at_threshold']:.3f} | {m['lift_top_decile']:.2f} |"
        )
    lines += [
        "",
        f"## Ranking (@{K}, over {info['test_buyers_ranked']:,} users who bought in the test window; only purchased items count)",
        "",
        f"Candidate recall on test buyers: **{info['candidate_recall_test']:.1%}** of the items they bought were among the serving candidates; "
        "this bounds the ranker's recall (baselines rank the whole catalog).",
        "",
        f"| model | Recall@{K} (95% CI) | NDCG@{K} (95% CI) | HitRate@{K} | MRR@{K} |",
        "|---|---|---|---|---|",
    ]
    for name, m in result["ranking"].items():
        lines.append(
            f"| {name} | {m[f'recall_at_{K}']:.3f} ({m[f'recall_at_{K}_ci_low']:.3f}-{m[f'recall_at_{K}_ci_high']:.3f}) | "
            f"{m[f'ndcg_at_{K}']:.3f} ({m[f'ndcg_at_{K}_ci_low']:.3f}-{m[f'ndcg_at_{K}_ci_high']:.3f}) | {m[f'hit_rate_at_{K}']:.3f} | {m[f'mrr_at_{K}']:.3f} |"
        )
    lines += ["", "## Verdict", ""] + verdict(result) + [
        "",
        "## Plots",
        "",
        "![ROC and PR](roc_pr.png)",
        "![Calibration](calibration.png)",
        "![Lift by decile](lift.png)",
        "![Feature importance (gain)](importance.png)",
        "![SHAP summary (pred_contrib)](shap_summary.png)",
        "",
    ]
    (target / "report.md").write_text("\n".join(lines))


def verdict(result: dict) -> list[str]:
    """One line per baseline: does LightGBM beat it (propensity: ROC-AUC and log loss; ranking: NDCG@10 with CIs)?"""
    lines = []
    ours = result["propensity"]["lightgbm"]
    for name, m in result["propensity"].items():
        if name.endswith("_baseline"):
            better = ours["roc_auc"] > m["roc_auc"] and ours["log_loss"] < m["log_loss"]
            lines.append(f"- propensity vs {name}: {'beats' if better else 'does NOT beat'} it (ROC-AUC {ours['roc_auc']:.3f} vs {m['roc_auc']:.3f}, log loss {ours['log_loss']:.4f} vs {m['log_loss']:.4f})")
    ours = result["ranking"]["lightgbm"]
    key = f"ndcg_at_{K}"
    for name, m in result["ranking"].items():
        if name.endswith("_baseline"):
            if ours[f"{key}_ci_low"] > m[f"{key}_ci_high"]:
                word = "beats it (CIs do not overlap)"
            elif ours[key] > m[key]:
                word = "is ahead, but the CIs overlap"
            else:
                word = "does NOT beat it"
            lines.append(f"- ranking vs {name}: {word} (NDCG@{K} {ours[key]:.3f} vs {m[key]:.3f}, recall@{K} {ours[f'recall_at_{K}']:.3f} vs {m[f'recall_at_{K}']:.3f})")
    return lines


def _merge_metrics(out_dir: Path, label: str, result: dict) -> None:
    path = out_dir / "metrics.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged[label] = {**{name: m for name, m in result["propensity"].items()}, **{f"ranking/{name}": m for name, m in result["ranking"].items()}, "info": result["info"]}
    path.write_text(json.dumps(merged, indent=2, sort_keys=True, default=str))


def write_summary(out_dir: Path) -> Path:
    """README.md: the headline table (LightGBM vs each baseline) for every dataset in metrics.json."""
    merged = json.loads((out_dir / "metrics.json").read_text())
    lines = ["# Offline evaluation: headline results", "", "Test period only (the last cut-off); see each dataset's report for CIs, plots and settings.", ""]
    lines += ["## Propensity", "", "| dataset | model | ROC-AUC | PR-AUC | log loss | Brier | ECE |", "|---|---|---|---|---|---|---|"]
    for label, entry in sorted(merged.items()):
        for name, m in entry.items():
            if not name.startswith("ranking/") and name != "info":
                lines.append(f"| {label} | {name} | {m['roc_auc']:.3f} | {m['pr_auc']:.3f} | {m['log_loss']:.4f} | {m['brier']:.4f} | {m['ece']:.4f} |")
    lines += ["", f"## Ranking (@{K}, test buyers)", "", f"| dataset | model | Recall@{K} | NDCG@{K} | HitRate@{K} | MRR@{K} | candidate recall |", "|---|---|---|---|---|---|---|"]
    for label, entry in sorted(merged.items()):
        for name, m in entry.items():
            if name.startswith("ranking/"):
                lines.append(
                    f"| {label} | {name.removeprefix('ranking/')} | {m[f'recall_at_{K}']:.3f} | {m[f'ndcg_at_{K}']:.3f} | {m[f'hit_rate_at_{K}']:.3f} | "
                    f"{m[f'mrr_at_{K}']:.3f} | {entry['info']['candidate_recall_test']:.3f} |"
                )
    lines += ["", "## Reproduce", ""] + [f"- {label}: `{entry['info']['command']}`" for label, entry in sorted(merged.items())]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    """Entry point: settings come from the CLI's _settings(args)."""
    updates = {k: v for k, v in (("horizon_days", args.horizon_days), ("n_cutoffs", args.n_cutoffs)) if v}
    if updates:
        settings = settings.model_copy(update={"training": settings.training.model_copy(update=updates)})
    budget = TuningBudget(n_trials=args.trials, seconds=args.tuning_seconds, seed=settings.training.seed) if args.trials > 0 else None
    command = " ".join(shlex.quote(str(a)) for a in ["propensity", *sys.argv[1:]])  # exactly what was run
    evaluate(settings, Path(args.out).resolve(), args.label, budget, n_boot=args.bootstrap, command=command)
    return 0
