"""One dataset's report.md: settings, metric tables, paired comparisons with verdicts, goals, oracle, plots."""

from __future__ import annotations

from pathlib import Path

from training.evaluation.comparison import MIN_POSITIVES, metric_label, signed
from training.evaluation.fairness import report_lines as fairness_lines

K = 10
RANKING_METRICS = (f"recall_at_{K}", f"ndcg_at_{K}", f"hit_rate_at_{K}", f"mrr_at_{K}")
PROPENSITY_METRICS = ("roc_auc", "pr_auc", "log_loss")


def write_report(target: Path, label: str, result: dict) -> Path:
    """<target>/report.md from the result evaluate() merges into metrics.json."""
    lines = [f"# Evaluation: {label}", ""]
    lines += _settings(result["info"])
    lines += _propensity(result)
    lines += _ranking(result)
    lines += _comparisons(result)
    lines += ["", "## Goals", ""] + [f"- {'met' if g['met'] else 'SHORT'}: {g['goal']} ({g['value']})" for g in result["goals"]]
    if not result["goals"]:
        lines.append("- none applies (no heuristic comparison recorded)")
    lines += _oracle(result["oracle"])
    if "fairness" in result:
        lines += fairness_lines(result["fairness"])
    lines += [
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
    path = target / "report.md"
    path.write_text("\n".join(lines))
    return path


def cell(c: dict, with_verdict: bool = True) -> str:
    """A comparison as '+0.012 (+0.004 .. +0.020) **win**' (wins and losses in bold)."""
    text = f"{signed(c['difference'])} ({signed(c['ci_low'])} .. {signed(c['ci_high'])})"
    if not with_verdict:
        return text
    return text + (f" **{c['verdict']}**" if c["verdict"] != "inconclusive" else " inconclusive")


def _settings(info: dict) -> list[str]:
    test = ", ".join(c[:10] for c in info["test_cutoffs"])
    return [
        f"- Dataset {info['dataset']} ({info['n_events']:,} events), horizon {info['horizon_days']} days",
        f"- Train cut-offs {info['train_window']['start'][:10]} .. {info['train_window']['end'][:10]}, validation "
        f"{info['validation_window']['start'][:10]} .. {info['validation_window']['end'][:10]}, "
        f"test {test} ({len(info['test_cutoffs'])} cut-off(s), pooled: a user at two cut-offs counts twice; rebased dates)",
        "- Early stopping, ranker objective choice, calibration and threshold: validation only; everything below is the test period",
        f"- User model calibration: {info['user_model']['calibration']}; ranker objective: {info['ranker']['objective']} "
        "(validation NDCG@10 within candidates: "
        + ", ".join(f"{o} {v.get('ndcg_at_10', float('nan')):.3f}" for o, v in info["ranker"]["validation_selection"].items())
        + f"), calibrated with {info['ranker']['calibration']}; the ranker is evaluated by its raw score, which orders the served list",
        f"- Tuning: {info['tuning'] or 'off'}; fit time {info['fit_seconds']} s",
        f"- Reproduce: `{info['command']}`",
    ]


def _propensity(result: dict) -> list[str]:
    info = result["info"]
    lines = [
        "",
        f"## Propensity (test rows {info['test_rows']:,}, {info['test_positive_rows']:,} positive, rate {info['test_positive_rate']:.3f}; "
        f"threshold {info['threshold']:.3f} = best F1 on validation)",
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
    return lines


def _ranking(result: dict) -> list[str]:
    info = result["info"]
    lines = [
        "",
        f"## Ranking (@{K}, over {info['test_buyers_ranked']:,} users who bought in the test window; only purchased items count)",
        "",
        f"Candidate recall on test buyers: **{info['candidate_recall_test']:.1%}** of the items they bought were among the serving candidates; "
        f"this bounds the ranker's recall (baselines rank the whole catalog). {info['test_buyers_without_candidates']:,} test buyers "
        "had no ranker rows and count with zero hits for the ranker. recent_interactions lists only items the user touched, "
        "so it may recommend fewer than 10.",
        "",
        f"| model | Recall@{K} (95% CI) | NDCG@{K} (95% CI) | HitRate@{K} | MRR@{K} |",
        "|---|---|---|---|---|",
    ]
    for name, m in result["ranking"].items():
        lines.append(
            f"| {name} | {m[f'recall_at_{K}']:.3f} ({m[f'recall_at_{K}_ci_low']:.3f}-{m[f'recall_at_{K}_ci_high']:.3f}) | "
            f"{m[f'ndcg_at_{K}']:.3f} ({m[f'ndcg_at_{K}_ci_low']:.3f}-{m[f'ndcg_at_{K}_ci_high']:.3f}) | {m[f'hit_rate_at_{K}']:.3f} | {m[f'mrr_at_{K}']:.3f} |"
        )
    return lines


def _comparisons(result: dict) -> list[str]:
    info = result["info"]
    by_key = {(c["task"], c["baseline"], c["metric"]): c for c in result["comparisons"]}
    lines = [
        "",
        f"## Model versus baselines (paired bootstrap, {info['bootstrap']} resamples, 95% CI)",
        "",
        "Each cell: model minus baseline, its 95% CI, and the verdict. Ranking resamples test buyers, propensity resamples test "
        "rows, with the same draws for both arms. A verdict is a win or a loss only when the CI excludes 0 and at least "
        f"{MIN_POSITIVES} positives stand behind it (test buyers; positive rows); otherwise it is inconclusive. "
        "Log loss: lower is better, so a negative difference is a win.",
    ]
    for task, metrics, model, positives in (
        ("ranking", RANKING_METRICS, "lightgbm (raw ranker score)", f"{info['test_buyers_ranked']:,} test buyers"),
        ("propensity", PROPENSITY_METRICS, "lightgbm (calibrated, as served)", f"{info['test_positive_rows']:,} positive rows"),
    ):
        baselines = list(dict.fromkeys(b for t, b, _ in by_key if t == task))
        lines += ["", f"### {task.capitalize()}: {model} versus each baseline ({positives})", ""]
        lines += ["| baseline | " + " | ".join(metric_label(m) for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for baseline in baselines:
            lines.append(f"| {baseline} | " + " | ".join(cell(by_key[(task, baseline, m)]) if (task, baseline, m) in by_key else "" for m in metrics) + " |")
    lines += [
        "",
        "### Against the best baseline of each metric (highest point value; lowest for log loss)",
        "",
        "| task | metric | best baseline | baseline | lightgbm | difference (95% CI), verdict | why inconclusive |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result["best_baseline"]:
        lines.append(
            f"| {c['task']} | {metric_label(c['metric'])} | {c['baseline']} | {c['baseline_value']:.4f} | {c['model_value']:.4f} | {cell(c)} | {c['reason']} |"
        )
    return lines


def _oracle(oracle: dict) -> list[str]:
    lines = ["", "## Oracle (the demo generator's true purchase probabilities)", ""]
    if oracle["status"] != "compared":
        return lines + [f"No oracle comparison: {oracle['reason']}."]
    keys = (f"recall_at_{K}", f"ndcg_at_{K}")
    auc = oracle["user_auc"]
    lines += [
        f"At the test cut-off {oracle['cutoff'][:16]} ({oracle['test_buyers']:,} test buyers, {oracle['test_rows']:,} test rows; "
        f"oracle {oracle['directory']}, replicates {oracle['replicates']}). The oracle ranks each buyer's items by true p_buy "
        f"(ties by item id): Recall@{K} **{oracle['oracle'][keys[0]]:.3f}**, NDCG@{K} **{oracle['oracle'][keys[1]]:.3f}**.",
        "",
        f"| model | Recall@{K} | fraction of oracle | NDCG@{K} | fraction of oracle |",
        "|---|---|---|---|---|",
    ]
    for name, values in oracle["values"].items():
        fraction = oracle["fraction_of_oracle"][name]
        lines.append(f"| {name} | {values[keys[0]]:.3f} | {fraction[keys[0]]:.3f} | {values[keys[1]]:.3f} | {fraction[keys[1]]:.3f} |")
    lines += [
        "",
        f"User ROC-AUC on the same test rows: oracle **{auc['oracle']:.3f}**, model {auc['model']:.3f}; "
        f"user AUC gap (oracle minus model) **{auc['gap']:.3f}**"
        + (f"; {oracle['users_not_in_oracle']} test users are not in the oracle (scored 0)" if oracle["users_not_in_oracle"] else "")
        + ".",
    ]
    return lines
