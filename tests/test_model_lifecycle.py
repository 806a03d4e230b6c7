"""Model lifecycle: `propensity models ...` on a real registry, the split/shadow reaching a real server, the promotion gate."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from propensity.assembly import RANKER_FEATURES, USER_MODEL_FEATURES
from propensity.model_registry import CURRENT, RANKER_MODEL, USER_MODEL, ModelLoadError, current_version, save_version
from propensity.registry_history import HISTORY, ROUTING, promote_version, read_history, read_routing, rollback, serving_stack
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from propensity_cli.main import main
from tests.tiny_models import tiny_booster
from tests.conftest import BIN, Pipeline, private_env, running_server, users, wait_for

def _metadata(version: str, auc: float) -> dict:
    return {
        "version": version,
        "trained_at": f"2026-01-0{version[-1]}T00:00:00+00:00",
        "train_window": {"start": "2025-12-01T00:00:00+00:00", "end": "2025-12-22T00:00:00+00:00"},
        "feature_services": {"user": {"name": "propensity_user_v2", "fingerprint": "a"}, "item": {"name": "propensity_item_v2", "fingerprint": "b"}},
        "models": {
            USER_MODEL: {"feature_names": list(USER_MODEL_FEATURES), "metrics": {"auc": auc, "logloss": 0.3, "test_auc": auc - 0.01}, "base_rate": 0.1},
            RANKER_MODEL: {"feature_names": list(RANKER_FEATURES), "metrics": {"ndcg_at_10": 0.4}, "base_rate": 0.01},
        },
    }


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A registry with three real (tiny) versions v1..v3, none current; the CLI pointed at it."""
    root = tmp_path / "work" / "models"
    for i in (1, 2, 3):
        boosters = {USER_MODEL: tiny_booster(USER_MODEL_FEATURES, i, rounds=3), RANKER_MODEL: tiny_booster(RANKER_FEATURES, 10 + i, rounds=3)}
        save_version(root, f"v{i}", boosters, _metadata(f"v{i}", 0.6 + i / 100))
    monkeypatch.setenv("PROPENSITY_WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("PROPENSITY_CONFIG", str(tmp_path / "absent.toml"))
    for name in ("TRAFFIC_SPLIT", "SHADOW_VERSION"):
        monkeypatch.delenv(f"PROPENSITY_SERVER__{name}", raising=False)
    return root


def test_promote_and_rollback_through_the_cli_are_recorded_with_who_and_why(registry: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["models", "promote", "v1", "--reason", "first model", "--by", "alice"]) == 0
    assert main(["models", "promote", "v2", "--reason", "better recall"]) == 0
    assert main(["models", "promote", "v3", "--reason", "fresh data", "--by", "bob"]) == 0
    assert current_version(registry) == "v3"
    assert main(["models", "rollback", "--reason", "v3 misbehaves", "--by", "carol"]) == 0
    assert current_version(registry) == "v2"
    assert main(["models", "rollback", "--reason", "v2 too"]) == 0
    assert current_version(registry) == "v1"
    capsys.readouterr()
    assert main(["models", "rollback", "--reason", "nothing left"]) == 1  # refused in one line, CURRENT untouched
    assert "no previously current version" in capsys.readouterr().err and current_version(registry) == "v1"

    history = read_history(registry)
    assert [(e["action"], e["version"], e["previous"], e["by"], e["reason"]) for e in history] == [
        ("promote", "v1", None, "alice", "first model"),
        ("promote", "v2", "v1", history[1]["by"], "better recall"),
        ("promote", "v3", "v2", "bob", "fresh data"),
        ("rollback", "v2", "v3", "carol", "v3 misbehaves"),
        ("rollback", "v1", "v2", history[4]["by"], "v2 too"),
    ]
    assert history[1]["by"]  # --by defaults to $USER
    # Every line of the file is one whole JSON object; no temporary files are left behind.
    assert len((registry / HISTORY).read_text().splitlines()) == 5
    assert not list(registry.glob(".*.tmp"))


def test_promoting_a_missing_version_is_refused_and_changes_nothing(registry: Path, capsys: pytest.CaptureFixture) -> None:
    promote_version(registry, "v1", reason="start")
    assert main(["models", "promote", "v9", "--reason", "typo"]) == 1
    assert main(["models", "promote", "../v1", "--reason", "a path"]) == 1
    assert "no model version v9" in capsys.readouterr().err
    assert current_version(registry) == "v1" and len(read_history(registry)) == 1


def test_rollback_knows_a_version_made_current_outside_the_history(registry: Path) -> None:
    (registry / CURRENT).write_text("v1\n")  # older code promoted without a history
    promote_version(registry, "v2", reason="new")
    assert serving_stack(registry) == ["v1", "v2"]
    assert rollback(registry, reason="back")["version"] == "v1"


def test_concurrent_promotions_all_reach_the_history(registry: Path) -> None:
    threads = [threading.Thread(target=promote_version, args=(registry, f"v{1 + i % 3}"), kwargs={"reason": f"r{i}"}) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = read_history(registry)
    assert sorted(e["reason"] for e in history) == sorted(f"r{i}" for i in range(24))
    # Each entry's previous is the entry before it: the promotions were serialised.
    assert all(b["previous"] == a["version"] for a, b in zip(history, history[1:]))
    assert current_version(registry) == history[-1]["version"]


def test_list_and_show_report_metadata_and_roles(registry: Path, capsys: pytest.CaptureFixture) -> None:
    promote_version(registry, "v2", reason="start")
    assert main(["models", "split", "v2=0.75", "v3=0.25", "--reason", "A/B v3"]) == 0
    assert main(["models", "shadow", "v1", "--reason", "watch v1"]) == 0
    capsys.readouterr()
    assert main(["models", "list", "--json"]) == 0
    rows = {row["version"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["v1"]["roles"] == ["shadow"]
    assert rows["v2"]["roles"] == ["current", "split 75%"]
    assert rows["v3"]["roles"] == ["split 25%"]
    assert rows["v3"]["feature_services"] == ["propensity_user_v2", "propensity_item_v2"]
    assert rows["v3"]["validation"]["user_auc"] == pytest.approx(0.63) and rows["v3"]["test"]["user_auc"] == pytest.approx(0.62)
    assert rows["v3"]["train_window"]["start"].startswith("2025-12-01") and rows["v3"]["created"].startswith("2026-01-03")
    assert main(["models", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("VERSION") and "current, split 75%" in table[2] and "propensity_user_v2" in table[2]
    assert main(["models", "show", "v3", "--no-report"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("model version v3 (split 25%)") and '"ndcg_at_10": 0.4' in shown


def test_split_and_shadow_are_validated_and_recorded(registry: Path, capsys: pytest.CaptureFixture) -> None:
    promote_version(registry, "v1", reason="start")
    assert main(["models", "split", "v1=1", "v9=1", "--reason", "typo"]) == 1
    assert main(["models", "split", "v1=-1", "v2=1", "--reason", "negative"]) == 1
    assert main(["models", "shadow", "v9", "--reason", "typo"]) == 1
    assert not (registry / ROUTING).exists()
    assert read_routing(registry).traffic_split is None and read_routing(registry).shadow_version is None
    assert main(["models", "split", "v1=1", "v2=3", "--reason", "try v2", "--by", "dana"]) == 0
    assert main(["models", "shadow", "v3", "--reason", "watch"]) == 0
    routing = read_routing(registry)
    assert routing.traffic_split == {"v1": 1.0, "v2": 3.0} and routing.shadow_version == "v3"
    assert main(["models", "split", "--clear", "--reason", "done"]) == 0
    assert main(["models", "shadow", "--off", "--reason", "done"]) == 0
    routing = read_routing(registry)
    assert routing.traffic_split == {} and routing.shadow_version == ""
    assert [(e["action"], e["by"] if e["reason"] == "try v2" else "") for e in read_history(registry)[1:]] == [
        ("split", "dana"), ("shadow", ""), ("split", ""), ("shadow", "")
    ]


def test_a_damaged_routing_file_is_a_model_load_error(registry: Path) -> None:
    (registry / ROUTING).write_text('{"traffic_split": {"../etc": 1}}')
    with pytest.raises(ModelLoadError, match="not a version id"):
        read_routing(registry)
    (registry / ROUTING).write_text("{half")
    with pytest.raises(ModelLoadError, match="unreadable"):
        read_routing(registry)


# -- against a real server: the registry's split and shadow reach it by polling; rollback under traffic ----------


def _clone(models: Path, source: str, target: str) -> str:
    """Another registry version with the same trees (answers differ only in model_version)."""
    directory = models / "versions" / target
    shutil.copytree(models / "versions" / source, directory)
    metadata = json.loads((directory / "metadata.json").read_text())
    (directory / "metadata.json").write_text(json.dumps({**metadata, "version": target}))
    return target


def _shadow_scored(log: Path, version: str) -> bool:
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return any(r.get("message") == "shadow scoring" and r.get("shadow_version") == version for r in records)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "propensity"), "models", *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


def test_split_shadow_and_rollback_set_in_the_registry_reach_a_running_server(pipeline: Pipeline) -> None:
    env, work = private_env(pipeline, "lifecycle", model_poll_seconds=0.3, log_format="json")
    models = work / "models"
    base = current_version(models)
    arm_b, watched = _clone(models, base, "v29990303T000000"), _clone(models, base, "v29990304T000000")
    shoppers = users(pipeline, 60)
    with running_server(env, pipeline.root / "lifecycle.log") as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommendationServiceStub(channel)

        def arms() -> dict[str, str]:
            return {u: stub.Recommend(pb.RecommendRequest(user_id=u, num_items=3), timeout=5).model_version for u in shoppers}

        assert set(arms().values()) == {base}
        _cli(env, "split", f"{base}=0.5", f"{arm_b}=0.5", "--reason", "A/B the clone")
        assert wait_for(lambda: set(arms().values()) == {base, arm_b}, 10), "the registry's split never reached the server"
        first = arms()
        assert first == arms() and 10 <= sum(v == base for v in first.values()) <= 50  # stable per user, about half each

        def loaded() -> set[str]:
            return {m.version for m in stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).models}

        assert watched not in loaded()
        _cli(env, "shadow", watched, "--reason", "watch it")
        assert wait_for(lambda: watched in loaded(), 10), "the registry's shadow version was never loaded"
        assert not _shadow_scored(server.log, watched)
        arms()
        assert wait_for(lambda: _shadow_scored(server.log, watched), 5), "no shadow scoring logged for the registry's shadow version"

        _cli(env, "split", "--clear", "--reason", "A/B over")
        assert wait_for(lambda: set(arms().values()) == {base}, 10)

        # Promote the clone and roll back while four threads call Recommend: no call may fail.
        failures, calls, stop = [], [0], threading.Event()

        def traffic() -> None:
            with grpc.insecure_channel(server.target) as own:
                own_stub = pb_grpc.RecommendationServiceStub(own)
                while not stop.is_set():
                    try:
                        own_stub.Recommend(pb.RecommendRequest(user_id=shoppers[calls[0] % len(shoppers)], num_items=3), timeout=5)
                        calls[0] += 1
                    except grpc.RpcError as error:
                        failures.append(error.code())

        threads = [threading.Thread(target=traffic) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            _cli(env, "promote", arm_b, "--reason", "try the clone", "--by", "tester")
            assert wait_for(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).current_version == arm_b, 10)
            _cli(env, "rollback", "--reason", "back to base", "--by", "tester")
            assert wait_for(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).current_version == base, 10)
            time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert failures == [] and calls[0] > 20
        assert set(arms().values()) == {base}
    # The pipeline's own training promoted first (through the gate), then the changes made here.
    assert [e["action"] for e in read_history(models)] == ["promote", "split", "shadow", "split", "promote", "rollback"]


# -- the promotion gate and compare, with real LightGBM models trained on the pipeline's shop ----------------------

# No leaf may hold fewer rows than the shop has: trees without a split, every user and item scored alike.
CRIPPLED = {"PROPENSITY_TRAINING__NUM_BOOST_ROUND": "2", "PROPENSITY_TRAINING__MIN_DATA_IN_LEAF": "10000000"}


def _train(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "propensity"), "train", *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_the_gate_refuses_a_worse_model_force_promotes_it_and_compare_shows_why(pipeline: Pipeline) -> None:
    env, work = private_env(pipeline, "gate")
    models = work / "models"
    base = current_version(models)
    crippled_env = {**env, **CRIPPLED}

    refused = _train(crippled_env)
    worse = [v for v in sorted(p.name for p in (models / "versions").iterdir()) if v not in (base,) and not v.startswith(".")][-1]
    assert current_version(models) == base, refused.stdout
    assert f"NOT promoted: {worse} is registered, {base} stays current" in refused.stdout
    assert "propensity log loss" in refused.stdout  # the reason names the metric that failed
    # Only the pipeline's first training promoted (nothing to compare with then); the refusal promoted nothing.
    assert [(e["action"], e["version"], e["gate"]["passed"]) for e in read_history(models)] == [("promote", base, True)]

    forced = _train(crippled_env, "--force", "--reason", "testing the override", "--by", "tester")
    assert "FORCED" in forced.stdout
    entry = read_history(models)[-1]
    newest = entry["version"]
    assert current_version(models) == newest and newest not in (base, worse)
    assert entry["forced"] is True and entry["previous"] == base and entry["by"] == "tester" and entry["reason"] == "testing the override"
    assert entry["gate"]["passed"] is False and entry["gate"]["current"] == base
    assert entry["gate"]["new_metrics"]["log_loss"] > entry["gate"]["current_metrics"]["log_loss"] + 0.005

    compared = subprocess.run([str(BIN / "propensity"), "models", "compare", base, worse, "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert compared.returncode == 0, compared.stderr[-3000:]
    report = json.loads(compared.stdout)
    differences = {(d["task"], d["metric"]): d for d in report["differences"]}
    loss = differences[("propensity", "log_loss")]
    assert loss["model"] == base and loss["baseline"] == worse
    assert loss["difference"] < 0 and loss["ci_high"] < 0  # base's log loss is lower, and the paired CI says so
    assert loss["model_value"] == pytest.approx(entry["gate"]["current_metrics"]["log_loss"])
    assert {("ranking", "ndcg_at_10"), ("propensity", "roc_auc")} <= set(differences)
    assert report["summary"][base]["buyers"] == report["summary"][worse]["buyers"] > 0

    # A model trained with the normal settings beats the crippled current one: the gate lets it through.
    recovered = _train(env)
    entry = read_history(models)[-1]
    assert entry["action"] == "promote" and entry["previous"] == newest and entry["forced"] is False, recovered.stdout
    assert entry["gate"]["passed"] is True and current_version(models) == entry["version"]
    assert entry["gate"]["new_metrics"]["log_loss"] < entry["gate"]["current_metrics"]["log_loss"]


def test_the_server_pool_follows_the_registry_routing_and_refuses_one_it_cannot_serve(registry: Path, caplog: pytest.LogCaptureFixture) -> None:
    from propensity.registry_history import set_shadow, set_split
    from server.model_pool import ModelPool

    promote_version(registry, "v1", reason="start")
    pool = ModelPool(registry, lambda bundle: None, traffic_split={"v1": 1, "v2": 1}, shadow_version="")
    assert pool.roles() == {"v1": "current", "v2": "split"}  # no routing.json: the settings apply
    set_split(registry, {"v3": 1}, reason="all to v3")
    set_shadow(registry, "v2", reason="watch v2")
    assert pool.poll() is None  # routing is applied in place; the current version did not change
    assert pool.roles() == {"v3": "split", "v1": "current", "v2": "shadow"}
    assert {pool.choose(f"user-{i}").version for i in range(50)} == {"v3"}
    assert pool.choose("user-1", pinned="v1").version == "v1"

    # A version that cannot be loaded (its model file cut short): the routing naming it is refused, once.
    (registry / "versions" / "v2" / f"{USER_MODEL}.txt").write_text("tree\n")
    with caplog.at_level("ERROR", logger="server.model_pool"):
        fresh = ModelPool(registry, lambda bundle: None)  # a replica starting now: it starts, on the settings' routing
        fresh.poll()
        fresh.poll()
    assert fresh.roles() == {"v1": "current"}  # split and shadow are one routing: refused together, never half applied
    assert sum("refusing model routing" in r.message for r in caplog.records) == 1
    (registry / ROUTING).write_text("{broken")
    pool.poll()
    assert pool.roles() == {"v3": "split", "v1": "current", "v2": "shadow"}  # an unreadable routing.json changes nothing


def test_list_still_works_with_a_damaged_routing_file(registry: Path, capsys: pytest.CaptureFixture) -> None:
    promote_version(registry, "v1", reason="start")
    (registry / ROUTING).write_text("{broken")
    assert main(["models", "list", "--json"]) == 0
    out = capsys.readouterr()
    assert {row["version"]: row["roles"] for row in json.loads(out.out)}["v1"] == ["current"] and "routing.json" in out.err
