"""metrics.json (every evaluated dataset, merged across runs) and the README headline drawn from it.

The headline states only conclusive claims: a paired difference whose CI excludes 0 with at least
MIN_POSITIVES positives. Every other claim it would have made is listed as inconclusive, with why.
"""

from __future__ import annotations

import json
from pathlib import Path

from training.evaluation.comparison import INCONCLUSIVE, MIN_POSITIVES, metric_label, signed
from training.evaluation.goals import GOAL_METRICS, HEURISTICS
from training.evaluation.report import cell

METRICS_FILE = "metrics.json"


def merge_metrics(out_dir: Path, label: str, result: dict) -> Path:
    """Write result as metrics.json[label], keeping the other datasets' entries."""
    path = out_dir / METRICS_FILE
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged[label] = result
    path.write_text(json.dumps(merged, indent=2, sort_keys=True, default=str))
    return path


def headline_claims(entry: dict) -> list[dict]:
    """The claims a headline makes for one dataset: the model against the best baseline of every metric,
    and the ranker against each recent-interaction heuristic on the goal metrics."""
    claims = {(c["task"], c["metric"], c["baseline"]): c for c in entry["best_baseline"]}
    for c in entry["comparisons"]:
        if c["task"] == "ranking" and c["baseline"] in HEURISTICS and c["metric"] in GOAL_METRICS:
            claims.setdefault((c["task"], c["metric"], c["baseline"]), c)
    return list(claims.values())


def write_summary(out_dir: Path) -> Path:
    """README.md: goals, conclusive claims and inconclusive ones for every dataset in metrics.json."""
    merged = json.loads((out_dir / METRICS_FILE).read_text())
    current = {label: entry for label, entry in sorted(merged.items()) if "comparisons" in entry}
    stale = sorted(set(merged) - set(current))
    lines = [
        "# Offline evaluation: headline results",
        "",
        "Test period only. Every claim is a paired-bootstrap difference, model minus baseline (ranking: test buyers resampled; "
        "propensity: test rows resampled; the same draws for both arms), with its 95% CI. It is stated as a win or a loss only "
        f"when the CI excludes 0 and at least {MIN_POSITIVES} positives stand behind it (test buyers; positive rows); everything "
        "else is listed under Inconclusive. Each dataset's report.md has every comparison, the metric tables, plots and settings.",
        "",
        "## Datasets",
        "",
        "| dataset | test cut-offs | test rows (positive) | test buyers | candidate recall | oracle |",
        "|---|---|---|---|---|---|",
    ]
    for label, entry in current.items():
        info, oracle = entry["info"], entry["oracle"]
        lines.append(
            f"| [{label}]({label}/report.md) | {len(info['test_cutoffs'])} | {info['test_rows']:,} ({info['test_positive_rows']:,}) | "
            f"{info['test_buyers_ranked']:,} | {info['candidate_recall_test']:.3f} | {'compared' if oracle['status'] == 'compared' else 'none'} |"
        )
    lines += ["", "## Goals", "", "| dataset | goal | value | status |", "|---|---|---|---|"]
    for label, entry in current.items():
        lines += [f"| {label} | {g['goal']} | {g['value']} | {'met' if g['met'] else 'short'} |" for g in entry["goals"]]
    claims = [(label, c) for label, entry in current.items() for c in headline_claims(entry)]
    lines += [
        "",
        "## Conclusive",
        "",
        "The model against the best baseline of each metric, and the ranker against the recent-interaction heuristics.",
        "",
        "| dataset | task | metric | lightgbm versus | baseline | lightgbm | difference (95% CI), verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [_claim(label, c) + f" {cell(c)} |" for label, c in claims if c["verdict"] != INCONCLUSIVE] or ["| (none) | | | | | | |"]
    lines += [
        "",
        "## Inconclusive",
        "",
        "| dataset | task | metric | lightgbm versus | baseline | lightgbm | difference (95% CI) | why |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [_claim(label, c) + f" {cell(c, with_verdict=False)} | {c['reason']} |" for label, c in claims if c["verdict"] == INCONCLUSIVE] or [
        "| (none) | | | | | | | |"
    ]
    lines += fairness_summary(current)
    if stale:
        lines += ["", "## Not re-evaluated", "", "Evaluated before paired comparisons existed; re-run docs/evaluation/reproduce.sh: " + ", ".join(stale)]
    lines += ["", "## Reproduce", ""] + [f"- {label}: `{entry['info']['command']}`" for label, entry in sorted(merged.items())]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def fairness_summary(entries: dict[str, dict]) -> list[str]:
    """Per dataset and attribute: the largest ROC-AUC and selection-rate gaps, with and without the sensitive attributes (docs/fairness.md)."""
    rows = []
    for label, entry in entries.items():
        section = entry.get("fairness") or {}
        cost = {c["metric"]: c for c in section.get("exclusion_cost", [])}
        auc_cost = f"{cell(cost['roc_auc'], with_verdict=False)}" if "roc_auc" in cost else "not compared"
        for attribute, arms in section.get("attributes", {}).items():
            gaps = [fairness_gap(arms.get(arm, {}).get("gaps", {}).get(m)) for arm in ("configured", "minimised") for m in ("roc_auc", "selection_rate")]
            rows.append(f"| {label} | {attribute} | " + " | ".join(gaps) + f" | {auc_cost} |")
    if not rows:
        return []
    return [
        "",
        "## Fairness",
        "",
        "Largest gap between segments (highest minus lowest, 95% CI of that pair; chosen after looking), for the configured models "
        "and for models refitted without training.sensitive_attributes; the last column is the ROC-AUC cost of excluding them "
        "(minimised minus configured, paired bootstrap). Every segment's figures are in the dataset's report.md.",
        "",
        "| dataset | attribute | ROC-AUC gap | selection-rate gap | ROC-AUC gap, minimised | selection-rate gap, minimised | ROC-AUC, minimised minus configured |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


def fairness_gap(gap: dict | None) -> str:
    return "n/a" if not gap else f"{gap['gap']:.3f} ({signed(gap['ci_low'])} .. {signed(gap['ci_high'])}) {gap['high']} vs {gap['low']}"


def _claim(label: str, c: dict) -> str:
    return (
        f"| {label} | {c['task']} | {metric_label(c['metric'])} | {c['baseline']} | {c['baseline_value']:.4f} | "
        f"{c['model_value']:.4f} |"
    )
