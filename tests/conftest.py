"""Shared fixtures: a real pipeline run on small generated data, and a real server on a free port."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from propensity.demo import DemoDataConfig, generate_demo_data
from propensity.feature_store import copy_definitions, feast_apply

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The demo log deliberately ends in 2011: every end-to-end test then also checks that a
# historical log is rebased to today and served with fresh features.
HISTORICAL_END = datetime(2011, 12, 10, tzinfo=timezone.utc)
SHOPPER = "e2e-shopper"


@dataclass(frozen=True)
class Pipeline:
    """Where a pipeline run put everything, and the environment that points the CLI there."""

    root: Path
    data_dir: Path
    work_dir: Path
    feature_repo: Path
    env: dict[str, str]
    shopper_item: str
    run_output: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _add_scripted_shopper(data_dir: Path) -> str:
    """A shopper who viewed one mid-popularity item five times over three days and carted it twice, without buying."""
    events = pd.read_parquet(data_dir / "events.parquet")
    counts = events.loc[events["event_type"] == "purchase", "item_id"].value_counts()
    item = str(counts.index[len(counts) // 3])
    end = events["event_time"].max()
    times = [end - timedelta(days=3, hours=2), end - timedelta(days=2, hours=5), end - timedelta(days=2, hours=4, minutes=50),
             end - timedelta(days=1, hours=3), end - timedelta(hours=6)]
    rows = [("view", t) for t in times] + [("add_to_cart", times[2] + timedelta(minutes=2)), ("add_to_cart", times[4] + timedelta(minutes=3))]
    price = float(events.loc[events["item_id"] == item, "price"].iloc[0])
    scripted = pd.DataFrame(
        {
            "event_time": [t for _, t in rows],
            "user_id": SHOPPER,
            "item_id": item,
            "event_type": [kind for kind, _ in rows],
            "event_id": [f"scripted-{i}" for i in range(len(rows))],
            "session_id": [f"scripted-session-{t:%j%H}" for _, t in rows],
            "price": price,
            "quantity": 1,
        }
    )
    combined = pd.concat([events, scripted.astype(events.dtypes.to_dict())], ignore_index=True).sort_values("event_time", kind="stable")
    combined.to_parquet(data_dir / "events.parquet", index=False)
    return item


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """Generate a small historical demo log and run every stage through the real CLI."""
    root = tmp_path_factory.mktemp("pipeline")
    data_dir, work_dir = root / "raw", root / "var"
    feature_repo = copy_definitions(root / "feature_repo")
    generate_demo_data(data_dir, DemoDataConfig(n_users=700, n_items=150, n_categories=8, n_days=45, seed=11, end_time=HISTORICAL_END), progress=None)
    item = _add_scripted_shopper(data_dir)
    env = {
        **os.environ,
        "PROPENSITY_DATA_DIR": str(data_dir),
        "PROPENSITY_WORK_DIR": str(work_dir),
        "PROPENSITY_FEATURE_REPO": str(feature_repo),
        "PROPENSITY_CONFIG": str(root / "absent.toml"),
    }
    result = subprocess.run([str(BIN / "propensity"), "run"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"pipeline failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return Pipeline(root, data_dir, work_dir, feature_repo, env, item, result.stdout)


@dataclass(frozen=True)
class RunningServer:
    target: str
    process: subprocess.Popen
    log: Path


def wait_until_serving(target: str, process: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.3)
    raise TimeoutError(f"server at {target} not SERVING after {timeout}s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def running_server(env: dict[str, str], log: Path, *extra_args: str) -> Iterator[RunningServer]:
    """`propensity serve` on a free port with env; stopped (SIGTERM, then kill) on exit."""
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(BIN / "propensity"), "serve", "--port", str(port), *extra_args], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    target = f"localhost:{port}"
    try:
        wait_until_serving(target, process, log)
        yield RunningServer(target, process, log)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="session")
def server(pipeline: Pipeline) -> Iterator[RunningServer]:
    """The real server, as `propensity serve` starts it, on a free port."""
    with running_server(pipeline.env, pipeline.root / "server.log") as running:
        yield running


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def private_env(pipeline: Pipeline, name: str, copy_repo: bool = False, **server: object) -> tuple[dict[str, str], Path]:
    """A private copy of the pipeline's prepared data and models (and optionally its Feast repo with data), and server settings."""
    work = pipeline.root / name
    shutil.copytree(pipeline.work_dir, work)
    env = {**pipeline.env, "PROPENSITY_WORK_DIR": str(work)}
    if copy_repo:
        repo = pipeline.root / f"{name}-feature_repo"
        # Not the registry: its infra records name the original's SQLite tables by absolute path, and the
        # copy's next `feast apply` would drop those tables as "removed" (Feast's infra diff).
        shutil.copytree(pipeline.feature_repo, repo, ignore=shutil.ignore_patterns("registry.db"))
        feast_apply(repo)
        env["PROPENSITY_FEATURE_REPO"] = str(repo)
    env.update({f"PROPENSITY_SERVER__{key.upper()}": value if isinstance(value, str) else json.dumps(value) for key, value in server.items()})
    return env, work


def users(pipeline: Pipeline, n: int) -> list[str]:
    """The n most active users of the pipeline's log."""
    events = pd.read_parquet(pipeline.work_dir / "prepared" / "events.parquet", columns=["user_id"])
    return events["user_id"].value_counts().index[:n].astype(str).tolist()
