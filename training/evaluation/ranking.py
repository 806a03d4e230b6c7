"""Per-test-buyer ranking tables: the ranker (each objective), candidate order and every ranking baseline.

Test buyers are entity rows at a test cut-off with a purchase in the horizon, pooled over the
test cut-offs (a user buying after two cut-offs counts twice). Only purchased items count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from propensity.user_state import UserState
from training import baselines, metrics
from training.boosters import group_sizes
from training.models import FittedModel

if TYPE_CHECKING:
    from training.training_data import TrainingData

K = 10
MODEL = "lightgbm"  # the ranker with the objective chosen on validation, as served


@dataclass(frozen=True)
class RankedBuyers:
    """The ranked users: entity rows, ids, cut-offs and the items each bought in the horizon, in one order."""

    row_ids: np.ndarray
    user_ids: list[str]
    cutoffs: pd.DatetimeIndex  # UTC
    relevant: list[set[str]]

    def at(self, cutoff: pd.Timestamp) -> np.ndarray:
        return np.asarray(self.cutoffs == cutoff)


@dataclass(frozen=True)
class RankingTables:
    buyers: RankedBuyers
    tables: dict[str, pd.DataFrame]  # per model or baseline: one row per test buyer (recall/ndcg/hit rate/mrr @K)
    candidate_recall: float  # share of the bought items that were among the candidates
    without_candidates: int  # test buyers with no ranker rows (they count with zero hits)

    @property
    def baselines(self) -> list[str]:
        return [name for name in self.tables if name.endswith("_baseline")]


@dataclass(frozen=True)
class BuyerCandidates:
    """The candidate (user, item) rows of some buyers, contiguous per buyer, with what each buyer bought."""

    row_ids: np.ndarray  # the buyers, in report order
    labels: np.ndarray  # bool per candidate row: bought in the label window
    features: np.ndarray  # ranker input per candidate row
    spans: dict[int, tuple[int, int]]  # buyer row id -> (first candidate row, number of candidates)
    n_relevant: list[int]  # items each buyer bought (candidates or not)

    @classmethod
    def of(cls, built: TrainingData, buyers: RankedBuyers) -> BuyerCandidates:
        pairs = built.data.pairs
        inside = np.isin(pairs.groups, buyers.row_ids)
        groups = pairs.groups[inside]
        sizes = group_sizes(groups)
        starts = np.r_[0, np.cumsum(sizes)[:-1]].astype(int)
        spans = {int(groups[s]): (s, n) for s, n in zip(starts, sizes)}
        return cls(buyers.row_ids, pairs.labels[inside].astype(bool), pairs.features[inside], spans, [len(r) for r in buyers.relevant])

    def hits(self, score: np.ndarray | None) -> list[np.ndarray]:
        """Per buyer, the bought flags of its candidates in score order (candidate order for None). Buyers without
        any candidate still count, with zero hits, so a ranker is not flattered."""
        out = []
        for i in self.row_ids:
            s, n = self.spans.get(int(i), (0, 0))
            flags = self.labels[s : s + n]
            out.append(flags if score is None else flags[np.argsort(-score[s : s + n], kind="stable")])
        return out


def find_test_buyers(built: TrainingData) -> RankedBuyers:
    """Every buyer row at a test cut-off, in entity-row order."""
    rows = built.rows
    cutoffs = pd.DatetimeIndex(pd.to_datetime(rows["event_timestamp"], utc=True))
    test = cutoffs.isin(pd.DatetimeIndex(pd.to_datetime(built.periods.test, utc=True)))
    row_ids = np.flatnonzero(test & (rows["label"].to_numpy() == 1))
    return RankedBuyers(
        row_ids=row_ids,
        user_ids=rows["user_id"].astype(str).to_numpy()[row_ids].tolist(),
        cutoffs=cutoffs[row_ids],
        relevant=[set(map(str, rows.at[i, "bought_items"])) for i in row_ids],
    )


def rank_test_buyers(built: TrainingData, ranker: FittedModel, prepared_dir: Path, progress: Callable[[str], None] = print) -> RankingTables:
    """Ranking metrics per test buyer for the ranker's raw scores (each objective), candidate order and the baselines."""
    buyers = find_test_buyers(built)
    candidates = BuyerCandidates.of(built, buyers)
    features, n_relevant = candidates.features, candidates.n_relevant
    covered = sum(int(candidates.labels[s : s + n].sum()) for s, n in candidates.spans.values())
    candidate_recall = covered / max(sum(n_relevant), 1)
    without = sum(int(i) not in candidates.spans for i in buyers.row_ids)
    progress(
        f"  ranking: {len(buyers.row_ids):,} test buyers over {len(built.periods.test)} test cut-off(s), "
        f"candidates hold {candidate_recall:.1%} of the items they bought"
    )

    tables: dict[str, pd.DataFrame] = {}
    for objective, booster in ranker.boosters.items():
        # The raw booster score orders the served list (the calibrated probability is monotone in it).
        name = MODEL if objective == ranker.objective else f"{MODEL}_{objective}"
        raw = np.asarray(booster.predict(features, num_iteration=booster.best_iteration)) if len(features) else np.empty(0)
        tables[name] = metrics.ranking_from_hits(candidates.hits(raw), n_relevant, K)
    tables["candidate_order_baseline"] = metrics.ranking_from_hits(candidates.hits(None), n_relevant, K)
    for name, ranked in baseline_lists(built, buyers, prepared_dir).items():
        tables[f"{name}_baseline"] = metrics.ranking_metrics_per_user(ranked, buyers.relevant, K)
    return RankingTables(buyers, tables, float(candidate_recall), int(without))


def baseline_lists(built: TrainingData, buyers: RankedBuyers, prepared_dir: Path) -> dict[str, list[list[str]]]:
    """Each ranking baseline's top-K list per test buyer, from the user's state and the catalog at the buyer's cut-off."""
    lists: dict[str, list[list[str]]] = {name: [None] * len(buyers.row_ids) for name in baselines.RANKING_BASELINES}  # type: ignore[list-item]
    records = built.user_features.iloc[buyers.row_ids].to_dict("records")
    for cutoff in buyers.cutoffs.unique():
        catalog = built.catalogs[pd.Timestamp(cutoff)]
        positions = np.flatnonzero(buyers.at(cutoff))
        history = baselines.purchase_history(prepared_dir, [buyers.user_ids[j] for j in positions], cutoff.to_pydatetime())
        popular = baselines.global_popularity(catalog, K)
        for j in positions:
            user = UserState.from_row(buyers.user_ids[j], records[j], catalog)
            lists["global_popularity"][j] = popular
            lists["category_popularity"][j] = baselines.category_popularity(user, catalog, K)
            lists["covisitation"][j] = baselines.covisitation(user, catalog, K)
            lists["buy_again"][j] = baselines.buy_again(history.get(user.user_id, []), catalog, K)
            lists["recent_interactions"][j] = baselines.recent_interactions(user, catalog, K)
            lists["recent_interactions_popularity_fill"][j] = baselines.recent_interactions_popularity_fill(user, catalog, K)
    return lists


def summarise(tables: dict[str, pd.DataFrame], n_boot: int, seed: int) -> dict[str, dict[str, float]]:
    """Mean of every column per model with its (unpaired) bootstrap CI, and the number of users."""
    result = {}
    for name, table in tables.items():
        ci = metrics.bootstrap_ci(table, n_boot=n_boot, seed=seed)
        result[name] = {m: v[0] for m, v in ci.items()} | {f"{m}_ci_low": v[1] for m, v in ci.items()} | {f"{m}_ci_high": v[2] for m, v in ci.items()}
        result[name]["users"] = len(table)
    return result
