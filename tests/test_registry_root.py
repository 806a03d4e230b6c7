"""The model registry root as a location: a plain path (unchanged) or an fsspec URL mirrored locally.

In-process on fsspec's memory:// (two "machines" = two caches on one URL), and end to end: two real server
replicas on one shared root (a plain path, and a file:// URL through the object-store code path) follow a
promotion made by a separate `propensity models promote` process under traffic, with zero failed calls.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import fsspec
import grpc
import lightgbm as lgb
import pytest

from propensity.assembly import RANKER_FEATURES, USER_MODEL_FEATURES
from propensity.model_registry import (
    CURRENT,
    METADATA,
    RANKER_MODEL,
    USER_MODEL,
    ModelLoadError,
    current_version,
    list_versions,
    load_version,
    save_version,
)
from propensity.registry_history import promote_version, read_history, read_routing, rollback, set_shadow
from propensity.registry_remote import MARKER, remote_url
from propensity.settings import Settings
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from tests.conftest import BIN, PROJECT_ROOT, Pipeline, private_env, running_server, users
from tests.test_model_registry import boosters  # noqa: F401 - boosters is a fixture (the same tiny models)


def _metadata(version: str) -> dict:
    return {
        "version": version,
        "feature_services": {"user": {"name": "propensity_user_v1", "fingerprint": "0" * 16}, "item": {"name": "propensity_item_v1", "fingerprint": "f" * 16}},
        "models": {USER_MODEL: {"feature_names": list(USER_MODEL_FEATURES), "base_rate": 0.1},
                   RANKER_MODEL: {"feature_names": list(RANKER_FEATURES), "base_rate": 0.05}},
    }


def machine(url: str, tmp_path: Path, name: str) -> Path:
    """The local root one machine works on for the registry at url (its own work dir, so its own mirror)."""
    return Settings(work_dir=tmp_path / name, model_registry_root=url).model_dir


def test_a_url_root_is_shared_by_machines_with_their_own_mirrors(tmp_path: Path, boosters: dict[str, lgb.Booster]) -> None:
    url = f"memory://registry-{uuid.uuid4().hex[:8]}/models"
    fs, base = fsspec.core.url_to_fs(url)
    trainer, server = machine(url, tmp_path, "trainer"), machine(url, tmp_path, "server")
    assert trainer != server and remote_url(trainer) == url == (server / MARKER).read_text().strip()
    assert trainer.is_relative_to(tmp_path / "trainer" / "model-cache")

    save_version(trainer, "v1", boosters, _metadata("v1"))
    assert sorted(fs.ls(f"{base}/versions/v1", detail=False)) == sorted(f"{base}/versions/v1/{n}" for n in (METADATA, "item_ranker.txt", "user_propensity.txt"))
    with pytest.raises(ModelLoadError, match="no current model"):
        current_version(server)
    assert list_versions(server) == ["v1"] and (server / "versions" / "v1" / "item_ranker.txt").exists()  # mirrored on listing

    promote_version(trainer, "v1", by="ci", reason="first")
    assert fs.cat_file(f"{base}/{CURRENT}") == b"v1\n"
    assert current_version(server) == "v1" and load_version(server).version == "v1"

    save_version(trainer, "v2", boosters, _metadata("v2"))
    promote_version(server, "v2", by="ops", reason="from the other machine")  # the server machine mirrors v2, then moves the pointer
    assert current_version(trainer) == "v2" and fs.cat_file(f"{base}/{CURRENT}") == b"v2\n"
    assert [(e["action"], e["version"], e["by"]) for e in read_history(trainer)] == [("promote", "v1", "ci"), ("promote", "v2", "ops")]
    set_shadow(trainer, "v1", by="ci")
    assert read_routing(server).shadow_version == "v1"
    assert rollback(server, by="ops")["version"] == "v1" and current_version(trainer) == "v1"
    with pytest.raises(FileExistsError, match="v2 already exists"):  # a version id taken at the URL, though not in this mirror
        save_version(machine(url, tmp_path, "third"), "v2", boosters, _metadata("v2"))


def test_only_complete_and_intact_versions_are_mirrored(tmp_path: Path, boosters: dict[str, lgb.Booster]) -> None:
    url = f"memory://registry-{uuid.uuid4().hex[:8]}"
    fs, base = fsspec.core.url_to_fs(url)
    save_version(machine(url, tmp_path, "trainer"), "v1", boosters, _metadata("v1"))
    # Half uploaded: model files without metadata.json (it is written last) is not a version yet.
    fs.pipe_file(f"{base}/versions/v2/user_propensity.txt", b"tree\n")
    # Complete but damaged in transit or at rest: the sha256 in its metadata refuses it.
    for name in fs.ls(f"{base}/versions/v1", detail=False):
        fs.pipe_file(name.replace("/v1/", "/v3/"), fs.cat_file(name))
    fs.pipe_file(f"{base}/versions/v3/item_ranker.txt", fs.cat_file(f"{base}/versions/v3/item_ranker.txt")[:-200])
    reader = machine(url, tmp_path, "reader")
    assert list_versions(reader) == ["v1"]
    with pytest.raises(ModelLoadError, match=r"versions/v3/item_ranker.txt: missing or differs from the sha256"):
        load_version(reader, "v3")
    with pytest.raises(ModelLoadError, match="no model version v2"):
        promote_version(reader, "v2")
    assert sorted(p.name for p in (reader / "versions").iterdir()) == ["v1"]  # no partial download left behind


def test_an_unreachable_url_keeps_the_mirror_and_names_the_url(tmp_path: Path) -> None:
    root = machine("nosuchproto://bucket/models", tmp_path, "m")
    with pytest.raises(ModelLoadError, match="model registry nosuchproto://bucket/models"):
        current_version(root)
    with pytest.raises(ModelLoadError, match="nosuchproto"):
        read_routing(root)
    assert list_versions(root) == [] and read_history(root) == []  # listings fall back to the mirror


def test_a_file_url_writes_each_object_by_rename_and_leaves_no_temporary(tmp_path: Path, boosters: dict[str, lgb.Booster]) -> None:
    shared = tmp_path / "shared"
    root = machine(shared.as_uri(), tmp_path, "m")
    save_version(root, "v1", boosters, _metadata("v1"))
    promote_version(root, "v1", reason="r")
    assert (shared / CURRENT).read_text() == "v1\n" and json.loads((shared / "versions" / "v1" / METADATA).read_text())["version"] == "v1"
    assert sorted(p.name for p in shared.rglob(".*")) == []


def test_a_plain_path_root_stays_local_and_never_imports_fsspec(tmp_path: Path, boosters: dict[str, lgb.Booster]) -> None:
    settings = Settings(work_dir=tmp_path, model_registry_root=str(tmp_path / "plain"))
    assert settings.model_dir == tmp_path / "plain" and Settings(work_dir=tmp_path).model_dir == tmp_path / "models"
    save_version(settings.model_dir, "v1", boosters, _metadata("v1"))
    promote_version(settings.model_dir, "v1")
    code = (
        "import sys; from pathlib import Path; from propensity.model_registry import load_version, list_versions; "
        f"root = Path({str(settings.model_dir)!r}); assert load_version(root).version == 'v1' and list_versions(root) == ['v1']; "
        "assert 'fsspec' not in sys.modules, 'fsspec imported for a local root'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / "model-cache").exists()


# --- two real replicas, one shared root, a promotion by another process under traffic -----------------


@pytest.mark.slow
def test_two_replicas_on_one_shared_root_follow_a_promotion_with_zero_failed_calls(pipeline: Pipeline) -> None:
    """Replica A reads the shared root as a plain path, replica B as a file:// URL (the object-store code path, with its
    own mirror); `propensity models promote` in a third process, through the URL, moves both under traffic."""
    env, work = private_env(pipeline, "registry-root", model_poll_seconds="0.5")
    shared = pipeline.root / "shared-models"
    shutil.copytree(work / "models", shared, ignore=shutil.ignore_patterns("compiled", ".lock"))
    current = (shared / CURRENT).read_text().strip()
    new = f"{current}-b"
    # A second version: the current one's files under a new id (same feature services, so every replica accepts it).
    shutil.copytree(shared / "versions" / current, shared / "versions" / f".{new}.tmp")
    metadata = json.loads((shared / "versions" / f".{new}.tmp" / METADATA).read_text())
    (shared / "versions" / f".{new}.tmp" / METADATA).write_text(json.dumps({**metadata, "version": new}))
    (shared / "versions" / f".{new}.tmp").rename(shared / "versions" / new)
    shutil.rmtree(work / "models")  # nothing may come from the work directory's own registry
    as_path = {**env, "PROPENSITY_MODEL_REGISTRY_ROOT": str(shared)}

    def as_url(name: str) -> dict[str, str]:  # a pod of its own: its own mirror on its own disk
        return {**env, "PROPENSITY_MODEL_REGISTRY_ROOT": shared.as_uri(), "PROPENSITY_MODEL_CACHE_DIR": str(pipeline.root / f"cache-{name}")}

    shoppers = users(pipeline, 20)
    with running_server(as_path, pipeline.root / "registry-a.log") as a, running_server(as_url("b"), pipeline.root / "registry-b.log") as b:
        stop = threading.Event()
        calls: dict[str, list[str]] = {"a": [], "b": []}
        failures: list[str] = []

        def traffic(name: str, target: str) -> None:
            with grpc.insecure_channel(target) as channel:
                stub = pb_grpc.RecommendationServiceStub(channel)
                n = 0
                while not stop.is_set():
                    try:
                        calls[name].append(stub.Recommend(pb.RecommendRequest(user_id=shoppers[n % len(shoppers)], num_items=5), timeout=5).model_version)
                    except grpc.RpcError as error:
                        failures.append(f"{name}: {error.code().name} {error.details()}")
                    n += 1

        threads = [threading.Thread(target=traffic, args=(name, server.target)) for name, server in (("a", a), ("b", b))]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)
            promote = subprocess.run([str(BIN / "propensity"), "models", "promote", new, "--reason", "shared root test"],
                                     env=as_url("operator"), capture_output=True, text=True, timeout=120)
            assert promote.returncode == 0, promote.stdout + promote.stderr
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not all(c and c[-1] == new for c in calls.values()):
                time.sleep(0.2)
            time.sleep(1.0)  # traffic continues on the new version
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
    assert failures == []
    for name, seen in calls.items():
        assert seen[0] == current and seen[-1] == new, (name, seen[:3], seen[-3:])
        switch = seen.index(new)
        assert set(seen[:switch]) == {current} and set(seen[switch:]) == {new}, name  # one switch, never back
        assert len(seen) > 20, (name, len(seen))
    assert (shared / CURRENT).read_text() == f"{new}\n"
    # B loaded both versions from its own mirror, downloaded from the URL (A read the shared directory in place).
    assert (pipeline.root / "cache-b").exists() and not (work / "model-cache").exists()
    mirror = next(p for p in (pipeline.root / "cache-b").iterdir() if (p / MARKER).exists())
    assert sorted(p.name for p in (mirror / "versions").iterdir() if not p.name.startswith(".")) == [current, new]
    assert (mirror / CURRENT).read_text() == f"{new}\n"
    assert [e["version"] for e in read_history(shared) if e.get("reason") == "shared root test"] == [new]
