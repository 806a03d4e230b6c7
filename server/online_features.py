"""Reading features from Feast's online store: user rows per request, the item catalog at start-up.

The per-request user read goes to Feast's online store directly, with the feature service resolved
once into a read plan (feature views, feature names, TTLs, the store's own keys). Feast's
`get_online_features` re-plans every call (entity/feature resolution, response proto building,
conversion to Python) and costs ~1.3 ms for one user row here; the plan-once read costs ~0.1-0.2 ms
(docs/benchmarks/user_read.md). The data, its layout and its keys are Feast's: `feast apply` /
`feast materialize` / pushes write it, and `feast` CLI users see the usual feature views.

When the store fails (down, too slow, unreadable), reads raise StoreUnavailable at once, and keep doing so
without touching the store until the breaker lets a probe through (server.store_reads.StoreBreaker).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence

import pandas as pd
from feast import FeatureStore

from propensity.catalog import Catalog
from propensity.feature_store import offline_table
from server.store_reads import DEFAULT_RETRY_SECONDS, DEFAULT_TIMEOUT_SECONDS, Column, StoreBreaker, StoreObserver, ViewPlan, reader_for

_CATALOG_CHUNK = 1000


class OnlineUserFeatures:
    """User feature rows of one feature service, read straight from Feast's online store.

    A value older than its feature view's TTL is returned as missing (None), never as if fresh:
    Feast's online read does not check TTLs itself. Nothing is cached: every call reads the store,
    so a push (IngestEvents, any worker or process) is visible to the next call.
    """

    def __init__(
        self,
        store: FeatureStore,
        service_name: str,
        only: Collection[str] | None = None,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
        observer: StoreObserver | None = None,
    ) -> None:
        """only: read just these features of the service (bulk scoring needs the user model's, not the ranker's).

        timeout_seconds bounds one store call; after a failure, reads fail fast for retry_seconds.
        """
        self.service_name = service_name
        service = store.get_feature_service(service_name)
        plans = []
        for projection in service.feature_view_projections:
            view = store.get_feature_view(projection.name)
            ttl = view.ttl.total_seconds() if view.ttl else 0.0
            names = tuple(f.name for f in projection.features if only is None or f.name in only)
            if names:
                plans.append(ViewPlan(view, names, ttl if ttl > 0 else float("inf")))
        if only is not None and (unknown := set(only) - {name for plan in plans for name in plan.features}):
            raise ValueError(f"feature service {service_name!r} has no features {sorted(unknown)}")
        self._plans = tuple(plans)
        self.feature_names: tuple[str, ...] = tuple(name for plan in plans for name in plan.features)
        self._reader = reader_for(store, self._plans, timeout_seconds)
        self.backend = type(self._reader).__name__
        self.breaker = StoreBreaker("read", retry_seconds, observer)

    def fetch_columns(self, user_ids: Sequence[str]) -> dict[str, list[object]]:
        """Feature name -> one value per user id, in order (None where missing or past the view's TTL).

        Raises StoreUnavailable when the store fails, or failed recently and is not due for a probe.
        """
        columns: dict[str, list[object]] = {name: [None] * len(user_ids) for name in self.feature_names}
        if user_ids:
            breaker = self.breaker
            if not breaker.allows():
                raise breaker.unavailable()
            try:
                self._reader.read(list(user_ids), columns, time.time())
            except self._reader.errors as error:
                breaker.failed(error)
                raise breaker.unavailable(error) from error
            breaker.succeeded()
        return columns

    def fetch_arrays(self, user_ids: Sequence[str]) -> Mapping[str, Column]:
        """fetch_columns for many users at once (bulk scoring): the same values, as Arrow arrays where the store allows.

        Feature name -> one value per user id, in order: an Arrow array (null where missing or past the view's TTL)
        from the SQLite store, each decoded in bulk when first looked up; from other stores, fetch_columns' lists. Either is what
        propensity.user_state.UserBatch takes. Raises StoreUnavailable as fetch_columns does.
        """
        if not user_ids:
            return {name: [] for name in self.feature_names}
        breaker = self.breaker
        if not breaker.allows():
            raise breaker.unavailable()
        try:
            columns = self._reader.read_arrays(list(user_ids), time.time())
        except self._reader.errors as error:
            breaker.failed(error)
            raise breaker.unavailable(error) from error
        breaker.succeeded()
        return columns

    def fetch(self, user_ids: Sequence[str]) -> list[dict[str, object]]:
        """One mapping of feature name to value per user id (values None where missing or expired)."""
        columns = self.fetch_columns(user_ids)
        names = self.feature_names
        return [{name: columns[name][i] for name in names} for i in range(len(user_ids))]


def item_ids_in_offline_store(store: FeatureStore, feature_view: str = "item_stats") -> list[str]:
    """Every item the item feature table knows, from the source Feast's registry names."""
    path = offline_table(store, store.get_feature_view(feature_view))
    return pd.read_parquet(path, columns=["item_id"])["item_id"].astype(str).unique().tolist()


def load_catalog(store: FeatureStore, service_name: str, item_ids: Sequence[str]) -> Catalog:
    """The catalog from the online store, fetched in chunks (hundreds of rows per call, once)."""
    service = store.get_feature_service(service_name)
    frames = []
    for start in range(0, len(item_ids), _CATALOG_CHUNK):
        chunk = list(item_ids[start : start + _CATALOG_CHUNK])
        columns = store.get_online_features(features=service, entity_rows=[{"item_id": i} for i in chunk]).to_dict()
        frames.append(pd.DataFrame(columns))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"item_id": []})
    return Catalog.from_frame(frame)
