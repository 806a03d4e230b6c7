"""Evaluation plots (PNG): ROC & PR, reliability, lift by decile, gain importance, SHAP summary from pred_contrib."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from training.metrics import gains_by_decile, reliability_curve
from training.models import FittedModel


def write_plots(target: Path, y: np.ndarray, scores: dict[str, np.ndarray], user_model: FittedModel, ranker: FittedModel, user_features: np.ndarray) -> None:
    _roc_pr(target / "roc_pr.png", y, scores)
    _calibration(target / "calibration.png", y, scores)
    _lift(target / "lift.png", y, scores)
    _importance(target / "importance.png", {"user_propensity": user_model, "item_ranker": ranker})
    _shap_summary(target / "shap_summary.png", user_model, user_features)


def _roc_pr(path: Path, y: np.ndarray, scores: dict[str, np.ndarray]) -> None:
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, p in scores.items():
        fpr, tpr, _ = roc_curve(y, p)
        roc.plot(fpr, tpr, label=name)
        precision, recall, _ = precision_recall_curve(y, p)
        pr.plot(recall, precision, label=name)
    roc.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    pr.axhline(y.mean(), color="k", linestyle="--", linewidth=0.8, label="base rate")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test period)")
    pr.set(xlabel="recall", ylabel="precision", title="Precision-recall (test period)")
    roc.legend(loc="lower right", fontsize=8)
    pr.legend(loc="upper right", fontsize=8)
    _save(fig, path)


def _calibration(path: Path, y: np.ndarray, scores: dict[str, np.ndarray]) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, p in scores.items():
        curve = reliability_curve(y, p)
        ax.plot(curve["predicted"], curve["observed"], marker="o", label=name)
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set(xlabel="mean predicted probability", ylabel="observed purchase rate", title="Reliability (test period, 10 bins)")
    ax.legend(fontsize=8)
    _save(fig, path)


def _lift(path: Path, y: np.ndarray, scores: dict[str, np.ndarray]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / len(scores)
    for j, (name, p) in enumerate(scores.items()):
        gains = gains_by_decile(y, p)
        ax.bar(gains["decile"] + (j - len(scores) / 2) * width, gains["lift"], width=width, label=name)
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set(xlabel="decile (1 = highest scores)", ylabel="lift over base rate", title="Lift by decile (test period)")
    ax.legend(fontsize=8)
    _save(fig, path)


def _importance(path: Path, models: dict[str, FittedModel]) -> None:
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5))
    for ax, (name, model) in zip(np.atleast_1d(axes), models.items()):
        gain = model.booster.feature_importance("gain")
        order = np.argsort(gain)[-15:]
        ax.barh(np.asarray(model.booster.feature_name())[order], gain[order])
        ax.set_title(f"{name}: top features by gain")
    _save(fig, path)


def _shap_summary(path: Path, model: FittedModel, features: np.ndarray, top: int = 12, max_rows: int = 3000) -> None:
    """Beeswarm-style summary: per feature, each row's contribution (log-odds) coloured by the feature's rank-scaled value."""
    rng = np.random.default_rng(0)
    rows = features if len(features) <= max_rows else features[rng.choice(len(features), max_rows, replace=False)]
    contrib = model.booster.predict(rows, pred_contrib=True, num_iteration=model.booster.best_iteration)[:, :-1]
    order = np.argsort(np.abs(contrib).mean(axis=0))[::-1][:top]
    names = np.asarray(model.booster.feature_name())
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * top + 1.5))
    for pos, j in enumerate(order[::-1]):
        values = rows[:, j]
        colour = np.full(len(values), 0.5)
        known = ~np.isnan(values)
        if known.sum() > 1:
            colour[known] = (np.argsort(np.argsort(values[known])) / (known.sum() - 1))
        jitter = rng.uniform(-0.3, 0.3, len(values))
        ax.scatter(contrib[:, j], pos + jitter, c=colour, cmap="coolwarm", s=4, alpha=0.6)
    ax.set_yticks(range(len(order)), names[order[::-1]])
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set(xlabel="contribution to log-odds (pred_contrib)", title="User model: SHAP summary (red = high value, grey = missing)")
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
