"""The in-process item catalog: read from the online store at start-up and refreshed in the background."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone

from feast import FeatureStore

from propensity.catalog import Catalog
from server.online_features import item_ids_in_offline_store, load_catalog

log = logging.getLogger(__name__)


class StaticCatalog:
    """A catalog that never refreshes (tests, benchmarks, one-off scoring)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.loaded_at = time.time()

    @property
    def age_seconds(self) -> float:
        return time.time() - self.loaded_at


class ItemCache:
    """Holds the current Catalog; a refresh builds a new one and swaps the reference (readers never lock).

    Refreshes run in a worker thread with their own FeatureStore (own online-store connection),
    so they never share a SQLite connection with the request path.
    """

    def __init__(self, open_store: Callable[[], FeatureStore], service_name: str) -> None:
        self._open_store = open_store
        self._service = service_name
        self.catalog: Catalog = self._build()
        self.loaded_at = time.time()

    def _build(self) -> Catalog:
        store = self._open_store()
        return load_catalog(store, self._service, item_ids_in_offline_store(store))

    @property
    def age_seconds(self) -> float:
        return time.time() - self.loaded_at

    def refresh(self) -> None:
        """Re-read every item; on failure keep serving the previous catalog."""
        try:
            catalog = self._build()
        except Exception:
            log.exception("item catalog refresh failed; keeping the catalog from %.0fs ago", self.age_seconds)
            return
        self.catalog, self.loaded_at = catalog, time.time()



def feature_freshness(store: FeatureStore, pushed: dict[str, float] | None = None) -> dict[str, tuple[float, float]]:
    """Per feature view: (seconds since its newest values, TTL seconds).

    Newest values are the end of the latest materialization, or a later real-time push (epoch
    seconds in `pushed`); inf when the view was never loaded.
    """
    now = datetime.now(timezone.utc)
    pushed = pushed or {}
    result: dict[str, tuple[float, float]] = {}
    store.refresh_registry()  # materializations by `feast materialize` in another process show up here
    for view in store.list_feature_views():
        newest = pushed.get(view.name, float("-inf"))
        for interval in view.materialization_intervals:
            end = interval[1] if interval[1].tzinfo else interval[1].replace(tzinfo=timezone.utc)
            newest = max(newest, end.timestamp())
        age = max(0.0, now.timestamp() - newest) if newest > float("-inf") else float("inf")
        result[view.name] = (age, view.ttl.total_seconds() if view.ttl else float("inf"))
    return result


class FreshnessTracker:
    """The latest freshness reading per feature view, refreshed in the background (reads are free)."""

    def __init__(self, store: FeatureStore, pushed: Callable[[], dict[str, float]] | None = None) -> None:
        self._store = store
        self._pushed = pushed or (lambda: {})
        self.views: dict[str, tuple[float, float]] = {}

    def refresh(self) -> dict[str, tuple[float, float]]:
        self.views = feature_freshness(self._store, self._pushed())
        return self.views
