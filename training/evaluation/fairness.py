"""Fairness per user segment (gender, age band, region), for the configured models and for models trained without the sensitive attributes.

Per segment of each attribute the users file has: the user model's ROC-AUC, calibration (ECE) and selection
rate at the report's threshold, each with a bootstrap CI (the segment's test rows resampled), the largest gap
between segments (with the CI of that pair's difference), and the ranker's exposure: the share of top-K slots
going to each item-popularity decile. The same figures for models fitted exactly as training does on the
minimised user feature service (training.sensitive_attributes left out) stand beside them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from propensity.assembly import RANKER_FEATURES
from propensity.model_registry import RANKER_MODEL, USER_MODEL
from training import metrics
from training.evaluation.comparison import compare_propensity, signed

if TYPE_CHECKING:
    from propensity.settings import Settings
    from training.models import FittedModel
    from training.periods import Periods
    from training.prepare import PreparedData
    from training.training_data import TrainingData
    from training.tuning import TuningBudget

K = 10
DECILES = 10
ATTRIBUTES = ("gender", "age", "region")  # age is reported in bands
AGE_BANDS = ((25, "18-24"), (35, "25-34"), (45, "35-44"), (55, "45-54"), (65, "55-64"), (np.inf, "65+"))
MAX_SEGMENTS = 8  # per attribute: the largest 7 and "other" (UCI has 37 countries)
MIN_ROWS = 30  # a segment smaller than this is listed but left out of the gaps
MIN_CLASS = 5  # ROC-AUC of a segment needs this many rows of each class
GAP_METRICS = ("roc_auc", "ece", "selection_rate")
CONFIGURED, MINIMISED = "configured", "minimised"
UNKNOWN = "unknown"
OTHER = "other"


@dataclass(frozen=True)
class Arm:
    """One pair of models on the test period: calibrated propensity per test row, popularity deciles of each test user's top-K."""

    service: str
    p: np.ndarray  # per test row (entity-row order)
    group_rows: np.ndarray  # entity row id of each ranked test user
    deciles: np.ndarray  # (users, K): 0 = most popular tenth of the catalog .. 9, -1 for an empty slot


def user_segments(prepared_dir: Path, user_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """Segment label per user for each attribute with a known value (age as bands; small segments pooled as 'other')."""
    path = prepared_dir / "users.parquet"
    if not path.exists():
        return {}
    columns = [c for c in ATTRIBUTES if c in pq.read_schema(path).names]
    users = pd.read_parquet(path, columns=["user_id", *columns]).drop_duplicates("user_id").set_index("user_id")
    users.index = users.index.astype(str)
    frame = users.reindex(pd.Index([str(u) for u in user_ids]))
    out = {}
    for name in columns:
        values = frame[name]
        if values.notna().sum() == 0:
            continue
        if name == "age":
            ages = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
            labels = np.full(len(ages), UNKNOWN, dtype=object)
            low = -np.inf
            for high, band in AGE_BANDS:
                labels[(ages >= low) & (ages < high)] = band
                low = high
            out["age_band"] = labels
        else:
            out[name] = pool_small(values.astype(object).where(values.notna(), UNKNOWN).astype(str).to_numpy(dtype=object))
    return out


def pool_small(labels: np.ndarray, max_segments: int = MAX_SEGMENTS) -> np.ndarray:
    """Keep the max_segments - 1 largest segments, the rest become 'other' (no change when there are few)."""
    counts = pd.Series(labels).value_counts()
    if len(counts) <= max_segments:
        return labels
    keep = set(counts.index[: max_segments - 1])
    return np.array([v if v in keep else OTHER for v in labels], dtype=object)


def _ece_fast(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """metrics.expected_calibration_error, vectorised (called in every bootstrap resample)."""
    idx = np.minimum((p * bins).astype(int), bins - 1)
    n = np.bincount(idx, minlength=bins)
    gap = np.abs(np.bincount(idx, weights=y, minlength=bins) - np.bincount(idx, weights=p, minlength=bins))
    return float(gap.sum() / max(n.sum(), 1))


def _segment_values(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    auc = metrics.fast_roc_auc(y, p) if min(int(y.sum()), int(len(y) - y.sum())) >= MIN_CLASS else np.nan
    return {"roc_auc": auc, "ece": _ece_fast(y, p), "selection_rate": float(np.mean(p >= threshold)) if len(p) else np.nan}


def segment_metrics(
    y: np.ndarray, p: np.ndarray, threshold: float, labels: np.ndarray, n_boot: int = 200, seed: int = 0
) -> tuple[dict[str, dict], dict[str, dict[str, np.ndarray]]]:
    """Per segment: rows, positives, base rate, ROC-AUC, ECE and selection rate at threshold, each with a 95% bootstrap CI.

    Also returns each segment's bootstrap draws (segment -> metric -> n_boot values), for the CIs of gaps.
    A segment's rows are resampled within it; ROC-AUC is NaN when a segment has fewer than MIN_CLASS of a class.
    """
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    table, draws = {}, {}
    for k, segment in enumerate(sorted(set(labels), key=str)):
        mask = labels == segment
        ys, ps = y[mask], p[mask]
        values = _segment_values(ys, ps, threshold)
        rng = np.random.default_rng(seed + k)
        boot = {m: np.full(n_boot, np.nan) for m in GAP_METRICS}
        for b in range(n_boot):
            idx = rng.integers(0, len(ys), len(ys))
            for m, v in _segment_values(ys[idx], ps[idx], threshold).items():
                boot[m][b] = v
        row: dict[str, float] = {"rows": int(mask.sum()), "positives": int(ys.sum()), "positive_rate": float(ys.mean())}
        for m, v in values.items():
            finite = boot[m][np.isfinite(boot[m])]
            row[m] = v
            row[f"{m}_ci_low"], row[f"{m}_ci_high"] = (
                (float(np.quantile(finite, 0.025)), float(np.quantile(finite, 0.975))) if len(finite) and np.isfinite(v) else (np.nan, np.nan)
            )
        table[str(segment)] = row
        draws[str(segment)] = boot
    return table, draws


def largest_gaps(table: Mapping[str, dict], draws: Mapping[str, dict[str, np.ndarray]]) -> dict[str, dict]:
    """Per metric: the highest minus the lowest segment (segments of >= MIN_ROWS rows with a value), with the CI of that difference."""
    gaps = {}
    for m in GAP_METRICS:
        eligible = {s: r[m] for s, r in table.items() if r["rows"] >= MIN_ROWS and s not in (UNKNOWN,) and np.isfinite(r[m])}
        if len(eligible) < 2:
            gaps[m] = None
            continue
        high, low = max(eligible, key=eligible.get), min(eligible, key=eligible.get)
        diff = draws[high][m] - draws[low][m]
        diff = diff[np.isfinite(diff)]
        ci = (float(np.quantile(diff, 0.025)), float(np.quantile(diff, 0.975))) if len(diff) else (np.nan, np.nan)
        gaps[m] = {"gap": float(eligible[high] - eligible[low]), "ci_low": ci[0], "ci_high": ci[1], "high": high, "low": low}
        if m == "selection_rate":
            gaps[m]["ratio"] = float(eligible[low] / eligible[high]) if eligible[high] > 0 else np.nan  # the "four-fifths" ratio
    return gaps


def exposure_shares(deciles: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    """Per segment: the share of its users' filled top-K slots going to each popularity decile (sums to 1; empty slots ignored)."""
    out = {}
    for segment in sorted(set(labels), key=str):
        slots = deciles[labels == segment].ravel()
        slots = slots[slots >= 0]
        counts = np.bincount(slots, minlength=DECILES)[:DECILES].astype(float)
        out[str(segment)] = (counts / counts.sum()).tolist() if counts.sum() else [0.0] * DECILES
    return out


def top_k_deciles(built: TrainingData, ranker: FittedModel, row_ids: np.ndarray, k: int = K) -> np.ndarray:
    """Popularity decile of each of the ranker's top-k candidates (raw score, as served) for each given entity row (-1: fewer than k)."""
    pairs = built.data.pairs
    keep = np.isin(pairs.groups, row_ids)
    groups, features = pairs.groups[keep], pairs.features[keep]
    scores = ranker.raw(features) if len(features) else np.empty(0)
    rank = features[:, RANKER_FEATURES.index("item_popularity_rank")] if len(features) else np.empty(0)
    decile = np.where(np.isfinite(rank), np.minimum((np.nan_to_num(rank) * DECILES).astype(int), DECILES - 1), -1)
    order = np.lexsort((-scores, groups))  # by group, best score first
    groups, decile = groups[order], decile[order]
    out = np.full((len(row_ids), k), -1, dtype=np.int64)
    position = {int(r): i for i, r in enumerate(row_ids)}
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]]) if len(groups) else np.empty(0, dtype=int)
    ends = np.r_[starts[1:], len(groups)]
    for s, e in zip(starts, ends):
        top = decile[s : min(e, s + k)]
        out[position[int(groups[s])], : len(top)] = top
    return out


def score_arm(built: TrainingData, models: Mapping[str, FittedModel], service: str) -> Arm:
    """The models' calibrated propensity on the test rows and the popularity deciles of each ranked test user's top-K."""
    users = built.data.users  # one row per entity row, in entity-row order
    test = built.periods.masks(users)[2]
    pairs = built.data.pairs
    ranked = np.unique(pairs.groups[np.isin(pairs.groups, np.flatnonzero(test))])
    return Arm(service, models[USER_MODEL].predict(users.features[test]), ranked, top_k_deciles(built, models[RANKER_MODEL], ranked))


def fit_minimised(
    settings: Settings,
    prepared: PreparedData,
    built: TrainingData,
    split: Callable[[list[datetime]], Periods],
    budget: TuningBudget | None,
    progress: Callable[[str], None] = print,
) -> tuple[TrainingData, dict[str, FittedModel], str] | None:
    """Both models fitted as training does on the user feature service without training.sensitive_attributes (None: the configured one already is)."""
    from training.train import fit_models
    from training.training_data import build_training_data
    from training.version_facts import minimised_user_service

    service = minimised_user_service(built.store, settings.user_feature_service, settings.training.sensitive_attributes)
    if service == settings.user_feature_service:
        return None
    progress(f"  fairness: fitting both models again on {service} (without {', '.join(settings.training.sensitive_attributes)})")
    minimised = settings.model_copy(update={"user_feature_service": service})
    other = build_training_data(minimised, prepared, progress, split=split)
    same = other.rows[["user_id", "event_timestamp"]].reset_index(drop=True).equals(built.rows[["user_id", "event_timestamp"]].reset_index(drop=True))
    if not same:
        raise RuntimeError(f"{service}: the entity rows differ from {settings.user_feature_service}'s; the arms cannot be compared row by row")
    return other, fit_models(minimised, other, budget, progress), service


def fairness_section(
    prepared_dir: Path,
    built: TrainingData,
    arms: Mapping[str, Arm],
    threshold: float,
    sensitive: Sequence[str],
    n_boot: int = 200,
    seed: int = 0,
) -> dict:
    """metrics.json's fairness entry: per attribute, per arm: segment metrics, gaps, exposure; the paired cost of exclusion."""
    users = built.data.users
    test = built.periods.masks(users)[2]
    y = users.labels[test].astype(float)
    row_users = built.rows["user_id"].astype(str).to_numpy()
    test_users = row_users[test]
    configured = arms[CONFIGURED]
    ranked_users = row_users[configured.group_rows]
    segments = user_segments(prepared_dir, list(test_users) + list(ranked_users))
    if not segments:
        return {"status": "no user attributes", "reason": "the users file has no gender, age or region values"}
    section: dict = {
        "status": "compared" if MINIMISED in arms else "configured only",
        "sensitive_attributes": list(sensitive),
        "services": {name: arm.service for name, arm in arms.items()},
        "threshold": threshold,
        "test_rows": int(len(y)),
        "ranked_users": int(len(configured.group_rows)),
        "k": K,
        "attributes": {},
    }
    n_rows = len(test_users)
    for attribute, labels in segments.items():
        row_labels, user_labels = labels[:n_rows], labels[n_rows:]
        entry: dict = {}
        for name, arm in arms.items():
            table, draws = segment_metrics(y, arm.p, threshold, row_labels, n_boot, seed)
            entry[name] = {
                "segments": table,
                "gaps": largest_gaps(table, draws),
                "exposure": exposure_shares(arm.deciles, user_labels),
            }
        section["attributes"][attribute] = entry
    if MINIMISED in arms:
        scores = {CONFIGURED: configured.p, MINIMISED: arms[MINIMISED].p}
        section["exclusion_cost"] = [c.to_json() for c in compare_propensity(y, scores, MINIMISED, [CONFIGURED], n_boot, seed)]
        section["overall"] = {
            name: {"roc_auc": metrics.fast_roc_auc(y, arm.p), "ece": _ece_fast(y, arm.p), "selection_rate": float(np.mean(arm.p >= threshold))}
            for name, arm in arms.items()
        }
    return section


# -- report ------------------------------------------------------------------------------------


def _ci(row: Mapping, m: str, digits: int = 3) -> str:
    v = row.get(m)
    if v is None or not np.isfinite(v):
        return "n/a"
    low, high = row.get(f"{m}_ci_low"), row.get(f"{m}_ci_high")
    ci = f" ({low:.{digits}f}-{high:.{digits}f})" if low is not None and np.isfinite(low) else ""
    return f"{v:.{digits}f}{ci}"


def _gap(g: dict | None) -> str:
    if not g:
        return "n/a"
    return f"{g['gap']:.3f} ({signed(g['ci_low'])} .. {signed(g['ci_high'])}), {g['high']} vs {g['low']}"


def report_lines(section: dict) -> list[str]:
    """The report's fairness section (markdown lines)."""
    lines = ["", "## Fairness (test period, per user segment)", ""]
    if section.get("status") == "no user attributes":
        return lines + [f"Not reported: {section['reason']}."]
    arms = list(section["services"])
    lines += [
        f"Sensitive attributes (training.sensitive_attributes): {', '.join(section['sensitive_attributes'])}. "
        + "; ".join(f"**{name}** models read `{service}`" for name, service in section["services"].items())
        + (f" (no minimised models: {section['why']})" if section.get("why") else "")
        + ". Per segment: ROC-AUC, ECE (10 equal-width bins) and selection rate (share of rows scored at or above the report's "
        f"threshold {section['threshold']:.3f}), each with a 95% bootstrap CI (the segment's rows resampled). "
        f"Gaps: highest minus lowest segment of at least {MIN_ROWS} rows ('unknown' left out), with the CI of that pair's "
        f"difference; the pair is chosen after looking, so with many segments a gap whose CI barely excludes 0 can be chance. "
        f"ECE is biased upward on small samples, so its interval can lie above the point value. Exposure: share of the ranker's top-{section['k']} slots in each item-popularity decile "
        f"(D1 = the most popular tenth of the catalog), over {section['ranked_users']:,} ranked test users (buyers and the sampled non-buyers).",
    ]
    if "exclusion_cost" in section:
        lines += ["", "Cost of excluding them (minimised minus configured, paired bootstrap over all test rows):", ""]
        lines += ["| metric | configured | minimised | difference (95% CI) | verdict |", "|---|---|---|---|---|"]
        for c in section["exclusion_cost"]:
            lines.append(
                f"| {c['metric']} | {c['baseline_value']:.4f} | {c['model_value']:.4f} | {signed(c['difference'])} "
                f"({signed(c['ci_low'])} .. {signed(c['ci_high'])}) | {c['verdict']}{' (' + c['reason'] + ')' if c['reason'] else ''} |"
            )
    for attribute, entry in section["attributes"].items():
        lines += ["", f"### {attribute}", ""]
        lines += ["| segment | rows (positive) | " + " | ".join(f"{a} ROC-AUC | {a} ECE | {a} selection" for a in arms) + " |"]
        lines += ["|---|---|" + "---|---|---|" * len(arms)]
        first = entry[arms[0]]["segments"]
        for segment, row in first.items():
            cells = " | ".join(
                f"{_ci(entry[a]['segments'][segment], 'roc_auc')} | {_ci(entry[a]['segments'][segment], 'ece')} | {_ci(entry[a]['segments'][segment], 'selection_rate')}"
                for a in arms
            )
            lines.append(f"| {segment} | {row['rows']:,} ({row['positives']:,}) | {cells} |")
        lines += ["", "| largest gap | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
        for m in GAP_METRICS:
            lines.append(f"| {m} | " + " | ".join(_gap(entry[a]["gaps"][m]) for a in arms) + " |")
        lines += ["", f"Exposure (share of top-{section['k']} slots by popularity decile, D1 most popular):", ""]
        lines += ["| segment | model | " + " | ".join(f"D{d + 1}" for d in range(DECILES)) + " |", "|---|---|" + "---|" * DECILES]
        for segment in entry[arms[0]]["exposure"]:
            for a in arms:
                shares = entry[a]["exposure"].get(segment)
                if shares is not None:
                    lines.append(f"| {segment} | {a} | " + " | ".join(f"{s:.2f}" for s in shares) + " |")
    lines += ["", "![Fairness per segment](fairness.png)"]
    return lines


def write_plot(target: Path, section: dict) -> Path | None:
    """fairness.png: per attribute, ROC-AUC and selection rate per segment with CIs, each arm side by side; and the head-decile exposure."""
    if not section.get("attributes"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attributes = list(section["attributes"])
    arms = list(section["services"])
    fig, axes = plt.subplots(len(attributes), 3, figsize=(15, 3.6 * len(attributes)), squeeze=False)
    for i, attribute in enumerate(attributes):
        entry = section["attributes"][attribute]
        segments = list(entry[arms[0]]["segments"])
        x = np.arange(len(segments))
        width = 0.8 / len(arms)
        for j, a in enumerate(arms):
            rows = [entry[a]["segments"][s] for s in segments]
            for ax, m in zip(axes[i][:2], ("roc_auc", "selection_rate")):
                v = np.array([r[m] for r in rows], dtype=float)
                low = np.array([r[f"{m}_ci_low"] for r in rows], dtype=float)
                high = np.array([r[f"{m}_ci_high"] for r in rows], dtype=float)
                err = np.nan_to_num(np.vstack([v - low, high - v]))
                ax.bar(x + j * width, np.nan_to_num(v), width, yerr=err, capsize=2, label=f"{a} ({section['services'][a]})")
            head = [entry[a]["exposure"].get(s, [np.nan])[0] for s in segments]
            axes[i][2].bar(x + j * width, head, width, label=a)
        for ax, title in zip(axes[i], ("ROC-AUC", "selection rate at threshold", f"top-{section['k']} share of the most popular decile")):
            ax.set_xticks(x + width * (len(arms) - 1) / 2, segments, rotation=30, fontsize=8)
            ax.set_title(f"{attribute}: {title}", fontsize=10)
        axes[i][0].set_ylim(0.5, 1.0)
        axes[i][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = target / "fairness.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def evaluate_fairness(
    settings: Settings,
    prepared: PreparedData,
    built: TrainingData,
    models: Mapping[str, FittedModel],
    threshold: float,
    split: Callable[[list[datetime]], Periods],
    budget: TuningBudget | None,
    n_boot: int = 200,
    seed: int = 0,
    progress: Callable[[str], None] = print,
) -> dict:
    """The fairness entry of metrics.json: the configured models and, when the service serves a sensitive attribute, the minimised ones."""
    arms = {CONFIGURED: score_arm(built, models, settings.user_feature_service)}
    sensitive = settings.training.sensitive_attributes
    present = attributes_with_values(settings.prepared_dir)
    # Without a value of any sensitive attribute in the data (UCI: only country), the minimised models would be the same models.
    if any(a in present for a in sensitive):
        minimised = fit_minimised(settings, prepared, built, split, budget, progress)
        if minimised is not None:
            other, other_models, service = minimised
            arms[MINIMISED] = score_arm(other, other_models, service)
    section = fairness_section(settings.prepared_dir, built, arms, threshold, sensitive, n_boot, seed)
    if MINIMISED not in arms and section.get("attributes"):
        section["status"] = "configured only"
        section["why"] = (
            f"the data has no value of {', '.join(sensitive)}: the configured models cannot use them, so models without them are the same models"
            if not any(a in present for a in sensitive) else f"{settings.user_feature_service} serves none of {', '.join(sensitive)}"
        )
    return section


def attributes_with_values(prepared_dir: Path) -> list[str]:
    """The ATTRIBUTES with at least one value in the prepared users file."""
    path = prepared_dir / "users.parquet"
    if not path.exists():
        return []
    columns = [c for c in ATTRIBUTES if c in pq.read_schema(path).names]
    users = pd.read_parquet(path, columns=columns)
    return [c for c in columns if users[c].notna().any()]
