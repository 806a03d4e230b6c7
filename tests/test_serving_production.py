"""The production serving path against real server processes: versions, reload, explanations, deadlines, operations."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from propensity.candidates import generate_candidates
from propensity.feature_store import open_store
from propensity.model_registry import RANKER_MODEL, ModelBundle, apply_calibration, current_version, load_version, output_transform, promote
from propensity.settings import CandidateSettings, Settings
from propensity.user_state import UserState
from server import background
from server.app import serve
from server.item_cache import CatalogSourceStamp, CatalogSpec, ItemCache, build_catalog
from server.model_pool import ModelPool
from server.online_features import OnlineUserFeatures
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from tests import background_hooks
from tests.conftest import SHOPPER, Pipeline, RunningServer, free_port, private_env, running_server, users, wait_for

pytestmark = pytest.mark.slow


def clone_version(models: Path, source: str, target: str, damage: Callable[[Path], None] | None = None) -> str:
    """A new registry version copied from `source` (the same trees under another id), optionally damaged."""
    directory = models / "versions" / target
    shutil.copytree(models / "versions" / source, directory)
    metadata = json.loads((directory / "metadata.json").read_text())
    metadata["version"] = target
    (directory / "metadata.json").write_text(json.dumps(metadata))
    if damage:
        damage(directory)
    return target


@pytest.fixture(scope="module")
def prod(pipeline: Pipeline) -> Iterator[tuple[RunningServer, pb_grpc.RecommendationServiceStub, Path, int]]:
    metrics_port = free_port()
    env, work = private_env(
        pipeline, "prod", metrics_port=metrics_port, explain_top_features=1000, deadline_floor_ms=300,
        model_poll_seconds=0.3, log_format="json", served_log_dir=str(pipeline.root / "served"), served_log_sample_rate=1.0,
    )
    with running_server(env, pipeline.root / "prod.log") as server:
        channel = grpc.insecure_channel(server.target)
        yield server, pb_grpc.RecommendationServiceStub(channel), work, metrics_port
        channel.close()


def test_explanations_sum_to_the_raw_score(prod) -> None:
    _, stub, work, _ = prod
    response = stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, num_items=5, explain=True), timeout=5)
    assert response.items
    bundle = load_version(work / "models", response.model_version)
    ranking_objective = "lambdarank" in bundle.ranker.dump_model()["objective"]
    for item in response.items:
        total = item.base_value + sum(c.contribution for c in item.contributions)
        assert total == pytest.approx(item.raw_score, abs=1e-6)
        # The score is the model's own output for that raw score (a probability for the binary objective,
        # the raw score for lambdarank), after the calibration stored with the model.
        native = item.raw_score if ranking_objective else 1 / (1 + math.exp(-item.raw_score))
        assert apply_calibration(bundle.calibration(RANKER_MODEL), np.array([native]))[0] == pytest.approx(item.score, abs=1e-9)
        magnitudes = [abs(c.contribution) for c in item.contributions]
        assert magnitudes == sorted(magnitudes, reverse=True)
    top_reasons = {c.feature for c in response.items[0].contributions[:5]}
    assert top_reasons & {"ui_views_7d", "ui_carts_7d", "ui_in_cart", "ui_days_since_last", "ui_recent_rank", "ui_covisit_score"}
    plain = stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, num_items=5), timeout=5)
    assert all(not item.contributions for item in plain.items)


def generator_sources(pipeline: Pipeline, user_ids: list[str]) -> set[str]:
    """The source names the candidate generator gives these users' candidates, from the features the servers read."""
    defaults = Settings.model_fields
    catalog = build_catalog(CatalogSpec(pipeline.feature_repo, None, defaults["item_feature_service"].default))
    rows = OnlineUserFeatures(open_store(pipeline.feature_repo), defaults["user_feature_service"].default).fetch(user_ids)
    names: set[str] = set()
    for user, row in zip(user_ids, rows):
        candidates = generate_candidates(UserState.from_row(user, row, catalog), catalog, CandidateSettings())
        names.update(str(name) for name in candidates.item_sources)
    return names


def profile_only_user(pipeline: Pipeline) -> str:
    """A user with a profile (signup time) but no events: the NO_HISTORY fallback."""
    events = set(pd.read_parquet(pipeline.work_dir / "prepared" / "events.parquet", columns=["user_id"])["user_id"].astype(str))
    profiles = pd.read_parquet(pipeline.work_dir / "prepared" / "users.parquet", columns=["user_id", "signup_time"]).sort_values("signup_time")
    return next(u for u in profiles["user_id"].astype(str) if u not in events)


def assert_reads_right(response: pb.RecommendResponse, sources: set[str]) -> None:
    """Ranks 1..n, scores non-increasing with rank, every item names a candidate source among `sources`."""
    assert response.items
    assert [item.rank for item in response.items] == list(range(1, len(response.items) + 1))
    scores = [item.score for item in response.items]
    assert scores == sorted(scores, reverse=True), scores
    if response.items[0].contributions:  # explain: raw scores (sums of contributions, to rounding) are the ranking order
        raws = [item.raw_score for item in response.items]
        assert all(a >= b - 1e-9 for a, b in zip(raws, raws[1:])), raws
    named = [item.candidate_source for item in response.items]
    assert all(named) and set(named) <= sources, named


def test_every_recommend_answer_falls_in_score_with_rank_and_names_its_sources(prod, pipeline: Pipeline) -> None:
    _, stub, _, _ = prod
    generated = generator_sources(pipeline, [SHOPPER])
    assert "recent" in generated and len(generated) >= 2
    newcomer = profile_only_user(pipeline)
    for explain in (False, True):
        personal = stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, num_items=20, explain=explain), timeout=5)
        assert not personal.fallback_used
        assert_reads_right(personal, generated)
        assert len({item.candidate_source for item in personal.items}) >= 2
        for user, reason in (("nobody-at-all", pb.FALLBACK_REASON_UNKNOWN_USER), (newcomer, pb.FALLBACK_REASON_NO_HISTORY)):
            fallback = stub.Recommend(pb.RecommendRequest(user_id=user, num_items=20, explain=explain), timeout=5)
            assert fallback.fallback_reason == reason, user
            assert_reads_right(fallback, {"popular"})
        late = stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, num_items=20, explain=explain), timeout=0.25)  # floor is 300 ms
        assert late.fallback_reason == pb.FALLBACK_REASON_DEADLINE
        assert_reads_right(late, {"popular"})
        chosen = [item.item_id for item in personal.items[:6]][::-1] + ["not-an-item"]
        requested = stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, candidate_item_ids=chosen, explain=explain), timeout=5)
        assert_reads_right(requested, {"request"})
        assert sorted(item.item_id for item in requested.items) == sorted(chosen)


def test_explanations_of_a_fallback_answer_sum_to_its_raw_scores(prod) -> None:
    _, stub, work, _ = prod
    response = stub.Recommend(pb.RecommendRequest(user_id="nobody-at-all", num_items=10, explain=True), timeout=5)
    assert response.fallback_reason == pb.FALLBACK_REASON_UNKNOWN_USER and len(response.items) == 10
    bundle = load_version(work / "models", response.model_version)
    native = output_transform(bundle.ranker)
    for item in response.items:
        assert item.contributions and item.candidate_source == "popular"
        assert item.base_value + sum(c.contribution for c in item.contributions) == pytest.approx(item.raw_score, abs=1e-6)
        assert apply_calibration(bundle.calibration(RANKER_MODEL), native(np.array([item.raw_score])))[0] == pytest.approx(item.score, abs=1e-9)
    plain = stub.Recommend(pb.RecommendRequest(user_id="nobody-at-all", num_items=10), timeout=5)
    assert [i.item_id for i in plain.items] == [i.item_id for i in response.items]
    assert all(not item.contributions for item in plain.items)


def test_a_tight_deadline_gets_the_fallback_instead_of_an_error(prod) -> None:
    _, stub, _, _ = prod
    response = stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, num_items=5), timeout=0.25)  # floor is 300 ms
    assert response.fallback_used and response.fallback_reason == pb.FALLBACK_REASON_DEADLINE
    assert len(response.items) == 5
    relaxed = stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, num_items=5), timeout=5)
    assert not relaxed.fallback_used


def test_the_request_id_is_honoured_and_echoed(prod) -> None:
    _, stub, _, _ = prod
    response, call = stub.Recommend.with_call(pb.RecommendRequest(user_id=SHOPPER), timeout=5, metadata=[("x-request-id", "req-42")])
    assert response.request_id == "req-42"
    assert ("x-request-id", "req-42") in call.initial_metadata()
    generated, call = stub.Recommend.with_call(pb.RecommendRequest(user_id=SHOPPER), timeout=5)
    assert generated.request_id and dict(call.initial_metadata())["x-request-id"] == generated.request_id


def test_metrics_endpoint_reports_requests_stages_fallbacks_models_and_freshness(prod) -> None:
    server, stub, _, metrics_port = prod
    stub.Recommend(pb.RecommendRequest(user_id=SHOPPER), timeout=5)
    stub.Recommend(pb.RecommendRequest(user_id="nobody-at-all"), timeout=5)
    with pytest.raises(grpc.RpcError):
        stub.Recommend(pb.RecommendRequest(user_id=""), timeout=5)

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()

    assert wait_for(lambda: 'code="INVALID_ARGUMENT"' in scrape(), 5)
    text = scrape()
    assert re.search(r'propensity_requests_total\{code="OK",method="Recommend"\} [1-9]', text)
    assert re.search(r'propensity_request_seconds_bucket\{code="OK",le="0.005",method="Recommend"\}', text)
    for stage in ("features", "candidates", "scoring"):
        assert re.search(rf'propensity_stage_seconds_count\{{stage="{stage}"\}} [1-9]', text), stage
    assert re.search(r'propensity_fallbacks_total\{reason="UNKNOWN_USER"\} [1-9]', text)
    assert re.search(r'propensity_model_info\{role="current",version="v[0-9T]+"\} 1.0', text)
    assert re.search(r'propensity_feature_age_seconds\{feature_view="user_activity"\} [0-9.e+]+', text)
    assert "propensity_item_cache_age_seconds" in text
    # The event-loop lag monitor runs (its sample count keeps growing) and reports a finite, non-negative lag.
    count = loop_lag(text, "propensity_event_loop_lag_seconds_count")
    assert count["0"] > 0
    assert wait_for(lambda: loop_lag(scrape(), "propensity_event_loop_lag_seconds_count")["0"] > count["0"], 5)
    assert 0.0 <= loop_lag(text, "propensity_event_loop_lag_max_seconds")["0"] < 60.0
    # Periodic work is marked (the model poll runs every 0.3 s here): its steps on the loop are timed and the lag
    # samples taken meanwhile are counted apart, so the bench can tell its stalls from the load's lag.
    def periodic(name: str, task: str) -> float:
        match = re.search(rf'^{name}\{{task="{task}",worker="0"\}} (\S+)$', scrape(), re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    assert wait_for(lambda: periodic("propensity_periodic_loop_step_seconds_count", "model poll") > 0, 5)
    assert wait_for(lambda: periodic("propensity_event_loop_lag_during_periodic_work_seconds_count", "any") > 0, 5)
    assert periodic("propensity_event_loop_lag_during_periodic_work_seconds_count", "model poll") > 0


def loop_lag(text: str, name: str) -> dict[str, float]:
    """worker -> value of one event-loop lag series in a scrape."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf'^{name}\{{worker="([0-9]+)"\}} (\S+)$', text, re.MULTILINE)}


def test_pinning_and_hot_reload_under_continuous_traffic(prod) -> None:
    _, stub, work, _ = prod
    models = work / "models"
    before = current_version(models)
    after = clone_version(models, before, "v29990101T000000")
    errors: list[str] = []
    seen: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                seen.append(stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, num_items=5), timeout=5).model_version)
            except grpc.RpcError as error:
                errors.append(f"{error.code().name}: {error.details()}")

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        promote(models, after)
        assert wait_for(lambda: seen and seen[-1] == after, 15), "promotion was not picked up"
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, errors[:3]
    assert before in seen and after in seen
    assert seen.index(after) > seen.index(before)
    pinned = stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, model_version=before), timeout=5)
    assert pinned.model_version == before


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "item_ranker.txt").write_text("not a LightGBM model"),
        lambda d: (d / "metadata.json").write_text(
            json.dumps({**json.loads((d / "metadata.json").read_text()), "feature_services": {
                "user": {"name": "propensity_user_v1", "fingerprint": "0000000000000000"},
                "item": json.loads((d / "metadata.json").read_text())["feature_services"]["item"]}})
        ),
    ],
    ids=["unreadable-model", "feature-service-changed"],
)
def test_a_broken_promotion_is_rejected_and_the_old_model_keeps_serving(prod, damage) -> None:
    server, stub, work, _ = prod
    models = work / "models"
    serving = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).current_version
    broken = clone_version(models, serving, f"v2999{len(list((models / 'versions').iterdir())):04d}T000000", damage)
    promote(models, broken)
    assert wait_for(lambda: f"refusing promoted model {broken}" in server.log.read_text(), 10)
    for _ in range(10):
        assert stub.Recommend(pb.RecommendRequest(user_id=SHOPPER), timeout=5).model_version == serving
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).current_version == serving
    promote(models, serving)


def test_served_features_and_scores_are_logged(prod, pipeline: Pipeline) -> None:
    _, stub, _, _ = prod
    stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, num_items=3), timeout=5, metadata=[("x-request-id", "logged-1")])
    directory = pipeline.root / "served"

    def mine() -> pd.DataFrame:
        files = list(directory.glob("served-*.parquet"))
        logged = pd.concat(pd.read_parquet(p) for p in files) if files else pd.DataFrame({"request_id": []})
        return logged[logged["request_id"] == "logged-1"]

    assert wait_for(lambda: len(mine()) > 0, 20)  # flushed every few seconds
    mine = mine()
    assert len(mine) == 3 and set(mine["user_id"]) == {SHOPPER}
    assert {"ui_carts_7d", "item_price", "score", "model_version", "item_id"} <= set(mine.columns)


def test_traffic_split_is_stable_per_user_shadow_is_logged_and_categories_are_capped(pipeline: Pipeline) -> None:
    env, work = private_env(pipeline, "split", max_items_per_category=1)
    models = work / "models"
    base = current_version(models)
    arm_b = clone_version(models, base, "v29990202T000000")
    env["PROPENSITY_SERVER__TRAFFIC_SPLIT"] = json.dumps({base: 0.5, arm_b: 0.5})
    env["PROPENSITY_SERVER__SHADOW_VERSION"] = arm_b
    with running_server(env, pipeline.root / "split.log") as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommendationServiceStub(channel)
        shoppers = users(pipeline, 60)
        first = {u: stub.Recommend(pb.RecommendRequest(user_id=u), timeout=5).model_version for u in shoppers}
        again = {u: stub.Recommend(pb.RecommendRequest(user_id=u), timeout=5).model_version for u in shoppers}
        assert first == again
        assert set(first.values()) == {base, arm_b}
        assert 10 <= sum(v == base for v in first.values()) <= 50
        pinned = stub.Recommend(pb.RecommendRequest(user_id=shoppers[0], model_version=base), timeout=5)
        assert pinned.model_version == base
        catalog = pd.read_parquet(work / "prepared" / "items.parquet", columns=["item_id", "category_id"]).set_index("item_id")["category_id"]
        generated = generator_sources(pipeline, shoppers[:10])
        for user in shoppers[:10]:
            response = stub.Recommend(pb.RecommendRequest(user_id=user, num_items=5, explain=user in shoppers[:3]), timeout=5)
            items = [i.item_id for i in response.items]
            assert len(set(catalog[items])) == len(items), items
            assert_reads_right(response, generated)
        for user, reason in (("nobody-at-all", pb.FALLBACK_REASON_UNKNOWN_USER), (profile_only_user(pipeline), pb.FALLBACK_REASON_NO_HISTORY)):
            for explain in (False, True):
                fallback = stub.Recommend(pb.RecommendRequest(user_id=user, num_items=5, explain=explain), timeout=5)
                assert fallback.fallback_reason == reason
                items = [i.item_id for i in fallback.items]
                assert len(set(catalog[items])) == len(items), items
                assert_reads_right(fallback, {"popular"})
        assert wait_for(lambda: "shadow scoring" in server.log.read_text(), 5)


def test_graceful_shutdown_finishes_calls_in_flight(pipeline: Pipeline) -> None:
    env, _ = private_env(pipeline, "shutdown", grace_seconds=20)
    shoppers = users(pipeline, 1000)
    many = (shoppers * (2_000 // len(shoppers) + 1))[:2_000]  # 2k ids: about two seconds per call here
    with running_server(env, pipeline.root / "shutdown.log") as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.RecommendationServiceStub(channel)
        calls = [stub.ScoreUsers.future(pb.ScoreUsersRequest(user_ids=many), timeout=60) for _ in range(4)]
        for call in calls:
            call.initial_metadata()  # sent when the handler starts: every call is now in flight
        server.process.send_signal(signal.SIGTERM)
        results = []
        for call in calls:
            try:
                results.append(len(call.result().scores))
            except grpc.RpcError as error:
                results.append(f"{error.code().name}: {error.details()}")
        assert server.process.wait(timeout=60) == 0
        assert results == [2_000] * 4
        log = server.log.read_text()
        assert log.index("shutting down: health NOT_SERVING") < log.index("stopped")


def test_two_worker_processes_share_the_port(pipeline: Pipeline) -> None:
    metrics_port = free_port()
    env, _ = private_env(pipeline, "workers", workers=2, metrics_port=metrics_port)
    with running_server(env, pipeline.root / "workers.log") as server:
        children = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2
        answered = 0
        for _ in range(8):  # SO_REUSEPORT balances connections, so use several
            with grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                response = pb_grpc.RecommendationServiceStub(channel).Recommend(pb.RecommendRequest(user_id=SHOPPER), timeout=10)
                answered += bool(response.items)
        assert answered == 8

        def lag_counts() -> dict[str, float]:
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            return loop_lag(text, "propensity_event_loop_lag_seconds_count")

        # The parent serves every worker's event-loop lag, each under its own label, and no series of its own.
        assert wait_for(lambda: set(lag_counts()) == {"0", "1"} and min(lag_counts().values()) > 0, 10), lag_counts()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0


def test_catalog_builds_and_model_loads_run_off_the_event_loop(pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server whose catalog build and model poll both hang until the test releases them keeps answering meanwhile.

    Were either run on the event loop, the loop would hang with it and the calls below would time out.
    The server runs in this process (serve() on a loop thread of its own) so that the jobs can be held.
    """
    env, _ = private_env(pipeline, "off-loop", host="127.0.0.1", port=free_port(), item_cache_refresh_seconds=0.2, model_poll_seconds=0.2)
    for key, value in env.items():
        if key.startswith("PROPENSITY_"):
            monkeypatch.setenv(key, value)
    settings = Settings()
    release = threading.Event()
    polled_on: list[int] = []
    poll = ModelPool.poll

    def held_poll(self: ModelPool) -> ModelBundle | None:
        polled_on.append(threading.get_ident())
        release.wait(300)
        return poll(self)

    installed_on: list[tuple[int, bool]] = []
    install = ItemCache.install

    def recorded_install(self: ItemCache, catalog: object, digest: str, built_from: str | None = None) -> None:
        installed_on.append((threading.get_ident(), catalog is not None))
        install(self, catalog, digest, built_from)  # type: ignore[arg-type]

    marker = tmp_path / "build"
    marker.mkdir()
    monkeypatch.setattr(ModelPool, "poll", held_poll)
    monkeypatch.setattr(ItemCache, "install", recorded_install)
    monkeypatch.setattr(CatalogSourceStamp, "__call__", lambda self: None)  # "cannot stamp": every refresh builds
    # Runs in the build process: records its pid, waits for <marker>/release, returns a catalog that counts as new.
    monkeypatch.setattr(background, "build_catalog_pieces", functools.partial(background_hooks.blocking_build, str(marker)))

    started: queue.Queue = queue.Queue()
    running: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def run() -> None:
        async def main() -> None:
            stop = asyncio.Event()
            running.append((asyncio.get_running_loop(), stop))
            await serve(settings, on_started=started.put, stop=stop)

        asyncio.run(main())

    root = logging.getLogger()
    handlers, level, switch = list(root.handlers), root.level, sys.getswitchinterval()
    loop_thread = threading.Thread(target=run, name="serving-loop", daemon=True)
    loop_thread.start()
    try:
        port = started.get(timeout=180).port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.RecommendationServiceStub(channel)
            assert wait_for(lambda: bool(polled_on) and (marker / "started").exists(), 240), "the background jobs never started"
            # Both jobs are now held, for as long as the test likes; the loop must not be.
            for _ in range(20):
                assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
            assert stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, num_items=3), timeout=10).items
            assert polled_on[0] != loop_thread.ident
            assert int((marker / "started").read_text()) != os.getpid()  # the catalog is built in another process
            release.set()
            (marker / "release").touch()
            assert wait_for(lambda: any(new for _, new in installed_on), 120), "the new catalog was never installed"
            assert {thread for thread, _ in installed_on} == {loop_thread.ident}  # swapped in on the loop, one assignment
            assert stub.Recommend(pb.RecommendRequest(user_id=SHOPPER, num_items=3), timeout=10).items
    finally:
        release.set()
        (marker / "release").touch()
        if running:
            loop, stop = running[0]
            loop.call_soon_threadsafe(stop.set)
        loop_thread.join(60)
        root.handlers[:] = handlers
        root.setLevel(level)
        sys.setswitchinterval(switch)
    assert not loop_thread.is_alive()
