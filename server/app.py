"""Wire the server in one place: stores, catalog, models, servicers, health, reflection; serve until stopped."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from propensity.feature_store import FeatureContractError, check_service, open_store
from propensity.model_registry import ModelBundle
from propensity.settings import Settings
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from server.model_pool import ModelPool
from server.online_features import OnlineUserFeatures, item_ids_in_offline_store, load_catalog
from server.recommender import Recommender
from server.servicer import RecommendationServicer

log = logging.getLogger("propensity.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RecommendationService"].full_name


@dataclass(frozen=True)
class Started:
    """What a caller needs after start-up: the bound port and the loaded versions."""

    port: int
    model_version: str
    n_items: int
    seconds: float


def build_recommender(settings: Settings) -> Recommender:
    """Everything the data plane needs, checked at start-up rather than on the first request."""
    store = open_store(settings.feature_repo)

    def check_contract(bundle: ModelBundle) -> None:
        for side, configured in (("user", settings.user_feature_service), ("item", settings.item_feature_service)):
            service = bundle.metadata["feature_services"][side]
            if service["name"] != configured:
                raise FeatureContractError(
                    f"model {bundle.version} was trained with {side} feature service {service['name']!r}, "
                    f"but the server reads {configured!r}"
                )
            check_service(store, service["name"], service["fingerprint"], bundle.version)

    models = ModelPool(settings.model_dir, check_contract)
    catalog = load_catalog(store, settings.item_feature_service, item_ids_in_offline_store(store))
    manifest = settings.prepared_dir / "manifest.json"
    as_of = json.loads(manifest.read_text())["as_of"] if manifest.exists() else ""
    return Recommender(models, OnlineUserFeatures(store, settings.user_feature_service), catalog, settings.candidates, as_of)


async def serve(settings: Settings, on_started: Callable[[Started], None] | None = None, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or `stop` is set); health turns NOT_SERVING before the grace period."""
    t0 = time.perf_counter()
    recommender = build_recommender(settings)
    # Start-up allocations are long-lived; freezing them keeps full GC passes (p99 spikes) short.
    gc.collect()
    gc.freeze()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_RecommendationServiceServicer_to_server(RecommendationServicer(recommender, settings.server), server)
    health = health_async.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{settings.server.host}:{settings.server.port}")
    if port == 0:
        raise OSError(f"cannot bind {settings.server.host}:{settings.server.port} (in use?)")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    info = recommender.model_info()
    started = Started(port, info.current_version, recommender.catalog_size, time.perf_counter() - t0)
    log.info("serving %s on %s:%d (model %s, %d items) after %.1fs", SERVICE_NAME, settings.server.host, port, started.model_version, started.n_items, started.seconds)
    if on_started:
        on_started(started)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    await stop.wait()
    log.info("shutting down: health NOT_SERVING, %.1fs grace for in-flight calls", settings.server.grace_seconds)
    await health.enter_graceful_shutdown()
    await server.stop(settings.server.grace_seconds)
