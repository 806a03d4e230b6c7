"""Reading features from Feast's online store: user rows per request, the item catalog at start-up."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pandas as pd
from feast import FeatureStore

from propensity.catalog import Catalog
from propensity.feature_store import offline_table

_CATALOG_CHUNK = 1000
_TS = "__ts"  # feast.online_response.TIMESTAMP_POSTFIX


class OnlineUserFeatures:
    """User feature rows through the feature service, which is resolved once, not per request.

    A value older than its feature view's TTL is returned as missing (None), never as if fresh:
    Feast's online read does not check TTLs itself.
    """

    def __init__(self, store: FeatureStore, service_name: str) -> None:
        self._store = store
        self.service_name = service_name
        self._service = store.get_feature_service(service_name)
        self._ttl: dict[str, float] = {}
        for projection in self._service.feature_view_projections:
            ttl = store.get_feature_view(projection.name).ttl
            for feature in projection.features:
                self._ttl[feature.name] = ttl.total_seconds() if ttl else float("inf")

    def fetch(self, user_ids: Sequence[str]) -> list[dict[str, object]]:
        """One mapping of feature name to value per user id (values None where missing or expired)."""
        if not user_ids:
            return []
        columns = self._store.get_online_features(
            features=self._service, entity_rows=[{"user_id": u} for u in user_ids]
        ).to_dict(include_event_timestamps=True)
        now = time.time()
        rows: list[dict[str, object]] = []
        for i in range(len(user_ids)):
            row: dict[str, object] = {}
            for name, ttl in self._ttl.items():
                stamp = columns[name + _TS][i]
                row[name] = columns[name][i] if not stamp or now - stamp <= ttl else None
            rows.append(row)
        return rows


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
