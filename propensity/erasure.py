"""Right to erasure: remove shoppers from everything the product manages (`propensity forget`, the ForgetUsers RPC).

In this order, so that a failure half-way never lets the shopper back in:

1. a tombstone (keyed hash + time) is appended: the next `prepare` leaves their events out of every build;
2. the durable event log: their events deleted, the file rebuilt;
3. the online store: their rows in every view keyed by user (SQLite rows, then the file rebuilt; Redis keys);
4. every Parquet file the product wrote under the work directory, the offline store and the served-feature log
   directory, and every batch-scoring output recorded in `<work_dir>/privacy/outputs.txt`: rewritten without
   the rows that name them.

Raw input files belong to the shop and are never edited. docs/privacy.md has the rules.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from propensity.event_log import EventLog
from propensity.pseudonyms import privacy_key
from propensity.realtime import id_problem
from propensity.settings import Settings
from propensity.tombstones import TOMBSTONES_FILE, TombstoneFeed, Tombstones

OUTPUTS_FILE = Path("privacy") / "outputs.txt"
LOCK_FILE = Path("privacy") / "erasure.lock"
USER_KEY = "user_id"
_REGEX_IDS = 200  # ids per substring pattern (one regex pass per column and chunk of ids)


class ErasureError(ValueError):
    """The request to forget cannot be carried out as given (no ids, an empty or oversized id)."""


@dataclass
class ErasureReport:
    """What one erasure removed, per place."""

    users: int = 0
    tombstones: int = 0
    event_log_events: int = 0
    online_rows: int = 0
    files_rewritten: int = 0
    file_rows: int = 0

    def summary(self) -> str:
        return (
            f"forgot {self.users} user(s): {self.event_log_events} logged events, {self.online_rows} online-store rows, "
            f"{self.file_rows} rows in {self.files_rewritten} file(s); tombstones written: {self.tombstones}"
        )


def checked_ids(user_ids: Iterable[str]) -> list[str]:
    """The ids to forget, de-duplicated in order; ErasureError names the first bad one."""
    ids = list(dict.fromkeys(user_ids))
    if not ids:
        raise ErasureError("user_ids: at least one user id is required")
    for position, user in enumerate(ids):
        problem = id_problem(user) if isinstance(user, str) else f"not a string: {type(user).__name__}"
        if problem:
            raise ErasureError(f"user_ids[{position}]: {problem}")  # the id itself is not echoed: it may be personal
    return ids


def tombstones(settings: Settings) -> Tombstones:
    """The work directory's tombstones, read with the settings' key."""
    return Tombstones(settings.work_dir / TOMBSTONES_FILE, lambda: privacy_key(settings))


def record_output(settings: Settings, path: Path) -> None:
    """Remember a file the product wrote outside its own directories (e.g. `score-batch --out`), so erasure finds it."""
    listing = settings.work_dir / OUTPUTS_FILE
    listing.parent.mkdir(parents=True, exist_ok=True)
    known = set(listing.read_text().splitlines()) if listing.exists() else set()
    if str(path.resolve()) not in known:
        with listing.open("a") as out:
            out.write(f"{path.resolve()}\n")


def forget_users(settings: Settings, user_ids: Iterable[str], *, at: datetime | None = None, store: object | None = None) -> ErasureReport:
    """Erase these shoppers everywhere the product keeps data (see the module docstring); returns the counts."""
    ids = checked_ids(user_ids)
    report = ErasureReport(users=len(ids))
    with _exclusive(settings.work_dir / LOCK_FILE):
        report.tombstones = tombstones(settings).add(ids, at or datetime.now(timezone.utc))
        report.event_log_events = forget_event_log(settings, ids)
        report.online_rows = forget_online(store if store is not None else _open_store(settings), ids)
        for path in product_files(settings):
            removed = scrub_parquet(path, ids)
            if removed:
                report.files_rewritten += 1
                report.file_rows += removed
    return report


@contextlib.contextmanager
def _exclusive(path: Path, *, shared: bool = False) -> Iterator[None]:
    """One erasure at a time per work directory, across processes (server workers, the CLI): two rewriting the same
    file at once would each write back a copy that still holds the other's users. shared: a writer fenced against
    erasures (WriteFence), which may run beside other writers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def forget_event_log(settings: Settings, user_ids: Sequence[str]) -> int:
    """Delete the users' events from the durable event log the settings choose (SQLite file or shared PostgreSQL table)."""
    if settings.ingest.event_log == "postgres":
        return _forget_postgres(settings, user_ids)
    if not (settings.event_log_dir / "events.db").exists():
        return 0  # nothing was ever ingested here
    event_log = EventLog(settings.event_log_dir)
    try:
        return event_log.forget(user_ids)
    finally:
        event_log.close()


def _forget_postgres(settings: Settings, user_ids: Sequence[str]) -> int:
    """DELETE in one transaction. PostgreSQL frees the rows' space at its next (auto)vacuum; its own files, WAL and
    backups are the database's to manage (docs/privacy.md)."""
    import psycopg

    from propensity.event_log_postgres import libpq_dsn, postgres_dsn

    table = settings.ingest.postgres_table
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", table):
        raise ErasureError(f"ingest.postgres_table: {table!r} is not a plain table name")
    timeout = max(1, round(settings.ingest.postgres_timeout_seconds))
    with psycopg.connect(libpq_dsn(postgres_dsn(settings)), connect_timeout=timeout) as conn:
        exists = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0]
        if exists is None:
            return 0  # the log was never written
        return conn.execute(f"DELETE FROM {table} WHERE user_id = ANY(%s)", (list(user_ids),)).rowcount


def _open_store(settings: Settings) -> object:
    from propensity.feature_store import open_store  # Feast: imported only when erasing

    return open_store(settings.feature_repo, settings.feature_store_yaml)


def forget_online(store: object, user_ids: Sequence[str]) -> int:
    """Delete the users' rows from every online feature view keyed by user; returns rows (SQLite) or keys (Redis) deleted.

    Feast 0.67 has no per-entity delete, so this deletes on its layout: SQLite tables of (entity_key, feature_name)
    rows, Redis one hash per entity key holding every view of that entity.
    """
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    from propensity.feature_store import is_sqlite_online_store  # Feast only when a store is touched, as above

    config = store.config
    views = [fv for fv in store.list_feature_views() if [c.name for c in fv.entity_columns] == [USER_KEY]]
    keys = [
        serialize_entity_key(EntityKeyProto(join_keys=[USER_KEY], entity_values=[ValueProto(string_val=user)]),
                             entity_key_serialization_version=config.entity_key_serialization_version)
        for user in user_ids
    ]
    if is_sqlite_online_store(config):
        return _forget_sqlite(config, views, keys)
    kind = str(config.online_store.type).lower()
    if kind == "redis" or kind.endswith("redisonlinestore"):
        client = store._get_provider().online_store._get_client(config.online_store)
        project = config.project.encode()
        return int(client.delete(*[key + project for key in keys])) if keys else 0
    raise ErasureError(f"online store type {config.online_store.type!r}: erasure knows the sqlite and redis layouts only")


def _forget_sqlite(config: object, views: list, keys: list[bytes]) -> int:
    from propensity.feature_store import sqlite_online_path, sqlite_online_table

    path = sqlite_online_path(config)
    if not path.exists():
        return 0
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        deleted = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            for fv in views:
                table = sqlite_online_table(config, fv)
                if table not in tables:
                    continue
                for start in range(0, len(keys), 500):
                    part = keys[start : start + 500]
                    deleted += conn.execute(f'DELETE FROM "{table}" WHERE entity_key IN ({",".join("?" * len(part))})', part).rowcount
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        # Updates in place leave old copies of a row in free space: only a rebuilt file is free of them.
        conn.execute("VACUUM")
        if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted
    finally:
        conn.close()


def product_files(settings: Settings) -> list[Path]:
    """Every Parquet file the product wrote: under the work directory, the offline store, the served-feature log
    directory, and the recorded outputs. Raw input files are not among them."""
    roots = [settings.work_dir, settings.offline_dir]
    if settings.server.served_log_dir is not None:
        roots.append(settings.server.served_log_dir)
    raw = settings.data_dir.resolve()
    found: dict[Path, None] = {}
    for root in roots:
        if root.exists():
            for path in sorted(root.rglob("*.parquet")):
                found[path.resolve()] = None
    listing = settings.work_dir / OUTPUTS_FILE
    if listing.exists():
        for line in listing.read_text().splitlines():
            path = Path(line)
            if line and path.exists():
                found[path.resolve()] = None
    return [path for path in found if not path.is_relative_to(raw)]


def scrub_parquet(path: Path, user_ids: Sequence[str]) -> int:
    """Rewrite a Parquet file without the rows that name any of these users; returns rows removed (0: untouched).

    A row names a user when a string column equals the id, or holds it as a quoted JSON value (the quarantine's
    `raw` column). The new file replaces the old one atomically.
    """
    try:
        source = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError):
        return 0  # not a Parquet file after all (or a half-written temporary): nothing we wrote
    text_columns = [f.name for f in source.schema_arrow if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    if not text_columns:
        return 0
    wanted = pa.array(list(user_ids), pa.string())
    patterns = [
        "|".join(re.escape(json.dumps(user)) for user in user_ids[start : start + _REGEX_IDS])
        for start in range(0, len(user_ids), _REGEX_IDS)
    ]

    def named(batch: pa.RecordBatch) -> pa.Array:
        mask = pa.array([False] * batch.num_rows)
        for name in text_columns:
            column = batch.column(name)
            hit = pc.is_in(column, value_set=wanted)
            for pattern in patterns:
                hit = pc.or_(hit, pc.match_substring_regex(column, pattern))
            mask = pc.or_(mask, pc.fill_null(hit, False))
        return mask

    hits = sum(pc.sum(named(batch)).as_py() or 0 for batch in source.iter_batches(columns=text_columns))
    if not hits:
        return 0
    tmp = path.with_name(f".{path.name}.erasure.tmp")
    try:
        with pq.ParquetWriter(tmp, source.schema_arrow) as writer:
            for batch in source.iter_batches():
                writer.write_table(pa.Table.from_batches([batch.filter(pc.invert(named(batch)))], schema=source.schema_arrow))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return hits


@contextlib.contextmanager
def erasure_lock(settings: Settings, *, shared: bool = False) -> Iterator[None]:
    """The work directory's erasure lock. Erasures take it exclusively; a writer of user rows takes it shared while it
    checks the tombstones and writes (or settles what it wrote), so it sees either none or all of an erasure."""
    with _exclusive(settings.work_dir / LOCK_FILE, shared=shared):
        yield


class WriteFence:
    """Keeps a writer that read shoppers' data earlier from writing a shopper forgotten since (docs/privacy.md).

    `begin()` waits for any erasure in flight, then marks the tombstone file's end: data read after it is free of
    every earlier forgetting (the erasure finished; `prepare` honours tombstones from its start). Later, under the
    erasure lock, `forgotten_since(ids)` names the readers' shoppers tombstoned after the mark. Two ways to use it:

    - filter at write time: `with fence.holding(): drop fence.forgotten_since(ids), then write` (the served-feature
      log does this at every flush);
    - settle after writing: `fence.settle_files(paths)` / `fence.settle_online(store)` once the stage's outputs are
      in place (the pipeline stages: their writers are DuckDB COPY and Feast's materialize, which cannot filter).

    With no tombstone added since the mark (the usual case) both cost a stat() and a lock.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._feed: TombstoneFeed | None = None
        self._since: dict[str, datetime] = {}

    @classmethod
    def begin(cls, settings: Settings) -> WriteFence:
        fence = cls(settings)
        with erasure_lock(settings, shared=True):
            fence._feed = TombstoneFeed(tombstones(settings))
        return fence

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """The erasure lock, shared: no erasure runs (nor starts) while it is held."""
        with erasure_lock(self.settings, shared=True):
            yield

    def new_hashes(self) -> dict[str, datetime]:
        """Tombstones added since the last call (since begin() for the first); call while holding()."""
        assert self._feed is not None, "WriteFence.begin() first"
        fresh = self._feed.new_hashes()
        self._since.update(fresh)
        return fresh

    def matching(self, hashes: dict[str, datetime] | set[str], user_ids: Iterable[str]) -> list[str]:
        """The ids among user_ids whose keyed hash is among these tombstone hashes."""
        assert self._feed is not None, "WriteFence.begin() first"
        return self._feed.matching(hashes, user_ids)

    def forgotten_since(self, user_ids: Iterable[str]) -> list[str]:
        """The ids among user_ids forgotten since begin(); call while holding() so none is added before the write."""
        self.new_hashes()
        assert self._feed is not None
        return self._feed.matching(self._since, user_ids)

    def settle_files(self, paths: Iterable[Path]) -> int:
        """Remove from these Parquet files the rows of shoppers forgotten since begin(); returns rows removed.

        Run after the stage wrote them (and replaced the old files): an erasure that ran meanwhile may have scrubbed
        the old files only. Exclusive, as an erasure: the files are rewritten."""
        files = [Path(p) for p in paths if Path(p).exists()]
        with _exclusive(self.settings.work_dir / LOCK_FILE):
            self.new_hashes()
            if not self._since or not files:
                return 0
            assert self._feed is not None
            ids = self._feed.matching(self._since, _user_ids(files))
            return sum(scrub_parquet(path, ids) for path in files) if ids else 0

    def settle_online(self, store: object | None = None) -> int:
        """Delete from the online store the rows of shoppers forgotten since begin(); returns rows (or keys) deleted.

        Run after a materialization: it may have copied offline rows read before an erasure scrubbed them."""
        with _exclusive(self.settings.work_dir / LOCK_FILE):
            self.new_hashes()
            if not self._since:
                return 0
            store = store if store is not None else _open_store(self.settings)
            assert self._feed is not None
            ids = self._feed.matching(self._since, online_user_ids(store))
            return forget_online(store, ids) if ids else 0


def _user_ids(files: Sequence[Path]) -> Iterator[str]:
    """The distinct values of the `user_id` column of these Parquet files (files without one are skipped)."""
    for path in files:
        try:
            source = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError):
            continue
        if USER_KEY not in source.schema_arrow.names:
            continue
        for batch in source.iter_batches(columns=[USER_KEY]):
            yield from (value for value in pc.unique(batch.column(0)).to_pylist() if isinstance(value, str))


def online_user_ids(store: object) -> set[str]:
    """Every user id with a row in a user-keyed view of the online store (Feast's SQLite and Redis layouts)."""
    from feast.infra.key_encoding_utils import deserialize_entity_key

    from propensity.feature_store import is_sqlite_online_store, sqlite_online_path, sqlite_online_table

    config = store.config
    version = config.entity_key_serialization_version
    kind = str(config.online_store.type).lower()
    keys: set[bytes] = set()
    if is_sqlite_online_store(config):
        path = sqlite_online_path(config)
        if not path.exists():
            return set()
        views = [fv for fv in store.list_feature_views() if [c.name for c in fv.entity_columns] == [USER_KEY]]
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            for fv in views:
                table = sqlite_online_table(config, fv)
                if table in tables:
                    keys.update(row[0] for row in conn.execute(f'SELECT DISTINCT entity_key FROM "{table}"'))
        finally:
            conn.close()
    elif kind == "redis" or kind.endswith("redisonlinestore"):
        client = store._get_provider().online_store._get_client(config.online_store)
        project = config.project.encode()
        keys.update(key[: -len(project)] for key in client.scan_iter(match=b"*" + project, count=1000) if key.endswith(project))
    else:
        raise ErasureError(f"online store type {config.online_store.type!r}: erasure knows the sqlite and redis layouts only")
    found = set()
    for key in keys:
        try:
            entity = deserialize_entity_key(key, entity_key_serialization_version=version)
        except Exception:  # another layout's key (an item's, another project's): not a user row
            continue
        if list(entity.join_keys) == [USER_KEY]:
            found.add(entity.entity_values[0].string_val)
    return found
