"""Why the served ranker lost to "cart first, then recently viewed": each suspect switched on alone, on the test buyers.

Run from the repository root on a work dir built by `propensity run` (reproduce.sh does):

    .venv/bin/python docs/evaluation/why_the_ranker_lost.py --work-dir W/var --feature-repo W/feature_repo --out docs/evaluation/findings.json

Fits both objectives exactly as `propensity train` does (training periods only), then scores the test
cut-off's buyers under each variant. Findings and numbers: docs/evaluation/findings.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from propensity.model_registry import RANKER_MODEL, apply_calibration
from propensity.settings import Settings
from training import baselines, metrics
from training.boosters import group_sizes
from training.calibration import fit_calibration
from training.evaluation.ranking import find_test_buyers
from training.prepare import load_prepared
from training.training_data import build_training_data
from training.train import fit_models

K = 10
_IN_CART = "ui_in_cart"


def old_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The server's top-k before this change: argpartition on the calibrated score, so ties fall anywhere."""
    if len(scores) <= k:
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--feature-repo", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    settings = Settings(work_dir=Path(args.work_dir).resolve(), feature_repo=Path(args.feature_repo).resolve())
    built = build_training_data(settings, load_prepared(settings.prepared_dir))
    ranker = fit_models(settings, built, None)[RANKER_MODEL]
    buyers = find_test_buyers(built)
    pairs = built.data.pairs
    train, valid, _ = built.periods.masks(pairs)
    in_test = np.isin(pairs.groups, buyers.row_ids)
    groups, labels, x = pairs.groups[in_test], pairs.labels[in_test].astype(bool), pairs.features[in_test]
    starts = np.r_[0, np.cumsum(group_sizes(groups))[:-1]].astype(int)
    spans = {int(groups[s]): (s, n) for s, n in zip(starts, group_sizes(groups))}
    names = list(ranker.booster.feature_name())
    n_relevant = [len(r) for r in buyers.relevant]

    def table(order_of) -> dict[str, float]:
        hits = []
        for i in buyers.row_ids:
            s, n = spans.get(int(i), (0, 0))
            hits.append(labels[s : s + n][order_of(s, n)] if n else np.zeros(0, dtype=bool))
        frame = metrics.ranking_from_hits(hits, n_relevant, K)
        return {c: round(float(frame[c].mean()), 4) for c in (f"recall_at_{K}", f"ndcg_at_{K}")}

    results: dict[str, dict[str, float]] = {}
    for objective, booster in ranker.boosters.items():
        raw = booster.predict(x, num_iteration=booster.best_iteration)
        results[f"{objective}: raw score (served now)"] = table(lambda s, n, r=raw: np.argsort(-r[s : s + n], kind="stable"))
        # The old server ranked by the calibrated score; an isotonic map is a step function.
        raw_valid = booster.predict(pairs.features[valid], num_iteration=booster.best_iteration)
        iso = fit_calibration(pairs.labels[valid], raw_valid, "isotonic", raw=objective == "lambdarank")
        calibrated = apply_calibration(iso, raw)
        results[f"{objective}: isotonic-calibrated score, old top-k (ties anywhere)"] = table(lambda s, n, c=calibrated: old_top_k(c[s : s + n], K))
        tied = [len(np.unique(calibrated[s : s + n][old_top_k(calibrated[s : s + n], K)])) for s, n in spans.values()]
        results[f"{objective}: isotonic-calibrated score, old top-k (ties anywhere)"]["distinct_scores_in_top_10"] = round(float(np.mean(tied)), 2)
    # The old default business rule: items bought within 30 days removed before ranking.
    raw = ranker.booster.predict(x, num_iteration=ranker.booster.best_iteration)
    bought_recently = (x[:, names.index("ui_purchases_30d")] > 0) & (x[:, names.index("ui_days_since_last")] <= 30)
    removed = np.where(bought_recently, -np.inf, raw)
    results["chosen objective + 30-day repurchase rule (old default)"] = table(lambda s, n: np.argsort(-removed[s : s + n], kind="stable"))
    results["share of bought test items the 30-day rule removes"] = {"share": round(float(bought_recently[labels].mean()), 4)}
    # The heuristic itself, on the same candidates: in cart by recency, then the rest by recency.
    in_cart, rank = x[:, names.index(_IN_CART)], x[:, names.index("ui_recent_rank")]
    heuristic = np.where(in_cart > 0, 1e6, 0) - np.nan_to_num(rank, nan=1e3)
    results["heuristic order on the same candidates"] = table(lambda s, n: np.argsort(-heuristic[s : s + n], kind="stable"))
    # Negatives: the share of ranker rows from users who bought nothing (they only add negatives).
    buyers_rows = np.isin(pairs.groups[train], np.flatnonzero(built.rows["label"].to_numpy() == 1))
    results["training rows"] = {"rows": int(train.sum()), "share_from_non_buyers": round(float(1 - buyers_rows.mean()), 4),
                                "positive_rate": round(float(pairs.labels[train].mean()), 5)}
    importance = dict(zip(names, ranker.booster.feature_importance("gain")))
    results["chosen objective"] = {"objective": ranker.objective, "gain_share_ui_in_cart": round(importance[_IN_CART] / sum(importance.values()), 4)}
    Path(args.out).write_text(json.dumps(results, indent=2))
    for name, values in results.items():
        print(f"{name}: {values}")


if __name__ == "__main__":
    main()
