"""The durable event log in PostgreSQL: one log shared by every server replica, same contract as the SQLite EventLog.

Guarantees (the same as propensity.event_log, across processes and machines):

- durable before the acknowledgement: one transaction per append (a whole IngestEvents message: group
  commit), committed with synchronous_commit = on, whatever the server's or database's default, so the
  commit has reached PostgreSQL's WAL on disk before `append` returns;
- idempotent by event_id across replicas: `INSERT ... ON CONFLICT (event_id) DO NOTHING RETURNING event_id`.
  When two replicas insert the same id at once, the second waits for the first's transaction and, once it
  commits, gets a conflict: exactly one of them reports it accepted, the other a duplicate;
- push states as in SQLite (pushed, claimed_ms): a replica claims its own events on append, and
  claim_unpushed takes unclaimed ones with FOR UPDATE SKIP LOCKED, so replicas retrying at once never take
  the same event. Push-state changes commit with synchronous_commit = off, as SQLite's are committed without
  their own fsync: a crash may lose a mark, which means one push done again after the lease.

A lost connection (PostgreSQL restarted, failed over, network cut) fails the call with EventLogError (the
message is refused, nothing acknowledged) and the next call connects again.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import pandas as pd

from propensity.event_log import EventLog, EventLogError, StreamEvent

if TYPE_CHECKING:
    import psycopg

    from propensity.settings import Settings

_COLUMNS = "event_id, event_time_ms, user_id, item_id, event_type, session_id, price, quantity"
_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# Serialises schema creation between replicas starting at once (CREATE TABLE IF NOT EXISTS races on the catalog).
_SCHEMA_LOCK = 0x70726F70  # "prop"
_RECONNECT_SECONDS = 1.0


class EventLogBackend(Protocol):
    """What the server and `propensity prepare` need from an event log (SQLite EventLog, PostgresEventLog)."""

    def append(self, events: Sequence[StreamEvent]) -> tuple[list[StreamEvent], list[StreamEvent]]: ...
    def mark_pushed(self, event_ids: Sequence[str]) -> None: ...
    def release(self, event_ids: Sequence[str]) -> None: ...
    def claim_unpushed(self, limit: int, lease_seconds: float) -> list[StreamEvent]: ...
    def has_claimable(self, lease_seconds: float) -> bool: ...
    def unpushed(self) -> int: ...
    def count(self) -> int: ...
    def to_frame(self) -> pd.DataFrame: ...
    def forget(self, user_ids: Sequence[str]) -> int: ...
    def close(self) -> None: ...


def _now_ms() -> int:
    return int(time.time() * 1000)


def libpq_dsn(url: str) -> str:
    """A libpq URL from a PostgreSQL URL, accepting SQLAlchemy's postgresql+psycopg:// form too."""
    return re.sub(r"^postgres(?:ql)?\+[a-z0-9_]+://", "postgresql://", url.strip())


def redacted(dsn: str) -> str:
    """host:port/database of a DSN, for messages (never the user's password)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(dsn)
    except Exception:  # a malformed DSN: say so without echoing it (it may hold a password)
        return "(malformed PostgreSQL DSN)"
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


class PostgresEventLog:
    """Append-only, de-duplicated by event_id across every process that opens the same table, with push states.

    timeout_seconds bounds connecting, lock waits and each statement; past it the call raises EventLogError.
    Nothing connects before the first call: a server starts while PostgreSQL is down, and IngestEvents answers
    UNAVAILABLE until it is back (calls fail fast for a second after a failed attempt, so the event loop never
    waits on connects back to back). The table and its index are created on the first connection.
    """

    def __init__(self, dsn: str, table: str = "propensity_events", timeout_seconds: float = 2.0) -> None:
        if not _TABLE_NAME.fullmatch(table):
            raise ValueError(f"ingest.postgres_table: {table!r} is not a plain lower-case SQL identifier")
        self._dsn = libpq_dsn(dsn)
        self.table = table
        self.location = f"postgresql://{redacted(self._dsn)} table {table}"
        self._timeout_ms = max(1, int(timeout_seconds * 1000))
        self._lock = threading.Lock()  # one connection; the ingestor may call from the loop and from executor threads
        self._conn: psycopg.Connection | None = None
        self._pid = os.getpid()
        self._schema_ready = False
        self._down_until = 0.0  # after a failed connection attempt, calls fail fast until then (no loop stalls)

    def append(self, events: Sequence[StreamEvent]) -> tuple[list[StreamEvent], list[StreamEvent]]:
        """Store new events durably in one transaction, claimed for pushing by the caller; return (accepted, duplicates).

        A repeated id within the message is a duplicate of its first occurrence; an id any process logged before
        (or commits while this insert waits on it) is a duplicate. One statement inserts the message (arrays + unnest).
        """
        first: dict[str, int] = {}  # event_id -> index of its first occurrence in the message
        for index, event in enumerate(events):
            first.setdefault(event.event_id, index)
        if not first:
            return [], []
        # Inserted in event_id order: two replicas inserting overlapping messages take the unique-index entries in
        # the same order, so one waits for the other instead of both deadlocking (and one failing).
        rows = sorted((events[index] for index in first.values()), key=lambda e: e.event_id)
        now = _now_ms()
        with self._transaction(durable=True) as conn:
            inserted = {
                row[0]
                for row in conn.execute(
                    self._sql(
                        f"INSERT INTO {{t}} ({_COLUMNS}, pushed, claimed_ms) "
                        "SELECT *, false, %s FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::text[], %s::text[], %s::text[], "
                        "%s::double precision[], %s::double precision[]) ORDER BY 1 "
                        "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
                    ),
                    (
                        now,
                        [e.event_id for e in rows], [int(e.event_time_ms) for e in rows], [e.user_id for e in rows],
                        [e.item_id for e in rows], [e.event_type for e in rows], [e.session_id for e in rows],
                        [None if e.price is None else float(e.price) for e in rows], [float(e.quantity) for e in rows],
                    ),
                ).fetchall()
            }
        accepted: list[StreamEvent] = []
        duplicates: list[StreamEvent] = []
        for index, event in enumerate(events):
            (accepted if first[event.event_id] == index and event.event_id in inserted else duplicates).append(event)
        return accepted, duplicates  # committed with synchronous_commit = on before anyone is told "accepted"

    def mark_pushed(self, event_ids: Sequence[str]) -> None:
        """Record that these events reached the online store."""
        self._set(event_ids, "pushed = true")

    def release(self, event_ids: Sequence[str]) -> None:
        """Give up the claim on these unpushed events, so that a retry may take them at once."""
        self._set(event_ids, "claimed_ms = 0")

    def claim_unpushed(self, limit: int, lease_seconds: float) -> list[StreamEvent]:
        """Claim up to `limit` unpushed events that nobody holds (oldest event time first); rows another replica is
        claiming right now are skipped, never waited for or taken twice."""
        now = _now_ms()
        with self._transaction() as conn:
            rows = conn.execute(
                self._sql(
                    f"UPDATE {{t}} SET claimed_ms = %s WHERE event_id IN ("
                    f"  SELECT event_id FROM {{t}} WHERE NOT pushed AND claimed_ms <= %s ORDER BY event_time_ms LIMIT %s "
                    f"  FOR UPDATE SKIP LOCKED"
                    f") RETURNING {_COLUMNS}"
                ),
                (now, now - int(lease_seconds * 1000), limit),
            ).fetchall()
        return sorted((StreamEvent(*row) for row in rows), key=lambda e: e.event_time_ms)

    def has_claimable(self, lease_seconds: float) -> bool:
        """Whether claim_unpushed would find anything (a read: idle retries lock nothing)."""
        cutoff = _now_ms() - int(lease_seconds * 1000)
        return bool(self._read(self._sql("SELECT 1 FROM {t} WHERE NOT pushed AND claimed_ms <= %s LIMIT 1"), (cutoff,)))

    def unpushed(self) -> int:
        """Events whose push has not succeeded yet (claimed or not)."""
        return int(self._read(self._sql("SELECT count(*) FROM {t} WHERE NOT pushed"))[0][0])

    def count(self) -> int:
        return int(self._read(self._sql("SELECT count(*) FROM {t}"))[0][0])

    def to_frame(self) -> pd.DataFrame:
        """All logged events in the raw schema (event_time as UTC timestamps), oldest first; the SQLite log's frame exactly."""
        names = ["event_time_ms", "user_id", "item_id", "event_type", "event_id", "session_id", "price", "quantity"]
        rows = self._read(self._sql(f"SELECT {', '.join(names)} FROM {{t}} ORDER BY event_time_ms, event_id"))
        frame = pd.DataFrame.from_records(rows, columns=names)
        frame["event_time_ms"] = frame["event_time_ms"].astype("int64")
        for column in ("price", "quantity"):
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
        frame.insert(0, "event_time", pd.to_datetime(frame.pop("event_time_ms"), unit="ms", utc=True).astype("datetime64[ns, UTC]"))
        return frame

    def forget(self, user_ids: Sequence[str]) -> int:
        """Delete every event of these users (erasure, docs/privacy.md); returns how many.

        Then VACUUM the table, so the dead rows' space is reclaimed for reuse; their bytes can survive in
        PostgreSQL's WAL, replicas and backups until those roll over (plan backup retention accordingly).
        """
        if not user_ids:
            return 0
        with self._transaction() as conn:
            deleted = conn.execute(self._sql("DELETE FROM {t} WHERE user_id = ANY(%s)"), (list(user_ids),)).rowcount
        with self._lock:
            try:
                conn = self._connect()
                conn.execute("SET statement_timeout = 0")  # a large table's VACUUM outlasts the per-statement bound
                try:
                    conn.execute(self._sql("VACUUM {t}"))  # autocommit: VACUUM cannot run in a transaction block
                finally:
                    conn.execute(f"SET statement_timeout = {self._timeout_ms}")
            except Exception as error:
                raise EventLogError(f"event log {self.location}: events deleted, but the table was not vacuumed: {error}") from error
        return deleted

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None

    def _sql(self, text: str) -> str:
        return text.replace("{t}", self.table)  # the table name was checked to be a plain identifier

    def _set(self, event_ids: Sequence[str], assignment: str) -> None:
        if not event_ids:
            return
        with self._transaction(durable=False) as conn:
            conn.execute(self._sql(f"UPDATE {{t}} SET {assignment} WHERE event_id = ANY(%s)"), (list(event_ids),))

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._transaction() as conn:
            return conn.execute(sql, params).fetchall()

    def _connect(self) -> psycopg.Connection:
        """The open connection, or a new one (with the table created on first use); fails fast right after a failed attempt."""
        import psycopg

        if self._conn is not None and self._pid != os.getpid():  # forked after opening: the parent's socket is not ours
            self._conn = None
        if self._conn is not None and not self._conn.closed:
            return self._conn
        if time.monotonic() < self._down_until:
            raise EventLogError(f"event log {self.location}: PostgreSQL was unreachable {_RECONNECT_SECONDS:.0f} s ago; not retried yet")
        try:
            conn = psycopg.connect(
                self._dsn,
                connect_timeout=max(2, round(self._timeout_ms / 1000)),  # libpq's minimum is 2 s
                # synchronous_commit on: a commit has reached the WAL on disk (the database's default may say otherwise)
                options=f"-c synchronous_commit=on -c statement_timeout={self._timeout_ms} -c lock_timeout={self._timeout_ms}",
                application_name="propensity-event-log",
                autocommit=True,  # every statement runs inside an explicit conn.transaction() block
            )
            if not self._schema_ready:
                with conn.transaction():
                    self._create_schema(conn)
        except psycopg.Error:
            self._down_until = time.monotonic() + _RECONNECT_SECONDS
            raise
        self._conn, self._pid, self._schema_ready = conn, os.getpid(), True
        return conn

    def _create_schema(self, conn: psycopg.Connection) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))  # replicas starting at once: one creates, the others wait
        conn.execute(self._sql(
            """CREATE TABLE IF NOT EXISTS {t} (
                event_id TEXT PRIMARY KEY,
                event_time_ms BIGINT NOT NULL,
                user_id TEXT NOT NULL,
                item_id TEXT NOT NULL,
                event_type TEXT NOT NULL,
                session_id TEXT,
                price DOUBLE PRECISION,
                quantity DOUBLE PRECISION NOT NULL,
                ingested_at_ms BIGINT NOT NULL DEFAULT (extract(epoch FROM clock_timestamp()) * 1000)::bigint,
                pushed BOOLEAN NOT NULL DEFAULT false,
                claimed_ms BIGINT NOT NULL DEFAULT 0
            )"""))
        conn.execute(self._sql("CREATE INDEX IF NOT EXISTS {t}_unpushed ON {t} (claimed_ms, event_time_ms) WHERE NOT pushed"))

    @contextlib.contextmanager
    def _transaction(self, durable: bool = True) -> Iterator[psycopg.Connection]:
        """One transaction on the log's connection; PostgreSQL errors become EventLogError naming the log.

        durable=False relaxes only this transaction's commit (SET LOCAL synchronous_commit = off): for push marks.
        """
        import psycopg

        with self._lock:
            try:
                conn = self._connect()
                with conn.transaction():
                    if not durable:
                        conn.execute("SET LOCAL synchronous_commit = off")
                    yield conn
            except psycopg.Error as error:
                if self._conn is not None and (self._conn.closed or self._conn.broken):
                    self._conn = None  # reconnect on the next call
                raise EventLogError(f"event log {self.location}: {str(error).strip() or type(error).__name__}") from error


def postgres_dsn(settings: Settings) -> str:
    """The shared event log's DSN: ingest.postgres_dsn, else the store profiles' ${PROPENSITY_PG_URL}/${PROPENSITY_PG_DATABASE}."""
    configured = settings.ingest.postgres_dsn.get_secret_value()
    if configured:
        return configured
    from propensity.store_profiles import apply_defaults

    apply_defaults()
    return f"{os.environ['PROPENSITY_PG_URL'].rstrip('/')}/{os.environ['PROPENSITY_PG_DATABASE']}"


def open_event_log(settings: Settings) -> EventLogBackend:
    """The event log the settings choose: the embedded SQLite log under event_log_dir, or the shared PostgreSQL one."""
    if settings.ingest.event_log == "postgres":
        return PostgresEventLog(postgres_dsn(settings), settings.ingest.postgres_table, settings.ingest.postgres_timeout_seconds)
    return EventLog(settings.event_log_dir)


def read_event_log(settings: Settings) -> pd.DataFrame | None:
    """Every ingested event for `propensity prepare` (None when nothing was ever logged: no SQLite file yet)."""
    if settings.ingest.event_log == "sqlite" and not (settings.event_log_dir / "events.db").exists():
        return None
    log = open_event_log(settings)
    try:
        return log.to_frame()
    finally:
        log.close()
