"""Wire one server process in one place: stores, catalog, models, servicers, health, reflection, background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from threadpoolctl import threadpool_limits
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from propensity.feature_store import FeatureContractError, check_service, open_store
from propensity.model_registry import ModelBundle
from propensity.settings import Settings
from propensity.v1 import recommendation_service_pb2 as pb
from propensity.v1 import recommendation_service_pb2_grpc as pb_grpc
from propensity.event_log_postgres import open_event_log
from propensity.raw_data import EVENT_TYPES
from server.errors import IngestionUnavailable
from server.admission import AdmissionInterceptor
from server.auth import build_interceptor
from server.tls import grpc_server_credentials, start_plaintext_health
from server.ingest import EventIngestor
from server.background import Background, settle_garbage
from server.item_cache import CatalogSpec, FreshnessTracker, ItemCache
from server.model_pool import ModelPool
from server.observability import Observability, install_observability
from server.online_features import OnlineUserFeatures
from server.queries import ViewFreshness
from server.recommender import Recommender
from server.servicer import RecommendationServicer
from server.registration import lenient_requests
from server.forgetting import Forgetter
from propensity.pseudonyms import privacy_key, set_log_key
from propensity.erasure import tombstones
from propensity.tombstones import ForgottenIndex
from server.tracing import Tracing, start_tracing

log = logging.getLogger("propensity.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RecommendationService"].full_name


@dataclass(frozen=True)
class Started:
    """What a caller needs after start-up: the bound port and what is loaded."""

    port: int
    model_version: str
    n_items: int
    seconds: float


@dataclass
class Components:
    """Everything one server process runs on, built and checked before the port opens."""

    recommender: Recommender
    models: ModelPool
    items: ItemCache
    store: object
    ingestor: EventIngestor | IngestionUnavailable
    freshness: FreshnessTracker


def build_components(settings: Settings, observability: Observability | None = None, tracing: Tracing | None = None) -> Components:
    store = open_store(settings.feature_repo, settings.feature_store_yaml)

    def check_contract(bundle: ModelBundle) -> None:
        for side, configured in (("user", settings.user_feature_service), ("item", settings.item_feature_service)):
            service = bundle.metadata["feature_services"][side]
            if service["name"] != configured:
                raise FeatureContractError(
                    f"model {bundle.version} was trained with {side} feature service {service['name']!r}, "
                    f"but the server reads {configured!r}"
                )
            check_service(store, service["name"], service["fingerprint"], bundle.version)

    metrics = observability.metrics if observability else None
    models = ModelPool(
        settings.model_dir,
        check_contract,
        traffic_split=settings.server.traffic_split,
        shadow_version=settings.server.shadow_version,
        on_change=(lambda pool: metrics.set_models(pool.roles())) if metrics else None,
        scoring_backend=settings.server.scoring_backend,
    )
    items = ItemCache(CatalogSpec(settings.feature_repo, settings.feature_store_yaml, settings.item_feature_service))
    manifest_path = settings.prepared_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    as_of = manifest.get("as_of", "")
    recorded = frozenset(manifest.get("event_types", EVENT_TYPES))
    try:
        ingestor: EventIngestor | IngestionUnavailable = EventIngestor(
            store, open_event_log(settings), settings.features.recent_items_per_user,
            settings.features.bought_items_per_user, recorded,
            settings.server.store_timeout_seconds, settings.server.store_retry_seconds, observer=metrics,
            forgotten=ForgottenIndex(tombstones(settings)),
            cached_users=settings.server.ingest_cached_users,
        )
    except IngestionUnavailable as error:  # serve recommendations anyway; IngestEvents explains why it is off
        log.warning("%s", error)
        ingestor = error
    # A store of its own: its registry is re-read from a background thread, never under the request path's lock.
    freshness = FreshnessTracker(open_store(settings.feature_repo, settings.feature_store_yaml), lambda: dict(getattr(ingestor, "last_push", {})))
    recommender = Recommender(
        models,
        OnlineUserFeatures(
            store, settings.user_feature_service, timeout_seconds=settings.server.store_timeout_seconds,
            retry_seconds=settings.server.store_retry_seconds, observer=metrics,
        ),
        items,
        settings.candidates,
        settings.server,
        as_of,
        observer=tracing.observer(metrics) if tracing and metrics else metrics,
        served_log=observability.served_log if observability else None,
        freshness=lambda: [ViewFreshness(view, age, ttl) for view, (age, ttl) in sorted(freshness.views.items())],
    )
    return Components(recommender, models, items, store, ingestor, freshness)


async def serve(
    settings: Settings,
    on_started: Callable[[Started], None] | None = None,
    stop: asyncio.Event | None = None,
    reuse_port: bool = False,
    observability: Observability | None = None,
    tracing: Tracing | None = None,
    build_lock: Path | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (or `stop` is set); health turns NOT_SERVING before the grace period.

    tracing: None starts it from the settings (server.tracing.start_tracing: off unless an OTLP endpoint is set).
    build_lock: a file the worker processes of one server share, so their catalog builds take turns (server.background).
    """
    t0 = time.perf_counter()
    set_log_key(privacy_key(settings))  # user ids in this process's logs become keyed hashes (pseudonymise)
    own_observability = observability is None
    if observability is None:
        observability = install_observability(settings)
        observability.start_http()
    own_tracing = tracing is None
    tracing = start_tracing(settings) if tracing is None else tracing
    components = build_components(settings, observability, tracing)
    metrics = observability.metrics
    metrics.set_models(components.models.roles())
    for view, (age, _) in components.freshness.refresh().items():
        metrics.set_feature_age(view, age)
    metrics.set_item_cache_age(components.items.age_seconds)
    # Start-up allocations are long-lived; freezing them keeps full GC passes (p99 spikes) short.
    # Background repeats this after each catalog or model swap.
    settle_garbage()
    # One request is small linear algebra (ALS fold-in, 200-row products): BLAS threads only contend with the
    # other worker processes for the same cores, and made retrieval 1.6x slower when measured.
    threadpool_limits(1)
    # Admission after observability: shed calls are counted and timed too (code RESOURCE_EXHAUSTED).
    # Auth after observability (refusals are counted and timed too) and before admission (they take no slot).
    auth = build_interceptor(settings, observe=metrics.observe_caller)
    # Tracing right after observability: its span sees the request id and covers auth, admission and the handler.
    traced = [tracing.interceptor()] if tracing else []
    interceptors = [*observability.interceptors, *traced, *([auth] if auth else []), AdmissionInterceptor(settings.server.max_concurrent_requests)]
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_receive_message_length", settings.server.max_message_bytes),
        # gRPC core's backlog protection (random early drop between the two): the queue in front of the event loop.
        ("grpc.server.max_pending_requests", settings.server.max_pending_requests),
        ("grpc.server.max_pending_requests_hard_limit", 2 * settings.server.max_pending_requests),
    ])
    forgetter = Forgetter(settings, observability.served_log)  # ForgetUsers (admin role): docs/privacy.md
    # Requests parsed leniently: bytes that are not the request message get INVALID_ARGUMENT, not grpc's UNKNOWN.
    lenient_requests(pb_grpc.add_RecommendationServiceServicer_to_server, pb.DESCRIPTOR.services_by_name["RecommendationService"])(RecommendationServicer(components.recommender, settings.server, components.ingestor, forgetter), server)
    health = health_async.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if settings.security.reflection:
        reflection.enable_server_reflection((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address, tls = f"{settings.server.host}:{settings.server.port}", observability.tls  # tls: None on loopback plaintext
    port = server.add_secure_port(address, grpc_server_credentials(tls)) if tls else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {settings.server.host}:{settings.server.port} (in use?)")
    await server.start()
    health_server = (
        await start_plaintext_health(settings.server.host, settings.security.health_port, health, reuse_port)
        if settings.security.health_port else None
    )
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)

    background = Background(
        components.items, components.models, components.freshness, metrics,
        settings.server.item_cache_refresh_seconds, settings.server.model_poll_seconds, build_lock=build_lock,
    )
    background.start()
    if isinstance(components.ingestor, EventIngestor):
        components.ingestor.start(settings.server.store_retry_seconds)  # pushes that failed, retried from the event log
    started = Started(port, components.models.current.version, components.items.catalog.size, time.perf_counter() - t0)
    log.info("serving %s on %s:%d (model %s, %d items) after %.1fs", SERVICE_NAME, settings.server.host, port, started.model_version, started.n_items, started.seconds)
    if on_started:
        on_started(started)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, stop.set)

    def reload_credentials() -> None:
        log.info("SIGHUP: certificates and callers are re-read at the next handshake / call")
        if tls:
            tls.reload()
        if auth:
            auth.table.reload()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, reload_credentials)
    await stop.wait()
    log.info("shutting down: health NOT_SERVING, %.1fs grace for in-flight calls", settings.server.grace_seconds)
    await health.enter_graceful_shutdown()
    await background.stop()
    if isinstance(components.ingestor, EventIngestor):
        await components.ingestor.stop()
    await server.stop(settings.server.grace_seconds)
    if health_server is not None:
        await health_server.stop(None)
    if own_observability:
        observability.close()
    if own_tracing and tracing:
        tracing.close()
    log.info("stopped")
