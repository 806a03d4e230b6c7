"""The goals each dataset's evaluation is held to, met or short (issue 9).

- The ranker beats both recent-interaction heuristics on Recall@10 and NDCG@10, each difference
  a conclusive win (CI excludes 0, at least 100 test buyers).
- Where the shop has an oracle (the demo): the ranker's Recall@10 is at least 0.9 of the oracle's,
  and the user model's ROC-AUC is within 0.03 of the oracle's.
"""

from __future__ import annotations

from collections.abc import Sequence

from training.evaluation.comparison import WIN, metric_label, signed

HEURISTICS = ("recent_interactions_baseline", "recent_interactions_popularity_fill_baseline")
GOAL_METRICS = ("recall_at_10", "ndcg_at_10")
ORACLE_RECALL_FRACTION = 0.9
ORACLE_AUC_GAP = 0.03
RANKER = "lightgbm"


def dataset_goals(comparisons: Sequence[dict], oracle: dict) -> list[dict]:
    """One {"goal", "value", "met"} per goal that applies to this dataset (comparisons and oracle as in metrics.json)."""
    goals = []
    ranking = {(c["baseline"], c["metric"]): c for c in comparisons if c["task"] == "ranking" and c["model"] == RANKER}
    for heuristic in HEURISTICS:
        found = [ranking[(heuristic, m)] for m in GOAL_METRICS if (heuristic, m) in ranking]
        if len(found) < len(GOAL_METRICS):
            continue
        goals.append(
            {
                "goal": f"ranker beats {heuristic} on " + " and ".join(metric_label(m) for m in GOAL_METRICS) + " (CI excludes 0, >= 100 buyers)",
                "value": "; ".join(f"{metric_label(c['metric'])} {signed(c['difference'])} ({signed(c['ci_low'])} .. {signed(c['ci_high'])}), {c['verdict']}" for c in found),
                "met": all(c["verdict"] == WIN for c in found),
            }
        )
    if oracle.get("status") == "compared":
        fraction = oracle["fraction_of_oracle"][RANKER]["recall_at_10"]
        gap = oracle["user_auc"]["gap"]
        goals.append({"goal": f"ranker Recall@10 >= {ORACLE_RECALL_FRACTION} x oracle", "value": f"{fraction:.3f} x oracle", "met": bool(fraction >= ORACLE_RECALL_FRACTION)})
        goals.append({"goal": f"user AUC gap (oracle - model) <= {ORACLE_AUC_GAP}", "value": f"{gap:.3f}", "met": bool(gap <= ORACLE_AUC_GAP)})
    return goals

