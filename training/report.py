"""A training run's report: validation metrics as Markdown and ROC / feature-importance plots as PNG."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import matplotlib

matplotlib.use("Agg")  # headless: CI and servers have no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from training.datasets import TrainingSet


def write_training_report(directory: Path, metadata: dict, models: dict[str, tuple[lgb.Booster, TrainingSet]], validation_from: np.datetime64) -> Path:
    """Write report.md and report.png next to the model files; return the Markdown path."""
    fig, axes = plt.subplots(1, 1 + len(models), figsize=(6 * (1 + len(models)), 5))
    roc_axis = axes[0]
    lines = [f"# Training report {metadata['version']}", ""]
    lines += [
        f"- Trained at {metadata['trained_at']}; horizon {metadata['horizon_days']} days",
        f"- Training cut-offs {metadata['train_window']['start']} .. {metadata['train_window']['end']}; "
        f"validation {metadata['validation_window']['start']} .. {metadata['validation_window']['end']}",
        f"- Data: {metadata['data']['source']} ({metadata['data']['n_events']:,} events), shifted {metadata['data']['shift_days']:+d} days",
        f"- Feature services: {metadata['feature_services']['user']['name']}, {metadata['feature_services']['item']['name']}",
        "",
        "| model | metric | validation |",
        "|---|---|---|",
    ]
    for axis, (name, (booster, data)) in zip(axes[1:], models.items()):
        for metric, value in metadata["models"][name]["metrics"].items():
            lines.append(f"| {name} | {metric} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {metric} | {value} |")
        cut = pd.DatetimeIndex(data.cutoffs).tz_convert(None).to_numpy()
        valid = cut >= validation_from
        scores = booster.predict(data.features[valid], num_iteration=booster.best_iteration)
        fpr, tpr, _ = roc_curve(data.labels[valid], scores)
        roc_axis.plot(fpr, tpr, label=f"{name} (AUC {metadata['models'][name]['metrics']['auc']:.3f})")
        gain = pd.Series(booster.feature_importance("gain"), index=booster.feature_name()).sort_values().tail(15)
        axis.barh(gain.index, gain.to_numpy())
        axis.set_title(f"{name}: top features by gain")
    roc_axis.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    roc_axis.set_xlabel("false positive rate")
    roc_axis.set_ylabel("true positive rate")
    roc_axis.set_title("ROC on the validation cut-off")
    roc_axis.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(directory / "report.png", dpi=80)
    plt.close(fig)
    lines += ["", "![ROC and feature importance](report.png)", ""]
    path = directory / "report.md"
    path.write_text("\n".join(lines))
    return path
