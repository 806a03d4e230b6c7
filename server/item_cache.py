"""The in-process item catalog and the feature-freshness reading: read at start-up, refreshed in the background."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from feast import FeatureStore

from propensity.catalog import Catalog
from propensity.feature_store import is_sqlite_online_store, offline_table, open_store, sqlite_online_path, sqlite_online_table
from server.online_features import item_ids_in_offline_store, load_catalog


class StaticCatalog:
    """A catalog that never refreshes (tests, benchmarks, one-off scoring)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.loaded_at = time.time()

    @property
    def age_seconds(self) -> float:
        return time.time() - self.loaded_at


@dataclass(frozen=True)
class CatalogSpec:
    """Where the catalog comes from, in a form another process can receive (paths and names only)."""

    feature_repo: Path
    feature_store_yaml: Path | None
    service: str


def build_catalog(spec: CatalogSpec, store: FeatureStore | None = None) -> Catalog:
    """Read every item of the offline table's item list from the online store into a Catalog (~1 s of Python here).

    store: an already opened store for `spec` (the build process opens its own on every refresh).
    """
    store = store or open_store(spec.feature_repo, spec.feature_store_yaml)
    return load_catalog(store, spec.service, item_ids_in_offline_store(store))


# The item table the catalog's item list comes from (server.online_features.item_ids_in_offline_store's default).
ITEM_LIST_VIEW = "item_stats"


def _file_stamps(path: Path) -> list[tuple[str, int, int]]:
    """(name, mtime in ns, size) of a file, or of every file under a directory (a partitioned table)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(f), (st := f.stat()).st_mtime_ns, st.st_size) for f in files]


def _registry_file(store: FeatureStore) -> Path | None:
    """The store's registry file (a relative path is the repository's), or None when it is not a local file."""
    registry = Path(str(getattr(store.config.registry, "path", "") or ""))
    registry = registry if registry.is_absolute() else Path(store.repo_path) / registry
    return registry if registry.is_file() else None


class CatalogSourceStamp:
    """A cheap fingerprint of everything the catalog is read from; equal fingerprints mean the same catalog.

    A refresh re-reads and converts every item (~1-2 s of CPU per worker, every `item_cache_refresh_seconds`),
    which took a core from the serving workers and was most of the open-loop tail (docs/benchmarks/tail.md),
    though the catalog rarely changes between refreshes. Feast writes `created_ts` = the time of writing on
    every materialization and push, so per item table (row count, newest created_ts, newest event_ts) changes
    with any write or removal; the offline item list and the registry file (feature services, `feast apply`)
    are stamped by modification time and size. Feast's online read does not apply TTLs, so time alone never
    changes the catalog. Only the SQLite online store with a file registry can be stamped this way: for other
    stores `__call__` returns None, which means "rebuild".
    """

    def __init__(self, spec: CatalogSpec, store: FeatureStore | None = None) -> None:
        store = store or open_store(spec.feature_repo, spec.feature_store_yaml)
        config = store.config
        registry = _registry_file(store)
        self._db: Path | None = None
        self._unchanged_since: tuple | None = None  # the files' stamps when _last was computed, if they were settled
        self._last: str | None = None
        self.aggregates = 0
        if is_sqlite_online_store(config) and registry is not None:
            service = store.get_feature_service(spec.service)
            views = [store.get_feature_view(projection.name) for projection in service.feature_view_projections]
            self._tables = [sqlite_online_table(config, view) for view in views]
            self._files = [registry, offline_table(store, store.get_feature_view(ITEM_LIST_VIEW))]
            self._db = sqlite_online_path(config)

    def __call__(self) -> str | None:
        """The current fingerprint, or None when the source cannot be stamped (unsupported store, unreadable file).

        The SQL aggregates scan every item row (6-13 ms of CPU for 1,500 items, more at 40,000), on the serving
        worker's core: when the database files (and a WAL file, if any) have not changed since the last stamp
        and are settled, the last fingerprint is returned without them.
        """
        if self._db is None:
            return None
        try:
            files = [_file_stamps(path) for path in self._files]
        except OSError:
            return None  # unreadable now: let the rebuild try, and report its own error
        db_files = tuple(_settled_file_stamp(Path(f"{self._db}{suffix}")) for suffix in ("", "-wal"))
        settled = db_files[0] is not None and (db_files[1] is not None or not Path(f"{self._db}-wal").exists())
        key = (db_files, files)
        if settled and key == self._unchanged_since and self._last is not None:
            return self._last
        self._last = self._fingerprint(files)
        self._unchanged_since = key if settled else None
        self.aggregates += 1
        return self._last

    def _fingerprint(self, files: list) -> str | None:
        try:
            with sqlite3.connect(f"file:{self._db}?mode=ro", uri=True, timeout=2.0) as conn:
                tables = [
                    conn.execute(f'SELECT count(*), max(created_ts), max(event_ts) FROM "{table}"').fetchone()
                    for table in self._tables
                ]
            conn.close()
        except sqlite3.Error:
            return None  # unreadable now: let the rebuild try, and report its own error
        return hashlib.blake2b(repr((tables, files)).encode(), digest_size=16).hexdigest()


# Items per pickled piece of a large field: each piece unpickles in ~1 ms, and between pieces the loop
# can take the GIL. Unpickled whole, a 40,000-item catalog's id index alone held the GIL for ~20 ms.
PIECE_ITEMS = 5_000
Pieces = list[tuple[str, str, bytes]]  # (field, kind: whole | dict | objects, pickled part)


def pack_catalog(catalog: Catalog) -> Pieces:
    """The catalog as pickled pieces: dicts and object arrays (built item by item on unpickling) in PIECE_ITEMS slices."""
    pieces: Pieces = []
    for field in dataclasses.fields(catalog):
        value = getattr(catalog, field.name)
        kind, parts = "whole", [value]
        if isinstance(value, dict) and len(value) > PIECE_ITEMS:
            pairs = list(value.items())
            kind, parts = "dict", [pairs[i : i + PIECE_ITEMS] for i in range(0, len(pairs), PIECE_ITEMS)]
        elif isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 1 and len(value) > PIECE_ITEMS:
            kind, parts = "objects", [value[i : i + PIECE_ITEMS] for i in range(0, len(value), PIECE_ITEMS)]
        pieces += [(field.name, kind, pickle.dumps(part, protocol=pickle.HIGHEST_PROTOCOL)) for part in parts]
    return pieces


def unpack_catalog(pieces: Pieces) -> Catalog:
    """Rebuild a catalog from `pack_catalog` pieces, one short unpickling step at a time (run it off the loop)."""
    values: dict[str, object] = {}
    dicts: dict[str, dict] = {}
    arrays: dict[str, list[np.ndarray]] = {}
    for name, kind, data in pieces:
        part = pickle.loads(data)
        if kind == "dict":
            dicts.setdefault(name, {}).update(part)
        elif kind == "objects":
            arrays.setdefault(name, []).append(part)
        else:
            values[name] = part
    values.update(dicts)
    values.update({name: np.concatenate(parts) for name, parts in arrays.items()})
    return Catalog(**values)  # type: ignore[arg-type]


def catalog_digest(pieces: Pieces) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for _, _, data in pieces:
        digest.update(data)
    return digest.hexdigest()


def build_catalog_pieces(spec: CatalogSpec, known_digest: str) -> tuple[str, Pieces | None]:
    """Run in the build process: (digest, the new catalog's pieces), or (digest, None) when it equals `known_digest`.

    The server then keeps its catalog when nothing changed (and what it caches per catalog stays warm),
    and otherwise unpickles it off the loop, piece by piece.
    """
    pieces = pack_catalog(build_catalog(spec))
    digest = catalog_digest(pieces)
    return digest, (None if digest == known_digest else pieces)


class ItemCache:
    """Holds the current Catalog; readers take `catalog` once per request and never lock.

    The first catalog is built in the constructor (start-up, before the port opens). Later ones are
    built elsewhere (server.background: in the build process, from `spec`) and put in place with
    `install`, one assignment on the event loop.
    """

    def __init__(self, spec: CatalogSpec) -> None:
        self.spec = spec
        store = open_store(spec.feature_repo, spec.feature_store_yaml)  # one registry read for the stamp and the first build
        self.source_stamp = CatalogSourceStamp(spec, store)
        self.built_from = self.source_stamp()  # stamped before reading: a write during the read means "re-read"
        self.catalog: Catalog = build_catalog(spec, store)
        self.digest = catalog_digest(pack_catalog(self.catalog))
        self.loaded_at = time.time()

    @property
    def age_seconds(self) -> float:
        """Seconds since the catalog was last re-read successfully (whether or not its content changed)."""
        return time.time() - self.loaded_at

    def install(self, catalog: Catalog | None, digest: str, built_from: str | None = None) -> None:
        """Put a freshly read catalog in place; None means the re-read found the same content.

        built_from: the source stamp taken before that read (None: unknown, so the next refresh reads again).
        """
        if catalog is not None:
            self.catalog, self.digest = catalog, digest
        self.built_from = built_from
        self.loaded_at = time.time()

    def confirm(self) -> None:
        """The source is unchanged since the catalog was read: it is as current as a re-read would make it."""
        self.loaded_at = time.time()


def materialized_until(store: FeatureStore) -> dict[str, tuple[float, float]]:
    """Per feature view: (epoch seconds its newest materialization ended, -inf if never; TTL seconds). Re-reads the registry."""
    result: dict[str, tuple[float, float]] = {}
    store.refresh_registry()  # materializations by `feast materialize` in another process show up here
    for view in store.list_feature_views():
        newest = float("-inf")
        for interval in view.materialization_intervals:
            end = interval[1] if interval[1].tzinfo else interval[1].replace(tzinfo=timezone.utc)
            newest = max(newest, end.timestamp())
        result[view.name] = (newest, view.ttl.total_seconds() if view.ttl else float("inf"))
    return result


def ages(materialized: dict[str, tuple[float, float]], pushed: dict[str, float] | None = None, now: float | None = None) -> dict[str, tuple[float, float]]:
    """Per feature view: (seconds since its newest values, TTL seconds); newest = materialized or a later push; inf if never loaded."""
    now = datetime.now(timezone.utc).timestamp() if now is None else now
    pushed = pushed or {}
    result: dict[str, tuple[float, float]] = {}
    for view, (materialized_end, ttl) in materialized.items():
        newest = max(materialized_end, pushed.get(view, float("-inf")))
        result[view] = (max(0.0, now - newest) if newest > float("-inf") else float("inf"), ttl)
    return result


def _settled_file_stamp(path: Path, settle_seconds: float = 1.0) -> tuple[int, int] | None:
    """(mtime ns, size) of a file last modified over `settle_seconds` ago; None if missing or more recent.

    File times have the kernel clock tick's granularity: a write within the same tick as an earlier stamp
    could keep both equal. A file that has not changed for a second cannot still be in that tick.
    """
    try:
        stat = path.stat()
    except OSError:
        return None
    if time.time() - stat.st_mtime < settle_seconds:
        return None
    return stat.st_mtime_ns, stat.st_size


class FreshnessTracker:
    """The latest freshness reading per feature view, refreshed in the background (reads are free).

    Give it a FeatureStore of its own: `read` refreshes that store's registry from a background
    thread, which must not hold the registry lock of the store the request path reads through.

    Materializations are recorded in the registry, so with a file registry that has not changed since the
    last reading, `read` reuses it and only recomputes the ages: re-reading the registry is 3-70 ms of
    Python in a serving worker's thread; with it and the catalog stamp every 10 s, 13-16 % of the lag samples
    taken while they ran were over 5 ms, against 1.6 % of the others (docs/benchmarks/event_loop.md,
    "Periodic work under load").
    """

    def __init__(self, store: FeatureStore, pushed: Callable[[], dict[str, float]] | None = None) -> None:
        self._store = store
        self._pushed = pushed or (lambda: {})
        self.views: dict[str, tuple[float, float]] = {}
        self._registry = _registry_file(store)
        self._materialized: dict[str, tuple[float, float]] | None = None
        self._materialized_from: tuple[int, int] | None = None
        self.registry_reads = 0

    def read(self) -> dict[str, tuple[float, float]]:
        """A new reading (blocking: re-reads the registry when it changed); does not change `views`."""
        stamp = _settled_file_stamp(self._registry) if self._registry is not None else None
        if self._materialized is None or stamp is None or stamp != self._materialized_from:
            self._materialized = materialized_until(self._store)
            self._materialized_from = stamp  # taken before the read: a write during it makes the next read re-read
            self.registry_reads += 1
        return ages(self._materialized, self._pushed())

    def refresh(self) -> dict[str, tuple[float, float]]:
        """Read and keep the reading (for callers without an event loop)."""
        self.views = self.read()
        return self.views
