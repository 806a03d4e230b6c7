"""Fairness per segment (training/evaluation/fairness.py) and minimisation (propensity_user_v3, training.sensitive_attributes).

Synthetic segments with known answers; the sensitive attributes absent from the inputs of real LightGBM models trained
on the pipeline's demo shop through real Feast; `propensity evaluate` writing the fairness section.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from propensity.assembly import USER_MODEL_FEATURES, user_matrix
from propensity.feature_store import open_store, service_schema
from propensity.model_registry import USER_MODEL, load_version
from propensity.settings import Settings
from propensity.user_state import USER_SCALARS, UserBatch, read_inputs
from server.online_features import OnlineUserFeatures
from tests.conftest import BIN, Pipeline
from training.datasets import historical_user_features
from training.evaluation import fairness
from training.models import fit_model
from training.prepare import load_prepared
from training.training_data import build_training_data
from training.version_facts import minimised_user_service, sensitive_inputs

AGE = USER_MODEL_FEATURES.index("age")


def _perfect_and_random(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segment 'a' scored perfectly (p = y), segment 'b' at random; both with a 30% positive rate."""
    rng = np.random.default_rng(seed)
    labels = np.where(np.arange(n) % 2 == 0, "a", "b").astype(object)
    y = (rng.random(n) < 0.3).astype(float)
    p = np.where(labels == "a", y, rng.random(n))
    return y, p, labels


def test_segment_metrics_know_a_perfect_segment_from_a_random_one() -> None:
    y, p, labels = _perfect_and_random()
    table, draws = fairness.segment_metrics(y, p, threshold=0.5, labels=labels, n_boot=100, seed=1)
    a, b = table["a"], table["b"]
    assert a["rows"] == b["rows"] == 1000
    assert a["roc_auc"] == pytest.approx(1.0) and a["ece"] == pytest.approx(0.0)
    assert a["selection_rate"] == pytest.approx(y[labels == "a"].mean())  # p = y: exactly the buyers are selected
    assert b["roc_auc_ci_low"] < 0.5 < b["roc_auc_ci_high"] and abs(b["roc_auc"] - 0.5) < 0.06
    assert b["selection_rate"] == pytest.approx(0.5, abs=0.05)
    assert b["ece"] > 0.15  # uniform scores against a 30% rate are badly calibrated
    for row in table.values():
        for m in ("roc_auc", "selection_rate"):  # ECE is biased upward in small resamples: its interval may sit above it
            assert row[f"{m}_ci_low"] <= row[m] + 1e-12 and row[m] <= row[f"{m}_ci_high"] + 1e-12

    gaps = fairness.largest_gaps(table, draws)
    assert gaps["roc_auc"]["high"] == "a" and gaps["roc_auc"]["low"] == "b"
    assert gaps["roc_auc"]["gap"] == pytest.approx(1.0 - b["roc_auc"])
    assert gaps["roc_auc"]["ci_low"] > 0.4  # the gap is real, and its CI says so
    assert gaps["ece"]["high"] == "b"
    assert gaps["selection_rate"]["ratio"] == pytest.approx(a["selection_rate"] / b["selection_rate"])


def test_equal_segments_have_a_gap_whose_ci_covers_zero_and_small_segments_stay_out_of_gaps() -> None:
    rng = np.random.default_rng(3)
    n = 3000
    y = (rng.random(n) < 0.3).astype(float)
    p = np.clip(0.3 + 0.4 * (y - 0.3) + rng.normal(0, 0.2, n), 0, 1)  # one model, the same for everyone
    labels = rng.choice(np.array(["x", "y"], dtype=object), n)
    labels[:10] = "tiny"
    table, draws = fairness.segment_metrics(y, p, 0.5, labels, n_boot=200, seed=0)
    gaps = fairness.largest_gaps(table, draws)
    assert {gaps["roc_auc"]["high"], gaps["roc_auc"]["low"]} == {"x", "y"}  # "tiny" (10 rows) is listed but not compared
    assert "tiny" in table and table["tiny"]["rows"] == 10
    assert gaps["roc_auc"]["ci_low"] <= 0 <= gaps["roc_auc"]["ci_high"] or gaps["roc_auc"]["gap"] < 0.03


def test_exposure_shares_sum_to_one_per_segment_and_count_only_filled_slots() -> None:
    deciles = np.array([[0, 0, 1, -1], [0, 9, 9, 9], [5, 5, 5, 5]])
    labels = np.array(["f", "f", "m"], dtype=object)
    shares = fairness.exposure_shares(deciles, labels)
    assert shares["f"][0] == pytest.approx(3 / 7) and shares["f"][1] == pytest.approx(1 / 7) and shares["f"][9] == pytest.approx(3 / 7)
    assert shares["m"][5] == pytest.approx(1.0)
    for values in shares.values():
        assert len(values) == fairness.DECILES and sum(values) == pytest.approx(1.0)


def test_small_segments_are_pooled_and_ages_fall_in_bands(tmp_path: Path) -> None:
    labels = np.array(["c0"] * 50 + [f"c{i}" for i in range(1, 20) for _ in range(3)], dtype=object)
    pooled = fairness.pool_small(labels, max_segments=4)
    assert set(pooled) == {"c0", "c1", "c2", fairness.OTHER} or len(set(pooled)) == 4
    pd.DataFrame({"user_id": ["u1", "u2", "u3", "u4"], "age": [19.0, 34.0, 70.0, None], "gender": ["f", "m", None, "x"], "region": [None] * 4}).to_parquet(
        tmp_path / "users.parquet"
    )
    segments = fairness.user_segments(tmp_path, ["u1", "u2", "u3", "u4", "nobody"])
    assert list(segments["age_band"]) == ["18-24", "25-34", "65+", "unknown", "unknown"]
    assert list(segments["gender"]) == ["f", "m", "unknown", "x", "unknown"]
    assert "region" not in segments  # no value at all: not an attribute of this shop
    assert fairness.attributes_with_values(tmp_path) == ["age", "gender"] or set(fairness.attributes_with_values(tmp_path)) == {"age", "gender"}


def _settings(pipeline: Pipeline, **update: object) -> Settings:
    settings = Settings(data_dir=pipeline.data_dir, work_dir=pipeline.work_dir, feature_repo=pipeline.feature_repo)
    return settings.model_copy(update=update) if update else settings


def test_report_of_a_shop_with_only_country_names_every_figure_and_no_template_left() -> None:
    """UCI Online Retail's shape: region (country) only, so one arm and the reason there is no minimised one."""
    segment = {"rows": 62, "positives": 10, "roc_auc": 0.73, "roc_auc_ci": [0.55, 0.89], "ece": 0.04, "ece_ci": [0.03, 0.15],
               "selection_rate": 0.31, "selection_rate_ci": [0.19, 0.42]}
    gap = {"gap": 0.09, "ci_low": -0.13, "ci_high": 0.38, "high": "France", "low": "United Kingdom"}
    section = {
        "sensitive_attributes": ["gender", "age"], "services": {"configured": "propensity_user_v2"},
        "why": "the data has no value of gender, age", "threshold": 0.16, "k": 7, "ranked_users": 1141,
        "attributes": {"region": {"configured": {
            "segments": {"France": segment, "United Kingdom": {**segment, "rows": 2610}},
            "gaps": {m: gap for m in fairness.GAP_METRICS},
            "exposure": {"France": [0.7, 0.3] + [0.0] * 8, "United Kingdom": [0.9, 0.1] + [0.0] * 8},
        }}},
    }
    text = "\n".join(fairness.report_lines(section))
    assert "{" not in text and "}" not in text, "an unformatted template is left in the report"
    assert text.count("top-7") == 2 and "no minimised models: the data has no value of gender, age" in text
    assert "| United Kingdom | 2,610 (10) |" in text and "| France | configured | 0.70 | 0.30 |" in text


def test_v3_serves_neither_gender_nor_age_and_is_found_as_v2_minimised(pipeline: Pipeline) -> None:
    store = open_store(pipeline.feature_repo)
    v2 = {f for _, f, _ in service_schema(store, "propensity_user_v2")}
    v3 = {f for _, f, _ in service_schema(store, "propensity_user_v3")}
    assert v2 - v3 == {"gender", "age"}
    assert minimised_user_service(store, "propensity_user_v2", ["gender", "age"]) == "propensity_user_v3"
    assert minimised_user_service(store, "propensity_user_v3", ["gender", "age"]) == "propensity_user_v3"
    with pytest.raises(ValueError, match="new _vN"):
        minimised_user_service(store, "propensity_user_v2", ["region"])
    # The server's per-request read of v3 fetches no sensitive attribute at all.
    assert not {"age", "gender"} & set(OnlineUserFeatures(store, "propensity_user_v3").feature_names)
    assert "age" in read_inputs(v2) and "age" not in read_inputs(v3)
    assert sensitive_inputs(_settings(pipeline, user_feature_service="propensity_user_v3"), store)["model_inputs"] == []
    assert sensitive_inputs(_settings(pipeline), store)["model_inputs"] == ["age"]


def test_a_model_trained_on_v3_has_no_age_input_while_v2_models_read_it(pipeline: Pipeline) -> None:
    settings = _settings(pipeline, user_feature_service="propensity_user_v3")
    built = build_training_data(settings, load_prepared(settings.prepared_dir), progress=lambda _: None)
    assert not {"gender", "age"} & set(built.user_features.columns)
    assert np.isnan(built.data.users.features[:, AGE]).all() and np.isnan(built.data.pairs.features[:, AGE]).all()
    model = fit_model("user_propensity", built.data.users, USER_MODEL_FEATURES, built.periods, settings.training, progress=lambda _: None)
    used = dict(zip(model.booster.feature_name(), model.booster.feature_importance("split")))
    assert used["age"] == 0 and sum(used.values()) > 0  # a real model, which never splits on the absent input
    # The same rows through v2 and the same assembly: the demo shop's ages are there, so v2 models read them.
    sample = built.rows.head(300)
    v2 = historical_user_features(built.store, sample, "propensity_user_v2")
    ages = user_matrix(UserBatch.from_rows(sample["user_id"].astype(str).tolist(), v2.to_dict("records"), next(iter(built.catalogs.values()))),
                       pd.to_datetime(sample["event_timestamp"], utc=True).map(pd.Timestamp.timestamp).to_numpy())[:, AGE]
    assert np.isfinite(ages).mean() > 0.9
    assert USER_SCALARS.index("age") == AGE  # the layout is unchanged: models trained on v2 keep loading


def test_the_served_v2_model_records_that_it_reads_age(pipeline: Pipeline) -> None:
    bundle = load_version(_settings(pipeline).model_dir)
    assert bundle.user_feature_service == "propensity_user_v2"
    recorded = bundle.metadata["sensitive_inputs"]
    assert recorded == {"sensitive_attributes": ["gender", "age"], "served": ["gender", "age"], "model_inputs": ["age"]}
    assert "age" in bundle.metadata["models"][USER_MODEL]["feature_names"]


@pytest.mark.slow
def test_evaluate_writes_a_fairness_section_with_and_without_the_sensitive_attributes(pipeline: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "evaluation"
    command = [str(BIN / "propensity"), "evaluate", "--out", str(out), "--label", "shop", "--trials", "0", "--bootstrap", "30"]
    result = subprocess.run(command, env=pipeline.env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    entry = json.loads((out / "metrics.json").read_text())["shop"]
    section = entry["fairness"]
    assert section["status"] == "compared"
    assert section["services"] == {"configured": "propensity_user_v2", "minimised": "propensity_user_v3"}
    assert set(section["attributes"]) == {"gender", "age_band", "region"}
    for attribute, arms in section["attributes"].items():
        for arm in ("configured", "minimised"):
            segments = arms[arm]["segments"]
            assert sum(s["rows"] for s in segments.values()) == section["test_rows"]
            for shares in arms[arm]["exposure"].values():
                assert sum(shares) == pytest.approx(1.0)
            assert set(arms[arm]["gaps"]) == set(fairness.GAP_METRICS)
    assert {c["metric"] for c in section["exclusion_cost"]} == {"roc_auc", "pr_auc", "log_loss"}
    assert entry["info"]["sensitive_inputs"]["model_inputs"] == ["age"]
    report = (out / "shop" / "report.md").read_text()
    assert "## Fairness" in report and "propensity_user_v3" in report
    assert (out / "shop" / "fairness.png").stat().st_size > 10_000
    headline = (out / "README.md").read_text().split("## Fairness")[1]
    assert "| shop | gender |" in headline and "| shop | region |" in headline
