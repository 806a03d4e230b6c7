"""What changes for a managed Redis or Redis Cluster, tested on local redis-servers started here on spare ports:
AUTH through the production profile's connection string, and the server's read commands on Feast's cluster client."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from propensity.store_profiles import check_reachable
from server.store_reads import harden_redis
from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None and os.environ.get("CI") != "true", reason="redis-server is not installed")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too (an ephemeral port's often is not)."""
    while True:
        port = random.randrange(20000, 40000)
        if _free(port) and _free(port + 10000):
            return port


@contextlib.contextmanager
def redis_servers(directory: Path, count: int, *extra: str) -> Iterator[list[int]]:
    """count throw-away redis-servers on free ports (no persistence), stopped on exit."""
    ports = [cluster_port() for _ in range(count)]
    processes = []
    try:
        for port in ports:
            (directory / str(port)).mkdir(parents=True)
            processes.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(directory / str(port)), *extra],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            ))
        for port in ports:
            deadline = time.monotonic() + 30
            while not _accepting(port):
                assert time.monotonic() < deadline, f"redis-server on {port} did not start"
                time.sleep(0.1)
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _online_config(repo: Path, profile: str):
    from feast.repo_config import load_repo_config

    return load_repo_config(repo, PROJECT_ROOT / "feature_repo" / "profiles" / profile).online_store


def test_a_password_in_the_profiles_connection_string_reaches_redis_through_feasts_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import redis
    from feast.infra.online_stores.redis import RedisOnlineStore

    with redis_servers(tmp_path, 1, "--requirepass", "s3cret") as (port,):
        monkeypatch.setenv("PROPENSITY_REDIS_ADDRESS", f"127.0.0.1:{port},password=s3cret")  # the Secret's redis-address
        monkeypatch.setenv("PROPENSITY_REDIS_DB", "0")
        check_reachable(PROJECT_ROOT / "feature_repo" / "profiles" / "redis.yaml")  # reads host:port, skipping password=
        client = RedisOnlineStore()._get_client(_online_config(PROJECT_ROOT / "feature_repo", "redis.yaml"))
        harden_redis(client, 0.25)
        assert client.ping() is True
        client.hset(b"k", mapping={b"f": b"v"})
        assert client.hmget(b"k", [b"f"]) == [b"v"]
        monkeypatch.setenv("PROPENSITY_REDIS_ADDRESS", f"127.0.0.1:{port}")  # the control: the same server without the password
        with pytest.raises(redis.exceptions.AuthenticationError):
            RedisOnlineStore()._get_client(_online_config(PROJECT_ROOT / "feature_repo", "redis.yaml")).ping()


def test_the_servers_pipelined_reads_work_on_feasts_redis_cluster_client(tmp_path: Path) -> None:
    from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig, RedisType
    from redis.cluster import RedisCluster

    with redis_servers(tmp_path, 3, "--cluster-enabled", "yes", "--cluster-node-timeout", "2000") as ports:
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        deadline = time.monotonic() + 20
        while "cluster_state:ok" not in subprocess.run(["redis-cli", "-p", str(ports[0]), "cluster", "info"], capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline, "cluster never became ok"
            time.sleep(0.2)
        config = RedisOnlineStoreConfig(
            redis_type=RedisType.redis_cluster,
            connection_string=f"127.0.0.1:{ports[0]},127.0.0.1:{ports[1]},socket_timeout=0.25,socket_connect_timeout=0.25",
        )
        client = RedisOnlineStore()._get_client(config)
        assert isinstance(client, RedisCluster)
        harden_redis(client, 0.25)  # no connection_pool on a cluster client: the timeouts come from the connection string
        keys = [f"entity-{i}".encode() for i in range(60)]
        slots = {client.keyslot(key) for key in keys}
        owners = {client.get_node_from_key(key).port for key in keys}
        assert len(owners) == 3 and len(slots) > 30  # the keys really live on every node
        for key in keys:
            client.hset(key, mapping={b"a": key, b"_ts:view": b"1"})
        # server/store_reads.py RedisRead.read: one HMGET per entity, pipelined without a transaction
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, [b"a", b"_ts:view", b"missing"])
            replies = pipe.execute()
        assert replies == [[key, b"1", None] for key in keys]
