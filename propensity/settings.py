"""The one typed settings object: defaults, then a TOML file, then PROPENSITY_* environment variables."""

from __future__ import annotations

import argparse
import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class _Section(BaseModel):
    """A settings section: unknown keys are typos, and typos must not fall back to defaults silently."""

    model_config = ConfigDict(extra="forbid")


class DemoSettings(_Section):
    """Size of the generated demo shop."""

    n_users: int = Field(2000, description="Shoppers in the demo log.")
    n_items: int = Field(400, description="Items in the demo catalog.")
    n_categories: int = Field(16, description="Item categories.")
    n_days: int = Field(60, description="Days of history before the as-of time.")
    seed: int = Field(7, description="Random seed; the same seed gives the same log.")


class FeatureSettings(_Section):
    """How raw events become feature tables."""

    recent_items_per_user: int = Field(30, description="How many of a user's most recent items are kept as per-(user, item) state.")
    bought_items_per_user: int = Field(200, description="How many of a user's most bought items (whole history) are kept: buy-again signals.")
    top_categories_per_user: int = Field(5, description="How many of a user's favourite categories are kept.")
    neighbors_per_item: int = Field(20, description="Neighbours kept per item in each neighbour table (co-visited, co-purchased, content).")
    retrieval_snapshots: int = Field(
        16, description="Weekly snapshots (ending at as-of) of the ALS factors and co-purchase neighbours; older cut-offs see none."
    )
    retrieval_half_life_days: float = Field(60.0, description="Half-life of an interaction's weight in the ALS and co-purchase matrices.")
    als_factors: int = Field(64, description="ALS item-factor dimension.")
    als_regularization: float = Field(0.05, description="ALS L2 regularisation (also used when a user's vector is folded in at request time).")
    als_alpha: float = Field(5.0, description="ALS confidence scale: confidence = alpha x interaction weight (implicit's convention).")
    als_iterations: int = Field(15, description="ALS sweeps per snapshot.")
    events_per_user_bucket: int = Field(
        2_500_000, description="User feature tables are built for one bucket of users at a time, about this many events each."
    )
    memory_limit_gb: float = Field(6.0, description="DuckDB's memory cap in prepare and the feature build; beyond it, it spills to disk.")
    session_gap_minutes: int = Field(30, description="Inactivity gap that starts a new session when events carry no session_id.")
    engine: Literal["duckdb", "spark"] = Field(
        "duckdb", description="Engine of the feature build: 'duckdb' embedded (default), 'spark' the same SQL transpiled to Spark SQL (docs/scale.md)."
    )
    spark_master: str = Field("local[*]", description="Spark master of the 'spark' engine: local[*] on one machine, spark://host:7077 (or k8s://...) on a cluster.")
    spark_conf: dict[str, str] = Field(
        {}, description="Extra Spark properties for the 'spark' engine (e.g. spark.executor.memory, spark.sql.shuffle.partitions)."
    )


class CandidateSettings(_Section):
    """Candidate generation, shared by training and serving."""

    max_candidates: int = Field(200, description="Upper bound on candidates scored per request.")
    recent_items: int = Field(30, description="The user's most recent items always taken first (the rest of the budget goes by retrieval score).")


class TrainingSettings(_Section):
    """Label definition, cut-offs and LightGBM parameters."""

    horizon_days: int = Field(7, description="A label is 1 if the user buys within this many days after the cut-off.")
    n_cutoffs: int = Field(
        8, description="Rolling weekly cut-offs used to build training rows (as many as the log allows); the last is the test period, the one before it validation."
    )
    cutoff_step_days: int = Field(7, description="Days between consecutive cut-offs.")
    validation_cutoffs: int = Field(1, description="How many of the latest cut-offs form the validation period.")
    max_users_per_cutoff: int = Field(50_000, description="Sample cap of users per cut-off (keeps training bounded).")
    ranker_non_buyer_share: float = Field(0.3, description="Share of non-buying users whose candidates join the ranker's training rows.")
    ranker_max_users_per_cutoff: int = Field(
        5_000, description="Cap on users whose candidates become ranker rows, per cut-off (buyers first): about 200 rows each."
    )
    max_rows_per_tree: int = Field(
        3_000_000,
        description="Most training rows one tree is grown on by the local engine: past it the bagging fraction (0.9) shrinks so that "
        "each tree sees this many, and a fit's time stops growing with the shop (the 20M-event shop's 6M ranker rows). Smaller sets "
        "are unaffected; the Dask engine, for rows beyond one machine, grows every tree on its usual share.",
    )
    num_boost_round: int = Field(400, description="Upper bound on boosting rounds (early stopping picks the best).")
    early_stopping_rounds: int = Field(30, description="Stop when validation loss has not improved for this many rounds.")
    learning_rate: float = Field(0.05, description="LightGBM learning rate.")
    num_leaves: int = Field(31, description="LightGBM leaves per tree.")
    min_data_in_leaf: int = Field(20, description="LightGBM minimum rows per leaf.")
    seed: int = Field(13, description="LightGBM seed.")
    engine: Literal["local", "dask"] = Field(
        "local",
        description="Where LightGBM fits: 'local' (one process) or 'dask' (lightgbm.dask on a Dask cluster, from the training rows "
        "written as partitioned Parquet; for training rows beyond one machine). docs/dask_training.md.",
    )
    dask_scheduler: str = Field(
        "", description="Dask scheduler address for engine 'dask' (tcp://host:8786 in production); empty starts a LocalCluster of 2 workers."
    )
    dask_partition_rows: int = Field(
        500_000, description="Most training rows per Parquet partition for engine 'dask' (a partition holds whole users, never part of one)."
    )
    tuning_trials: int = Field(0, description="Optuna trials per model (time-series folds inside train + validation); 0 turns tuning off.")
    tuning_seconds: float = Field(60.0, description="Wall-time budget of the search per model (a running trial always finishes).")
    gate_ndcg_tolerance: float = Field(
        0.01,
        description="Promotion gate (`propensity train`): a new version is promoted only if its ranker NDCG@10 on the held-out "
        "period is at most this much (absolute) below the current version's on the same period; --force overrides.",
    )
    gate_log_loss_tolerance: float = Field(
        0.005,
        description="Promotion gate: a new version's propensity log loss on the held-out period may exceed the current "
        "version's by at most this much (absolute); otherwise it is registered without being promoted.",
    )
    sensitive_attributes: list[str] = Field(
        ["gender", "age"],
        description="User attributes kept out of model inputs by a minimised user feature service (propensity_user_v3 serves "
        "neither gender nor age; the model's inputs read from them are then missing in training and serving alike). Training "
        "records which of them a model reads; `propensity evaluate` reports fairness per each (and per region) for the "
        "configured service and, side by side, for a model trained on the service without them.",
    )


class ServerSettings(_Section):
    """The gRPC server and the limits it enforces on requests."""

    host: str = Field("localhost", description="Address the gRPC server binds.")
    port: int = Field(50051, description="gRPC port.")
    default_num_items: int = Field(10, description="Items returned when a request leaves num_items at 0.")
    max_num_items: int = Field(100, description="Largest num_items a request may ask for.")
    max_request_ids: int = Field(1000, description="Most ids in exclude_item_ids, candidate_item_ids or item_ids.")
    max_score_users: int = Field(10_000, description="Most user_ids in one ScoreUsers call.")
    grace_seconds: float = Field(5.0, description="Time in-flight calls get to finish on shutdown.")
    workers: int = Field(1, description="Server processes sharing the port through SO_REUSEPORT (use the core count in production).")
    pin_workers: bool = Field(
        True, description="Pin each worker (and its gRPC threads) to a CPU of its own when there is exactly one worker per "
        "usable CPU (with more or fewer workers nothing is pinned). Turn off where other work shares those CPUs; "
        "docs/benchmarks/tail.md has the measurements."
    )
    max_concurrent_requests: int = Field(
        64,
        description="Unary calls one worker handles at once; more are answered RESOURCE_EXHAUSTED at once (load shedding). "
        "Health checks and streams never count. 0 turns the limit off. docs/reliability/processes.md shows how to size it.",
    )
    max_pending_requests: int = Field(
        1000,
        description="Calls that arrived but that a worker's event loop has not taken up yet (gRPC core's queue; 1000 is gRPC's "
        "own default). Past it gRPC core cancels new arrivals at random, past twice it every one (the client sees CANCELLED). "
        "Under overload this is the bound that holds: a busy loop takes calls slower than they arrive. docs/reliability/processes.md.",
    )
    metrics_port: int = Field(0, description="Prometheus metrics HTTP port; 0 turns the endpoint off.")
    log_format: str = Field("text", description="'json' for structured logs with request ids, 'text' for people.")
    log_level: str = Field(
        "INFO", description="Root log level (DEBUG, INFO, WARNING, ...). At INFO and above user ids appear only pseudonymised (docs/privacy.md)."
    )
    otlp_endpoint: str = Field(
        "", description="OpenTelemetry collector for traces over OTLP/gRPC, e.g. 'http://otel-collector:4317'; empty: "
        "OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT if set, else tracing is off (no tracing code on the request path). docs/deploy.md#traces."
    )
    trace_sample_rate: float = Field(
        1.0, ge=0.0, le=1.0, description="Share of traces the server starts that are recorded; a caller's traceparent decision is kept."
    )
    item_cache_refresh_seconds: float = Field(60.0, description="How often the in-process item catalog is re-read from the online store.")
    model_poll_seconds: float = Field(5.0, description="How often the model registry is checked for a newly promoted version (hot reload).")
    traffic_split: dict[str, float] = Field(
        default_factory=dict,
        description="A/B split of unpinned traffic, version -> weight (stable per user id hash); empty: all to the current version.",
    )
    shadow_version: str = Field("", description="A version scored alongside the served one; its results are logged, never returned.")
    repurchase_window_days: float = Field(
        0.0,
        description="Opt-in rule: items the user bought within this many days are not recommended. 0 (default) turns it off: "
        "the ranker judges re-buys from its own features (ui_times_bought, ui_days_since_bought).",
    )
    max_items_per_category: int = Field(0, description="Diversity cap on returned items per category; 0 means no cap.")
    deadline_floor_ms: float = Field(5.0, description="If less client deadline than this remains before scoring, answer from the fallback.")
    explain_top_features: int = Field(5, description="Contributions returned per item when a request sets explain.")
    store_timeout_seconds: float = Field(
        0.25, description="Longest wait for one online-store call (Redis socket and connect timeouts, SQLite busy timeout); "
        "past it Recommend answers from the cached catalog (fallback STORE_UNAVAILABLE)."
    )
    store_retry_seconds: float = Field(
        1.0, description="After a failed online-store call, calls fail fast for this long, then one probes the store again "
        "(and failed IngestEvents pushes are retried from the event log at this period)."
    )
    ingest_cached_users: int = Field(
        20_000, ge=0, description="Users whose real-time feature rows the SQLite ingestion process keeps in memory between "
        "updates (~5 KiB each; 0 reads every update's rows from the file). Only Feast's SQLite online store uses it."
    )
    scoring_backend: str = Field("auto", description="'lightgbm', 'compiled' (lleaves) or 'auto' (compiled when available and identical).")
    served_log_dir: Path | None = Field(None, description="Where sampled served features and scores are written as Parquet; unset disables it.")
    served_log_sample_rate: float = Field(0.01, description="Share of Recommend calls whose features and scores are logged.")
    ingest_idle_timeout_seconds: float = Field(
        60.0,
        description="An IngestEvents stream that sends no message for this long is ended with DEADLINE_EXCEEDED; the events "
        "it sent before are kept (counts in the details and trailing metadata). 0 turns the timeout off.",
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024, description="Largest request message the server accepts (grpc.max_receive_message_length); a larger one gets RESOURCE_EXHAUSTED."
    )


class CallerSettings(_Section):
    """One known caller: a name for logs and metrics, its roles, and how it proves who it is (a hashed token, certificate names, or both)."""

    name: str = Field(description="The caller's name in logs and the `caller` metrics label.")
    roles: list[str] = Field(default_factory=list, description="Roles granted, e.g. read, ingest, admin (docs/security.md has the policy table).")
    token_sha256: str = Field("", description="sha256 (hex) of the caller's bearer token, never the token itself; `python -m server.auth new-token` makes a pair.")
    subjects: list[str] = Field(
        default_factory=list, description="Client-certificate SAN entries (DNS, URI, e-mail, IP) or subject CNs that identify this caller under mTLS."
    )


class SecuritySettings(_Section):
    """Transport security and caller identity: TLS / mutual TLS on the gRPC and metrics ports, callers, roles, reflection."""

    tls_cert_file: Path | None = Field(None, description="Server certificate chain (PEM). With tls_key_file it turns TLS on for the gRPC and metrics ports.")
    tls_key_file: Path | None = Field(None, description="Server private key (PEM). Certificate, key and CA files are re-read on SIGHUP or when they change.")
    client_ca_file: Path | None = Field(
        None, description="CA bundle (PEM) that signs client certificates; set, it turns on mutual TLS: connections without a valid client certificate are refused."
    )
    allow_insecure_bind: bool = Field(
        False, description="Allow plaintext on a non-loopback server.host (e.g. behind a proxy that terminates TLS); otherwise start-up refuses."
    )
    auth: str = Field("auto", description="'on', 'off' or 'auto': callers must authenticate unless server.host is loopback (auto).")
    callers: list[CallerSettings] = Field(default_factory=list, description="Known callers (tokens hashed). Env: PROPENSITY_SECURITY__CALLERS as JSON.")
    callers_file: Path | None = Field(None, description="A JSON or TOML file with more callers (a `callers` list), re-read on SIGHUP or when it changes.")
    reflection: bool = Field(True, description="Serve gRPC server reflection (grpcurl and ghz without .proto files). Under auth it needs an authenticated caller.")
    health_port: int = Field(0, description="A second, plaintext port serving only grpc.health.v1 (probes without client certificates); 0: none.")


class IngestSettings(_Section):
    """Where IngestEvents logs events durably (docs/deploy.md: the shared event log)."""

    event_log: Literal["sqlite", "postgres"] = Field(
        "sqlite",
        description="'sqlite': an embedded log per process under stream_dir (one machine); 'postgres': one log in PostgreSQL "
        "shared by every replica (idempotent by event_id across them; read by `propensity prepare`).",
    )
    postgres_dsn: SecretStr = Field(
        SecretStr(""),
        description="PostgreSQL URL of the shared event log, database included (postgresql://user:password@host:5432/db; a "
        "SQLAlchemy postgresql+psycopg:// URL works too). Empty: ${PROPENSITY_PG_URL}/${PROPENSITY_PG_DATABASE}, the "
        "feature store profiles' registry database (propensity.store_profiles defaults).",
    )
    postgres_table: str = Field("propensity_events", description="Table of the shared event log (created if missing).")
    postgres_timeout_seconds: float = Field(
        2.0, description="Longest wait to connect, for a lock or for one statement of the PostgreSQL event log; past it the message is refused (UNAVAILABLE)."
    )


class PrivacySettings(_Section):
    """Erasure (`propensity forget`, ForgetUsers) and pseudonymous logs: docs/privacy.md."""

    key: SecretStr = Field(
        SecretStr(""),
        description="HMAC-SHA256 key that pseudonymises user ids in logs and in the erasure tombstones (never stored in clear). "
        "Provision it from a secret store (PROPENSITY_PRIVACY__KEY); empty: a random key is made once in <work_dir>/privacy/key (0600). "
        "Changing it orphans existing tombstones.",
    )


class Settings(BaseSettings):
    """Every knob of the product, documented; nested fields use PROPENSITY_SECTION__FIELD."""

    model_config = SettingsConfigDict(
        env_prefix="PROPENSITY_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    data_dir: Path = Field(PROJECT_ROOT / "var" / "demo-data", description="Directory of raw event files (events, items, users).")
    work_dir: Path = Field(PROJECT_ROOT / "var", description="Where prepared data, models and run manifests are written.")
    feature_repo: Path = Field(PROJECT_ROOT / "feature_repo", description="The Feast repository (feature_store.yaml and definitions).")
    as_of: datetime | None = Field(None, description="As-of time of a run; default: the last event in the data.")
    rebase_to_now: bool = Field(
        True,
        description="Shift the event log by whole weeks so that its as-of time lands just before now (keeps historical logs servable).",
    )
    feature_store_yaml: Path | None = Field(
        None,
        description="A feature_store.yaml to use instead of the repository's own, e.g. feature_repo/profiles/redis.yaml (store profiles).",
    )
    stream_dir: Path | None = Field(None, description="Where ingested events are logged durably; default <work_dir>/stream.")
    model_registry_root: str = Field(
        "",
        description="Model registry root: a local path (default <work_dir>/models) or any fsspec URL (s3://bucket/models, "
        "gs://..., file:///shared/models) shared by every replica; a URL is mirrored in model_cache_dir (docs/deploy.md).",
    )
    model_cache_dir: Path | None = Field(
        None, description="Local mirror of a URL model registry (servers load models from local disk); default <work_dir>/model-cache."
    )
    user_feature_service: str = Field("propensity_user_v2", description="Feast feature service read per request (user features).")
    item_feature_service: str = Field("propensity_item_v2", description="Feast feature service cached in the server (item features).")
    demo: DemoSettings = DemoSettings()
    features: FeatureSettings = FeatureSettings()
    candidates: CandidateSettings = CandidateSettings()
    training: TrainingSettings = TrainingSettings()
    server: ServerSettings = ServerSettings()
    security: SecuritySettings = SecuritySettings()
    privacy: PrivacySettings = PrivacySettings()
    ingest: IngestSettings = IngestSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Read the path on every construction, so PROPENSITY_CONFIG set after import still counts.
        toml_file = Path(os.environ.get("PROPENSITY_CONFIG", "propensity.toml"))
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=toml_file))

    @property
    def prepared_dir(self) -> Path:
        """Raw events after validation and time rebasing (the input of the feature build)."""
        return self.work_dir / "prepared"

    @property
    def model_dir(self) -> Path:
        """Model registry root on local disk: model_registry_root itself, or for a URL its local mirror (created on first use)."""
        from propensity.registry_remote import local_root

        return local_root(self.model_registry_root, self.work_dir / "models", self.model_cache_dir or self.work_dir / "model-cache")

    @property
    def event_log_dir(self) -> Path:
        """Durable log of events ingested through IngestEvents (read by the next prepare)."""
        return self.stream_dir or self.work_dir / "stream"

    @property
    def offline_dir(self) -> Path:
        """Feature tables of the offline store (Parquet with event_timestamp)."""
        return self.feature_repo / "data" / "offline"

    def describe(self) -> str:
        """Settings as indented JSON for start-up logs, with secrets (passwords, tokens, credentials in URLs) masked."""
        return json.dumps(_mask(self.model_dump(mode="json")), indent=2)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings with a command line's --data, --work-dir, --feature-repo, --as-of and --port applied, where given."""
    overrides = {}
    for name in ("data_dir", "work_dir", "feature_repo"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = Path(value).resolve()
    if getattr(args, "as_of", None):
        overrides["as_of"] = datetime.fromisoformat(args.as_of)
    settings = Settings(**overrides)
    if getattr(args, "port", None) is not None:
        settings = settings.model_copy(update={"server": settings.server.model_copy(update={"port": args.port})})
    return settings


_SECRET_KEY = re.compile(r"password|secret|token|credential|api_key", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")


def _mask(value: object, key: str = "") -> object:
    if isinstance(value, dict):
        return {k: _mask(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, key) for v in value]
    if isinstance(value, str):
        if value and _SECRET_KEY.search(key):
            return "***"
        return _URL_PASSWORD.sub(r"\1***@", value)
    return value
