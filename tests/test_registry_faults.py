"""The registry changes under a running server: deleted version directories, half-written versions, CURRENT
pointing at garbage. The server keeps its last good model, logs why, and picks up the next valid promotion."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import grpc
import lightgbm as lgb
import pytest

from propensity.model_registry import (
    CURRENT,
    RANKER_MODEL,
    USER_MODEL,
    ModelLoadError,
    current_version,
    load_version,
    promote,
    save_version,
)
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from server.model_pool import ModelPool
from tests.conftest import SHOPPER, Pipeline, private_env, running_server, wait_for
from tests.test_model_registry import _metadata, boosters  # noqa: F401 - boosters is a fixture

GARBAGE_CURRENT = [b"\x00\xff\xfe binary", b"../../../etc/passwd\n", b"", b"v2999 with spaces\n", b"x" * 5000]


def cut_at_a_tree(path: Path) -> None:
    """Truncate a LightGBM model file right before its last tree: the kind of cut LightGBM's parser aborts the process on."""
    text = path.read_text()
    path.write_text(text[: text.rindex("\nTree=") + 1])


def clone_version(models: Path, source: str, target: str) -> str:
    directory = models / "versions" / target
    shutil.copytree(models / "versions" / source, directory)
    metadata = json.loads((directory / "metadata.json").read_text())
    (directory / "metadata.json").write_text(json.dumps({**metadata, "version": target}))
    return target


# Registry level, on small models: every damaged input is a ModelLoadError naming what is wrong, never a crash.


@pytest.mark.parametrize("content", GARBAGE_CURRENT, ids=["binary", "path", "empty", "spaces", "huge"])
def test_current_pointing_at_garbage_is_a_model_load_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / CURRENT).write_bytes(content)
    with pytest.raises(ModelLoadError, match="CURRENT: .*not a version id"):
        current_version(tmp_path)


def test_a_version_id_is_never_a_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a version id"):
        load_version(tmp_path, "../elsewhere")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: cut_at_a_tree(d / f"{RANKER_MODEL}.txt"), "content differs from the one saved"),
        (lambda d: (d / f"{USER_MODEL}.txt").unlink(), "file missing"),
        (lambda d: (d / "metadata.json").write_text("[1, 2]"), "not model metadata"),
        (lambda d: (d / "metadata.json").write_text('{"models": {"user_propensity": 3}}'), "lacks 'file' or 'feature_names'"),
        (lambda d: (d / "metadata.json").write_bytes(b"\xff\xfe"), "unreadable model metadata"),
    ],
    ids=["cut-model", "missing-model", "metadata-list", "metadata-shape", "metadata-binary"],
)
def test_a_half_written_version_is_refused_before_lightgbm_parses_it(tmp_path: Path, boosters, damage, message: str) -> None:  # noqa: F811
    directory = save_version(tmp_path, "v1", boosters, _metadata("v1"))
    damage(directory)
    with pytest.raises(ModelLoadError, match=message):
        load_version(tmp_path, "v1")


def test_a_cut_model_file_without_a_recorded_checksum_is_refused(tmp_path: Path, boosters) -> None:  # noqa: F811
    """Versions saved before checksums were recorded: the file must end the way LightGBM writes it."""
    directory = save_version(tmp_path, "v1", boosters, _metadata("v1"))
    metadata = json.loads((directory / "metadata.json").read_text())
    for info in metadata["models"].values():
        del info["sha256"]
    (directory / "metadata.json").write_text(json.dumps(metadata))
    assert load_version(tmp_path, "v1").version == "v1"
    cut_at_a_tree(directory / f"{RANKER_MODEL}.txt")
    with pytest.raises(ModelLoadError, match="does not end like one"):
        load_version(tmp_path, "v1")


def test_the_pool_retries_a_refused_version_once_it_is_repaired(tmp_path: Path, boosters: dict[str, lgb.Booster]) -> None:  # noqa: F811
    save_version(tmp_path, "v1", boosters, _metadata("v1"))
    promote(tmp_path, "v1")
    pool = ModelPool(tmp_path, lambda bundle: None, scoring_backend="lightgbm")
    directory = save_version(tmp_path, "v2", boosters, _metadata("v2"))
    good = (directory / f"{RANKER_MODEL}.txt").read_bytes()
    cut_at_a_tree(directory / f"{RANKER_MODEL}.txt")
    promote(tmp_path, "v2")
    assert pool.poll() is None and "v2" in pool.rejected
    assert pool.poll() is None  # unchanged on disk: not loaded (nor logged) again
    (directory / f"{RANKER_MODEL}.txt").write_bytes(good)
    promote(tmp_path, "v2")
    assert pool.refresh() and pool.current.version == "v2"


# A real server with real models from the pipeline.


@pytest.mark.slow
def test_the_server_keeps_its_last_good_model_through_registry_damage(pipeline: Pipeline) -> None:
    env, work = private_env(pipeline, "registry-faults", model_poll_seconds=0.2)
    models = work / "models"
    base = current_version(models)
    log = pipeline.root / "registry-faults.log"
    with running_server(env, log) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommendationServiceStub(channel)
        served: list[str] = []
        errors: list[str] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                try:
                    served.append(stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, num_items=5), timeout=10).model_version)
                except grpc.RpcError as error:
                    errors.append(f"{error.code().name}: {error.details()}")

        def serving() -> str:
            return stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).current_version

        def logged(text: str, times: int = 1) -> bool:
            return log.read_text().count(text) >= times

        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        try:
            first = clone_version(models, base, "v29990101T000001")
            promote(models, first)
            assert wait_for(lambda: serving() == first, 20)

            # The served version's directory is deleted: it keeps serving from memory and says so once.
            shutil.rmtree(models / "versions" / first)
            assert wait_for(lambda: logged(f"still serving {first} from memory"), 10), log.read_text()[-2000:]

            # A half-written version is promoted: a model file cut before its last tree (LightGBM would abort the
            # process on it) and, separately, a version directory without metadata.
            second = clone_version(models, base, "v29990101T000002")
            ranker = models / "versions" / second / f"{RANKER_MODEL}.txt"
            good = ranker.read_bytes()
            cut_at_a_tree(ranker)
            promote(models, second)
            assert wait_for(lambda: logged(f"refusing promoted model {second}, still serving {first}"), 10), log.read_text()[-2000:]
            third = clone_version(models, base, "v29990101T000003")
            (models / "versions" / third / "metadata.json").unlink()
            (models / CURRENT).write_text(third + "\n")  # promote() itself refuses a version without metadata
            assert wait_for(lambda: logged(f"refusing promoted model {third}, still serving {first}"), 10)

            # CURRENT pointing at garbage, then gone.
            for times, garbage in enumerate(GARBAGE_CURRENT, 1):
                (models / CURRENT).write_bytes(garbage)
                assert wait_for(lambda: logged("not a version id", times), 10), (garbage, log.read_text()[-2000:])
            assert logged(f"model registry unreadable, keeping model {first}", len(GARBAGE_CURRENT))
            (models / CURRENT).unlink()
            assert wait_for(lambda: logged("no current model"), 10)
            polls_before = log.read_text().count("no current model")
            wait_for(lambda: False, 1.0)  # five more polls
            assert log.read_text().count("no current model") == polls_before  # logged when it appears, not on every poll
            assert serving() == first

            # The next valid promotion is picked up: the repaired half-written version, under the same id.
            ranker.write_bytes(good)
            promote(models, second)
            assert wait_for(lambda: serving() == second, 20), log.read_text()[-2000:]
            assert wait_for(lambda: served and served[-1] == second, 10)
        finally:
            stop.set()
            thread.join(timeout=30)
        assert not errors, errors[:5]
        assert set(served) <= {base, first, second}
        assert served.index(second) > served.index(first)
        assert server.process.poll() is None
