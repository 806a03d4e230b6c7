"""`propensity evaluate` end to end on the pipeline's small shop, with two pooled test cut-offs and a hand-written oracle."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import BIN, Pipeline

pytestmark = pytest.mark.slow


def _perfect_oracle(pipeline: Pipeline, root: Path) -> str:
    """An oracle that knows who buys what after the last test cut-off (on the raw clock); returns that cut-off."""
    manifest = json.loads((pipeline.work_dir / "prepared" / "manifest.json").read_text())
    raw_cutoff = datetime.fromisoformat(manifest["original_as_of"]) - timedelta(days=7)
    cutoff = pd.Timestamp(raw_cutoff) + pd.Timedelta(days=manifest["shift_days"])
    events = pd.read_parquet(pipeline.work_dir / "prepared" / "events.parquet", columns=["user_id", "item_id", "event_type", "event_time"])
    window = events[(events["event_type"] == "purchase") & (events["event_time"] >= cutoff) & (events["event_time"] < cutoff + pd.Timedelta(days=7))]
    users = pd.DataFrame({"user_id": events["user_id"].astype(str).unique()})
    users["p_buy"] = users["user_id"].isin(set(window["user_id"].astype(str))).astype(float)
    directory = root / "oracle"
    directory.mkdir(parents=True)
    users.to_parquet(directory / "users.parquet")
    window[["user_id", "item_id"]].drop_duplicates().assign(p_buy=1.0).to_parquet(directory / "items.parquet")
    meta = {"cutoff": raw_cutoff.isoformat(), "horizon_days": 7, "replicates": 1, "seed": 0, "n_users": len(users)}
    (directory / "oracle.json").write_text(json.dumps(meta))
    return cutoff.isoformat()


def test_evaluate_pools_test_cutoffs_compares_with_the_oracle_and_keeps_inconclusive_claims_out_of_the_headline(pipeline: Pipeline, tmp_path: Path) -> None:
    # The pipeline's raw dir is shared with other tests: the oracle goes into a dir of its own, named by PROPENSITY_DATA_DIR.
    cutoff = _perfect_oracle(pipeline, tmp_path / "raw")
    out = tmp_path / "evaluation"
    env = {**pipeline.env, "PROPENSITY_DATA_DIR": str(tmp_path / "raw")}
    command = [str(BIN / "propensity"), "evaluate", "--out", str(out), "--label", "shop", "--trials", "0", "--test-cutoffs", "2", "--bootstrap", "50"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    entry = json.loads((out / "metrics.json").read_text())["shop"]
    info = entry["info"]
    assert len(info["test_cutoffs"]) == 2 and info["test_cutoffs"][-1] == cutoff
    assert info["validation_window"]["end"] < info["test_cutoffs"][0]
    for name in ("recent_interactions_baseline", "recent_interactions_popularity_fill_baseline", "lightgbm"):
        assert entry["ranking"][name]["users"] == info["test_buyers_ranked"]
    baselines = {c["baseline"] for c in entry["comparisons"] if c["task"] == "ranking"}
    assert {"recent_interactions_baseline", "recent_interactions_popularity_fill_baseline", "candidate_order_baseline"} <= baselines
    for c in entry["comparisons"]:
        assert c["ci_low"] <= c["difference"] <= c["ci_high"] or c["ci_low"] == c["ci_high"]
        if c["n_positive"] < 100:
            assert c["verdict"] == "inconclusive"

    oracle = entry["oracle"]
    assert oracle["status"] == "compared", oracle
    assert oracle["user_auc"]["oracle"] == pytest.approx(1.0)  # it knows the buyers
    assert oracle["test_buyers"] < info["test_buyers_ranked"]  # one of the two pooled cut-offs
    assert 0 < oracle["fraction_of_oracle"]["lightgbm"]["recall_at_10"] <= 1.0
    assert oracle["user_auc"]["gap"] == pytest.approx(oracle["user_auc"]["oracle"] - oracle["user_auc"]["model"])

    report = (out / "shop" / "report.md").read_text()
    assert "## Model versus baselines" in report and "## Oracle" in report and "fraction of oracle" in report
    headline = (out / "README.md").read_text()
    conclusive = headline.split("## Conclusive")[1].split("## Inconclusive")[0]
    claims = [c for c in entry["best_baseline"]]
    for c in claims:
        if c["verdict"] == "inconclusive":
            assert f"| {c['baseline']} | {c['baseline_value']:.4f} | {c['model_value']:.4f} |" not in conclusive
    assert "Recall@10 >= 0.9 x oracle" in headline
