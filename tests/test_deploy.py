"""deploy/: the manifests validated offline against the Kubernetes OpenAPI schemas, the dashboard and alert
rules checked against the metrics the server exports, and the dev overlay run as local processes against the
real local Redis and PostgreSQL (no Docker engine or cluster here; docs/deploy.md)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import grpc
import pytest
import yaml

from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from tests.conftest import BIN, PROJECT_ROOT, free_port

DEPLOY = PROJECT_ROOT / "deploy"
OVERLAYS = ("base", "overlays/dev", "overlays/prod")
# The schemas kubernetes-validate ships; 1.30 is the oldest with the preStop `sleep` action enabled by default.
K8S_VERSIONS = ("1.30.0", "1.32.0")
SERVER_HEALTH_NAMES = {"", "propensity.v1.RecommendationService"}  # what server/app.py sets SERVING
MONITORING = DEPLOY / "base" / "monitoring"


def _kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render(overlay: str) -> list[dict]:
    """The overlay as `kustomize build` renders it (kubectl's built-in kustomize when the binary is absent)."""
    command = _kustomize()
    if command is None:
        message = "neither kustomize nor kubectl is installed"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run([*command, str(DEPLOY / overlay)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name_suffix: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    return found


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    specs = []
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            specs.append((d["metadata"]["name"], d["spec"]["template"]["spec"]))
        elif d["kind"] == "CronJob":
            specs.append((d["metadata"]["name"], d["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return specs


# ---------------------------------------------------------------------------------------------- validated


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_rendered_manifest_is_valid_against_the_kubernetes_openapi_schema(overlay: str, version: str) -> None:
    import kubernetes_validate

    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "CronJob", "Job", "PersistentVolumeClaim"} <= kinds
    for doc in docs:
        # strict: unknown fields (a typo such as `livenesProbe`) are errors, not ignored.
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_a_broken_manifest() -> None:
    """The control: the schema check above would catch a named port in a gRPC probe or a misspelt field."""
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    deployment = one(render("overlays/dev"), "Deployment", "propensity-server")
    named_port = json.loads(json.dumps(deployment))
    named_port["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    misspelt = json.loads(json.dumps(deployment))
    misspelt["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"grpc": {"port": 50051}}
    for broken in (named_port, misspelt):
        with pytest.raises(ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", ("overlays/dev", "overlays/prod"))
def test_the_server_deployment_probes_drains_and_is_sized_as_documented(overlay: str) -> None:
    docs = render(overlay)
    deployment = one(docs, "Deployment", "propensity-server")
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    settings = {k: v for cm in by_kind(docs, "ConfigMap") if cm["metadata"]["name"].endswith("propensity-settings") for k, v in cm["data"].items()}
    health_port = int(settings.get("PROPENSITY_SECURITY__HEALTH_PORT", settings["PROPENSITY_SERVER__PORT"]))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        grpc_probe = server[probe]["grpc"]
        assert grpc_probe["port"] == health_port, (probe, grpc_probe)
        assert grpc_probe.get("service", "") in SERVER_HEALTH_NAMES
    assert server["readinessProbe"]["grpc"]["service"] == "propensity.v1.RecommendationService"
    # SIGTERM grace covers the preStop sleep, the server's drain and a margin to exit.
    grace = float(settings["PROPENSITY_SERVER__GRACE_SECONDS"])
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + 3
    # One core per worker; memory limit at least the measured footprint (docs/deploy.md: ~0.9 GB PSS at 2 workers).
    workers = int(settings["PROPENSITY_SERVER__WORKERS"])
    cpu = server["resources"]["requests"]["cpu"]
    cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    assert cores >= 0.5 * workers and "memory" in server["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["affinity"]["podAntiAffinity"]
    # The PDB selects these pods, and there are always at least two of them.
    pdb = one(docs, "PodDisruptionBudget", "propensity-server")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    minimum = hpas[0]["spec"]["minReplicas"] if hpas else deployment["spec"]["replicas"]
    assert minimum >= 2
    assert not (hpas and "replicas" in deployment["spec"]), "with an HPA the Deployment must not fix replicas"
    service = one(docs, "Service", "propensity-server")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"].items() <= labels.items()


@pytest.mark.parametrize("overlay", ("overlays/dev", "overlays/prod"))
def test_every_container_runs_an_entrypoint_the_image_installs(overlay: str) -> None:
    docs = render(overlay)
    help_text = subprocess.run([str(BIN / "propensity"), "--help"], capture_output=True, text=True, check=True).stdout
    stages = set(re.search(r"\{([a-z,-]+)\}", help_text).group(1).split(","))
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    uid = int(re.search(r"^USER (\d+)", dockerfile, re.MULTILINE).group(1))
    seen = set()
    for name, spec in pod_specs(docs):
        assert spec["securityContext"]["runAsUser"] == uid, name
        for container in spec.get("initContainers", []) + spec["containers"]:
            command = container["command"][0]
            assert command in ("propensity", "feast", "python"), (name, command)
            assert (BIN / command).exists()
            if command == "python":  # a module of the installed package
                module = container["command"][2]
                assert container["command"][1] == "-m" and module.startswith("propensity.")
                assert subprocess.run([str(BIN / "python"), "-m", module, "--help"], capture_output=True).returncode == 0
            if command == "propensity":
                assert container["args"][0] in stages, (name, container["args"])
            seen.add(" ".join(container["command"][:1] + container["args"][:1]))
    assert {"propensity serve", "propensity materialize", "propensity prepare", "propensity build-features",
            "propensity publish", "propensity train", "feast --chdir"} <= seen


def test_the_dockerfile_is_multi_stage_non_root_and_installs_the_lock() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, re.MULTILINE)) >= 2
    assert re.search(r"^USER [1-9]\d*:", dockerfile, re.MULTILINE)
    assert "-c requirements.lock" in dockerfile
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.MULTILINE):
        for path in source.split():
            assert (PROJECT_ROOT / path).exists(), f"COPY {path}: not in the repository"


# ---------------------------------------------------------------------------------------------- metrics

_METRIC = re.compile(r"\b(propensity_[a-z_]+)\b")
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "gauge": ("",)}


def monitored_metrics() -> set[str]:
    """Every metric name the dashboard's queries and the alert rules use."""
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return {m for e in exprs for m in _METRIC.findall(e)}


def exported_series(families: dict[str, str]) -> set[str]:
    """Sample names a scrape can contain, from metric families and their types."""
    return {family + suffix for family, kind in families.items() for suffix in _SUFFIXES.get(kind, ("",))}


def registered_families() -> dict[str, str]:
    """The families server/metrics.py registers (name -> type): a fast check; the run test scrapes a real server."""
    source = (PROJECT_ROOT / "server" / "metrics.py").read_text()
    return {name: kind.lower() for kind, name in re.findall(r"\b(Counter|Gauge|Histogram)\(\s*\"(propensity_[a-z_]+)\"", source)}


def test_the_dashboard_and_alerts_name_only_metrics_the_server_registers() -> None:
    used = monitored_metrics()
    assert {"propensity_requests_total", "propensity_request_seconds_bucket", "propensity_fallbacks_total",
            "propensity_feature_age_seconds", "propensity_model_info"} <= used
    missing = used - exported_series(registered_families())
    assert not missing, f"not exported by server/metrics.py: {sorted(missing)}"
    rules = {r["alert"] for g in yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"] for r in g["rules"]}
    assert {"PropensityFeatureViewStale", "PropensityFallbackRateRising", "PropensityErrorRate"} <= rules
    assert "Proportion of requests by pod" in {p["title"] for p in json.loads((MONITORING / "dashboard.json").read_text())["panels"]}


# ---------------------------------------------------------------------------------------------- run
# The dev overlay's containers as local processes: command, args and env exactly as rendered; what a pod
# network and volumes would provide is substituted (host names of Services -> 127.0.0.1, ports, mount paths
# -> local directories), plus a private Redis database and PostgreSQL database so nothing else is touched.

TEST_REDIS_DBS = range(7, 16)
REDIS_LOCK = "propensity:test-lock"  # the convention of tests/test_store_profiles.py
EXTERNAL_HOSTS = ("redis", "postgres")  # Services the overlay expects beside it (docs/deploy.md)


@dataclass
class LocalCluster:
    docs: list[dict]
    root: Path
    overrides: dict[str, str]
    image_root: Path = field(init=False)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        from propensity.feature_store import copy_definitions

        # The image's /app: the feature definitions and profiles (deploy/Dockerfile copies the same files).
        self.image_root = self.root / "image"
        repo = copy_definitions(self.image_root / "feature_repo")
        shutil.copytree(PROJECT_ROOT / "feature_repo" / "profiles", repo / "profiles")
        (self.root / "home").mkdir()

    def workload(self, suffix: str) -> tuple[str, dict]:
        (found,) = [(n, s) for n, s in pod_specs(self.docs) if n.endswith(suffix)]
        return found

    def _mounts(self, pod: str, spec: dict, container: dict) -> dict[str, Path]:
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = {"/app": self.image_root}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                local = self.root / "volumes" / volume["persistentVolumeClaim"]["claimName"] / mount.get("subPath", "")
            elif "configMap" in volume:
                local = self.root / "configmaps" / volume["configMap"]["name"]
                data = one(self.docs, "ConfigMap", volume["configMap"]["name"])["data"]
                local.mkdir(parents=True, exist_ok=True)
                for key, value in data.items():
                    (local / key).write_text(value)
            elif "emptyDir" in volume:
                local = self.root / "emptydir" / pod / mount["name"]
            else:
                raise AssertionError(f"volume {volume} has no local equivalent in this test")
            local.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"]] = local
        # The offline tables are a mount inside the image's repository: the local repository must see the volume.
        data_link = self.image_root / "feature_repo" / "data"
        if "/app/feature_repo/data" in mounts and not data_link.exists():
            data_link.symlink_to(mounts["/app/feature_repo/data"], target_is_directory=True)
        return mounts

    @staticmethod
    def _translate(value: str, mounts: dict[str, Path], hosts: tuple[str, ...]) -> str:
        for mount_path in sorted(mounts, key=len, reverse=True):
            if value == mount_path or value.startswith(mount_path + "/"):
                value = str(mounts[mount_path]) + value[len(mount_path):]
                break
        for host in hosts:
            value = re.sub(rf"(?<![\w.-]){re.escape(host)}(?=:\d+)", "127.0.0.1", value)
        return value

    def _env(self, pod: str, container: dict, mounts: dict[str, Path]) -> dict[str, str]:
        hosts = EXTERNAL_HOSTS + tuple(s["metadata"]["name"] for s in by_kind(self.docs, "Service"))
        env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(self.root / "home"), "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"}
        for source in container.get("envFrom", []):
            env.update(one(self.docs, "ConfigMap", source["configMapRef"]["name"])["data"])
        for var in container.get("env", []):
            if "value" in var:  # Kubernetes expands $(VAR) from variables defined before it
                env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
                continue
            ref = var["valueFrom"]
            if "fieldRef" in ref:
                assert ref["fieldRef"]["fieldPath"] == "metadata.name"
                env[var["name"]] = pod
            elif "secretKeyRef" in ref:
                secret = one(self.docs, "Secret", ref["secretKeyRef"]["name"])
                env[var["name"]] = base64.b64decode(secret["data"][ref["secretKeyRef"]["key"]]).decode()
            else:
                env[var["name"]] = one(self.docs, "ConfigMap", ref["configMapKeyRef"]["name"])["data"][ref["configMapKeyRef"]["key"]]
        env = {k: self._translate(v, mounts, hosts) for k, v in env.items()}
        env.update(self.overrides)
        return env

    def start(self, pod: str, spec: dict, container: dict, log: Path, **overrides: str) -> subprocess.Popen:
        mounts = self._mounts(pod, spec, container)
        env = {**self._env(pod, container, mounts), **overrides}
        argv = [self._translate(a, mounts, ()) for a in container.get("command", []) + container.get("args", [])]
        argv[0] = str(BIN / argv[0])  # the image's PATH: the venv's console scripts
        cwd = self._translate(container.get("workingDir", "/app"), mounts, ())
        with log.open("w") as out:
            # Its own session, as a container is its own process tree: a SIGKILL of the group is a container kill.
            process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def run_to_completion(self, suffix: str, only: str | None = None, timeout: float = 240) -> None:
        """A Job or one run of a CronJob: init containers in order, then the container; each must exit 0."""
        name, spec = self.workload(suffix)
        pod = f"{name}-{uuid.uuid4().hex[:5]}"
        containers = spec.get("initContainers", []) + spec["containers"]
        for container in [c for c in containers if only is None or c["name"] == only]:
            log = self.root / f"{pod}-{container['name']}.log"
            process = self.start(pod, spec, container, log)
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                raise
            assert code == 0, f"{name} container {container['name']} exited {code}:\n{log.read_text()[-3000:]}"

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture
def private_stores() -> Iterator[tuple[int, str]]:
    """A free Redis database among 7-15 (lock key, flushed afterwards) and a fresh PostgreSQL database name (dropped)."""
    import psycopg
    import redis
    from psycopg import sql

    token = uuid.uuid4().hex[:10]
    claimed = None
    try:
        for db in TEST_REDIS_DBS:
            client = redis.Redis(host="127.0.0.1", port=6379, db=db, socket_timeout=2)
            if client.set(REDIS_LOCK, token, nx=True, ex=1800):
                claimed = client
                break
    except redis.exceptions.ConnectionError as error:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"no local Redis: {error}")
    if claimed is None:
        pytest.fail(f"no free Redis database among {list(TEST_REDIS_DBS)}")
    for key in claimed.scan_iter(count=1000):
        if key != REDIS_LOCK.encode():
            claimed.delete(key)
    database = f"propensity_deploy_{os.getpid()}_{token}"
    try:
        yield claimed.connection_pool.connection_kwargs["db"], database
    finally:
        claimed.flushdb()
        with contextlib.suppress(psycopg.OperationalError), psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))


def _health(target: str, service: str) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status


def _wait_ready(target: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """The startup and readiness probes as the kubelet runs them: both health names SERVING."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited {process.returncode}:\n{log.read_text()[-3000:]}"
        with contextlib.suppress(grpc.RpcError):
            if all(_health(target, name) == 1 for name in SERVER_HEALTH_NAMES):
                return
        time.sleep(0.3)
    raise TimeoutError(f"{target} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_the_dev_overlay_runs_two_replicas_jobs_and_a_promotion_against_real_redis_and_postgres(tmp_path: Path, private_stores) -> None:
    import pandas as pd
    from prometheus_client.parser import text_string_to_metric_families

    redis_db, pg_database = private_stores
    cluster = LocalCluster(render("overlays/dev"), tmp_path, {"PROPENSITY_REDIS_DB": str(redis_db), "PROPENSITY_PG_DATABASE": pg_database})
    try:
        # The raw export the pipeline reads (in a cluster: whatever lands shop events on the volume).
        name, pipeline_spec = cluster.workload("propensity-pipeline")
        raw = tmp_path / "volumes" / one(cluster.docs, "PersistentVolumeClaim", "propensity-data")["metadata"]["name"] / "raw"
        subprocess.run([str(BIN / "propensity"), "demo-data", "--out", str(raw), "--users", "300", "--items", "80", "--days", "30"],
                       check=True, capture_output=True, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home")}, cwd=tmp_path)

        cluster.run_to_completion("propensity-feast-apply")
        cluster.run_to_completion("propensity-pipeline")  # prepare, build-features, publish, train (promotes)
        cluster.run_to_completion("propensity-materialize")

        server_name, server_spec = cluster.workload("propensity-server")
        (container,) = server_spec["containers"]
        replicas = {}
        for replica in ("a", "b"):
            pod = f"{server_name}-{replica}"
            port, metrics_port = free_port(), free_port()
            log = tmp_path / f"{pod}.log"
            process = cluster.start(pod, server_spec, container, log,
                                    PROPENSITY_SERVER__PORT=str(port), PROPENSITY_SERVER__METRICS_PORT=str(metrics_port))
            replicas[replica] = (f"127.0.0.1:{port}", process, log, metrics_port)
        for target, process, log, _ in replicas.values():
            _wait_ready(target, process, log)
        (a, process_a, _, _), (b, process_b, log_b, metrics_b) = replicas["a"], replicas["b"]
        channel_a, channel_b = grpc.insecure_channel(a), grpc.insecure_channel(b)
        stub_a, stub_b = pb_grpc.RecommendationServiceStub(channel_a), pb_grpc.RecommendationServiceStub(channel_b)

        # Replica B answers health and a personalised Recommend.
        work = raw.parent / "work"
        events = pd.read_parquet(work / "prepared" / "events.parquet", columns=["user_id", "item_id", "event_type"])
        active = events["user_id"].value_counts().index[:10].astype(str).tolist()
        answer = stub_b.Recommend(pb.RecommendRequest(user_id=active[0], num_items=5), timeout=5)
        assert len(answer.items) == 5 and not answer.fallback_used, answer

        # An event ingested through A changes B's next answer: both read the one Redis online store.
        user = active[3]
        items = pd.read_parquet(work / "prepared" / "items.parquet", columns=["item_id", "available"])
        bought = set(events.loc[(events["user_id"] == user) & (events["event_type"] == "purchase"), "item_id"])
        catalog = [i for i in items.loc[items["available"], "item_id"].astype(str) if i not in bought]
        before = stub_b.ScoreItems(pb.ScoreItemsRequest(user_id=user, item_ids=catalog), timeout=5)
        low = min((s for s in before.scores if s.known_item), key=lambda s: s.score)
        now = datetime.now(timezone.utc).isoformat()
        sent = [pb.Event(event_id=f"deploy-{uuid.uuid4().hex}", event_time=now, user_id=user, item_id=low.item_id, event_type=kind, price=9.5)
                for kind in ("view", "view", "add_to_cart")]
        response = stub_a.IngestEvents(iter([pb.IngestEventsRequest(events=sent)]), timeout=30)
        assert (response.accepted, response.rejected) == (3, 0), response
        after = stub_b.ScoreItems(pb.ScoreItemsRequest(user_id=user, item_ids=[low.item_id]), timeout=5).scores[0].score
        assert after > 2 * low.score, (low.score, after)

        # A promotion by the training job reaches both replicas, with zero failed calls under traffic.
        old = stub_b.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).current_version
        assert stub_a.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).current_version == old
        failures, answered, stop = [], {"a": set(), "b": set()}, threading.Event()

        def traffic(replica: str, stub: pb_grpc.RecommendationServiceStub) -> None:
            k = 0
            while not stop.is_set():
                try:
                    reply = stub.Recommend(pb.RecommendRequest(user_id=active[k % len(active)], num_items=5), timeout=5)
                    answered[replica].add(reply.model_version)
                except grpc.RpcError as error:
                    failures.append((replica, error.code(), error.details()))
                k += 1
                time.sleep(0.01)

        threads = [threading.Thread(target=traffic, args=("a", stub_a)), threading.Thread(target=traffic, args=("b", stub_b))]
        for thread in threads:
            thread.start()
        try:
            cluster.run_to_completion("propensity-pipeline", only="train")
            new = (work / "models" / "CURRENT").read_text().strip()
            assert new != old
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(new in seen for seen in answered.values()):
                time.sleep(0.2)
            time.sleep(0.5)  # traffic keeps running on the new version too
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=10)
        assert not failures, failures[:5]
        assert all({old, new} <= seen for seen in answered.values()), answered
        for stub in (stub_a, stub_b):
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).current_version == new

        # Every metric the dashboard and alert rules use is in a real scrape of replica B.
        import urllib.request

        scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_b}/metrics", timeout=5).read().decode()
        families = {f.name: f.type for f in text_string_to_metric_families(scrape)}  # counters without _total
        missing = monitored_metrics() - exported_series(families)
        assert not missing, f"not in replica B's /metrics: {sorted(missing)}"

        # SIGKILL replica A (its whole process tree, as a container kill): B keeps serving.
        os.killpg(process_a.pid, signal.SIGKILL)
        process_a.wait(timeout=10)
        with pytest.raises(grpc.RpcError):
            stub_a.Recommend(pb.RecommendRequest(user_id=active[0], num_items=5), timeout=2)
        for user_id in active:
            reply = stub_b.Recommend(pb.RecommendRequest(user_id=user_id, num_items=5), timeout=5)
            assert reply.items and reply.model_version == new
        assert _health(b, "propensity.v1.RecommendationService") == 1

        # SIGTERM: B drains and exits within the pod's termination grace.
        channel_a.close()
        channel_b.close()
        grace = server_spec["terminationGracePeriodSeconds"] - server_spec["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
        started = time.monotonic()
        process_b.send_signal(signal.SIGTERM)
        assert process_b.wait(timeout=grace) == 0, log_b.read_text()[-3000:]
        assert time.monotonic() - started < grace
    finally:
        cluster.stop_all()
