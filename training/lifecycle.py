"""Saved model versions scored on the same held-out period: the promotion gate and `propensity models compare`.

Both read the registry's versions as the server serves them (ModelBundle: calibrated propensities, raw ranker
scores for the order) on rows built the one way training builds them (training.train.build_training_data), so
two versions see exactly the same users, candidates and labels. Differences get paired bootstrap CIs from the
evaluation code (training.evaluation.comparison).

The held-out period is the latest test period of the data built now (the validation period when there is none).
A version whose training or validation window reaches into that period has seen its labels: that is reported,
and it flatters that version (for the gate: the current one, so the gate errs towards not promoting).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from propensity.model_registry import ModelBundle
from training import metrics
from training.evaluation.comparison import Comparison, compare_propensity, compare_rankings
from training.evaluation.ranking import K, BuyerCandidates, find_test_buyers

if TYPE_CHECKING:
    from propensity.settings import TrainingSettings
    from training.training_data import TrainingData

GATE_METRICS = ("ranker ndcg_at_10", "propensity log_loss")


@dataclass(frozen=True)
class HeldOutScores:
    """Every version's scores on one held-out period: propensity per test row, ranking metrics per test buyer."""

    period: list[str]
    y: np.ndarray
    propensity: dict[str, np.ndarray]
    ranking: dict[str, pd.DataFrame]

    def summary(self, version: str) -> dict[str, float]:
        y, p = self.y, self.propensity[version]
        return {
            "log_loss": metrics.clipped_log_loss(y, p),
            "roc_auc": metrics.fast_roc_auc(y, p) if len(np.unique(y)) == 2 else float("nan"),
            **{column: float(self.ranking[version][column].mean()) for column in self.ranking[version].columns},
            "rows": int(len(y)),
            "positives": int(y.sum()),
            "buyers": int(len(self.ranking[version])),
        }


def score_held_out(built: TrainingData, bundles: dict[str, ModelBundle]) -> HeldOutScores:
    """Score each bundle (by version) on built's test period (validation if there is no test period)."""
    periods = built.periods
    part = periods.test or periods.validation
    users = built.data.users
    _, valid, test = periods.masks(users)
    rows = test if periods.test else valid
    propensity = {version: np.asarray(b.predict_users(users.features[rows]), dtype=float) for version, b in bundles.items()}

    buyers = find_test_buyers(built) if periods.test else _validation_buyers(built)
    candidates = BuyerCandidates.of(built, buyers)  # the same rows and hit rule as `propensity evaluate`
    ranking = {}
    for version, bundle in bundles.items():
        raw = bundle.score_items(candidates.features).raw if len(candidates.features) else np.empty(0)
        ranking[version] = metrics.ranking_from_hits(candidates.hits(raw), candidates.n_relevant, K)
    return HeldOutScores([c.isoformat() for c in part], users.labels[rows], propensity, ranking)


def _validation_buyers(built: TrainingData):  # noqa: ANN202 - the same shape as find_test_buyers
    from dataclasses import replace

    return find_test_buyers(replace(built, periods=replace(built.periods, test=built.periods.validation)))


def compare_versions(scores: HeldOutScores, a: str, b: str, n_boot: int = 200, seed: int = 0) -> list[Comparison]:
    """a minus b on every propensity and ranking metric, with paired bootstrap 95 % CIs (same rows, same buyers)."""
    return [
        *compare_propensity(scores.y, scores.propensity, a, [b], n_boot, seed),
        *compare_rankings(scores.ranking, a, [b], n_boot, seed),
    ]


def leakage(metadata: dict, period: list[str]) -> str:
    """Why a version has seen the held-out labels ('' when it has not): its train or validation window reaches the period."""
    if not period:
        return ""
    start = pd.Timestamp(period[0])
    for name in ("train_window", "validation_window"):
        window = metadata.get(name) or {}
        if window.get("end") and pd.Timestamp(window["end"]) >= start:
            return f"its {name.replace('_', ' ')} ends {window['end'][:10]}, on or after the held-out period's start {period[0][:10]}"
    return ""


@dataclass
class GateDecision:
    """Whether a new version may replace the current one, and why."""

    passed: bool
    reasons: list[str]
    current: str | None = None
    period: list[str] = field(default_factory=list)
    new_metrics: dict[str, float] = field(default_factory=dict)
    current_metrics: dict[str, float] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def promotion_gate(built: TrainingData, new: ModelBundle, current: ModelBundle | None, settings: TrainingSettings) -> GateDecision:
    """Pass when `new` is at least as good as `current` on the held-out period, within settings' tolerances.

    Ranker NDCG@10 may drop by at most gate_ndcg_tolerance, propensity log loss may rise by at most
    gate_log_loss_tolerance (both absolute). No current version: pass.
    """
    tolerances = {"ndcg_at_10": settings.gate_ndcg_tolerance, "log_loss": settings.gate_log_loss_tolerance}
    if current is None:
        return GateDecision(True, ["no current version to compare with"], tolerances=tolerances)
    scores = score_held_out(built, {new.version: new, current.version: current})
    ours, theirs = scores.summary(new.version), scores.summary(current.version)
    reasons = []
    ndcg_drop = theirs["ndcg_at_10"] - ours["ndcg_at_10"]
    loss_rise = ours["log_loss"] - theirs["log_loss"]
    if ndcg_drop > tolerances["ndcg_at_10"]:
        reasons.append(f"ranker NDCG@10 {ours['ndcg_at_10']:.4f} < current {current.version}'s {theirs['ndcg_at_10']:.4f} "
                       f"by {ndcg_drop:.4f} (tolerance {tolerances['ndcg_at_10']:g})")
    if loss_rise > tolerances["log_loss"]:
        reasons.append(f"propensity log loss {ours['log_loss']:.4f} > current {current.version}'s {theirs['log_loss']:.4f} "
                       f"by {loss_rise:.4f} (tolerance {tolerances['log_loss']:g})")
    passed = not reasons
    if passed:
        reasons.append(f"NDCG@10 {ours['ndcg_at_10']:.4f} vs {theirs['ndcg_at_10']:.4f}, log loss {ours['log_loss']:.4f} vs "
                       f"{theirs['log_loss']:.4f} (current {current.version}): within tolerance")
    seen = leakage(current.metadata, scores.period)
    if seen:
        reasons.append(f"note: current {current.version} has seen the held-out labels ({seen})")
    return GateDecision(passed, reasons, current.version, scores.period, ours, theirs, tolerances)
