"""A training run's report: validation and test metrics as Markdown, ROC / feature-importance plots as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: CI and servers have no display
import matplotlib.pyplot as plt
import pandas as pd
from sklearn.metrics import roc_curve

from training.datasets import TrainingSet

if TYPE_CHECKING:
    from training.models import FittedModel
    from training.periods import Periods


def write_training_report(directory: Path, metadata: dict, models: dict[str, tuple[FittedModel, TrainingSet]], periods: Periods) -> Path:
    """Write report.md and report.png next to the model files; return the Markdown path."""
    fig, axes = plt.subplots(1, 1 + len(models), figsize=(6 * (1 + len(models)), 5))
    roc_axis = axes[0]
    window = lambda key: f"{metadata[key]['start']} .. {metadata[key]['end']}" if metadata.get(key) else "none"  # noqa: E731
    lines = [f"# Training report {metadata['version']}", ""]
    lines += [
        f"- Trained at {metadata['trained_at']}; horizon {metadata['horizon_days']} days",
        f"- Cut-offs: training {window('train_window')}; validation {window('validation_window')}; test {window('test_window')}",
        f"- Data: {metadata['data']['source']} ({metadata['data']['n_events']:,} events, fingerprint {metadata.get('data_fingerprint', {}).get('fingerprint')}), "
        f"shifted {metadata['data']['shift_days']:+d} days",
        f"- Feature services: {metadata['feature_services']['user']['name']}, {metadata['feature_services']['item']['name']}",
        "",
        "| model | metric | value |",
        "|---|---|---|",
    ]
    plot_mask = 2 if periods.test else 1  # ROC on test when there is a test period
    for axis, (name, (model, data)) in zip(axes[1:], models.items()):
        info = metadata["models"][name]
        lines.append(f"| {name} | objective / calibration | {info['objective']} / {info['calibration']['method']} |")
        for metric, value in info["metrics"].items():
            lines.append(f"| {name} | {metric} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {metric} | {value} |")
        mask = periods.masks(data)[plot_mask]
        fpr, tpr, _ = roc_curve(data.labels[mask], model.predict(data.features[mask]))
        auc = info["metrics"].get("test_auc" if plot_mask == 2 else "auc", float("nan"))
        roc_axis.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
        gain = pd.Series(model.booster.feature_importance("gain"), index=model.booster.feature_name()).sort_values().tail(15)
        axis.barh(gain.index, gain.to_numpy())
        axis.set_title(f"{name}: top features by gain")
    roc_axis.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    roc_axis.set_xlabel("false positive rate")
    roc_axis.set_ylabel("true positive rate")
    roc_axis.set_title(f"ROC on the {'test' if plot_mask == 2 else 'validation'} period")
    roc_axis.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(directory / "report.png", dpi=80)
    plt.close(fig)
    lines += ["", "![ROC and feature importance](report.png)", ""]
    path = directory / "report.md"
    path.write_text("\n".join(lines))
    return path
