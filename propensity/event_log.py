"""The durable log of ingested events: written before an event is acknowledged, read by the next batch build.

SQLite in WAL mode with synchronous=FULL: a committed event survives a crash, the event_id
primary key makes ingestion idempotent, and several server processes can append concurrently.
One transaction per append: after a crash an append is either wholly in the log or not at all.

Each event also records whether its real-time feature update (the online-store push) is done, so
pushes that failed while the online store was down are retried from the log:

- `pushed` is 0 until the push succeeded, then 1 (events of logs written before this column existed
  count as pushed: they were pushed before they were acknowledged);
- `claimed_ms` is when a process took the push on. An append claims its own events; a claim older
  than the lease has been abandoned (the process died or gave up) and may be claimed again.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id TEXT PRIMARY KEY,
    event_time_ms INTEGER NOT NULL,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    session_id TEXT,
    price REAL,
    quantity REAL NOT NULL,
    ingested_at_ms INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)),
    pushed INTEGER NOT NULL DEFAULT 0,
    claimed_ms INTEGER NOT NULL DEFAULT 0
)
"""
_PENDING_INDEX = "CREATE INDEX IF NOT EXISTS events_unpushed ON events (claimed_ms) WHERE pushed = 0"
_COLUMNS = "event_id, event_time_ms, user_id, item_id, event_type, session_id, price, quantity"
DEFAULT_BUSY_SECONDS = 2.0
_IDS_PER_QUERY = 500  # bound parameters per statement (SQLite allows 32,766)


class EventLogError(RuntimeError):
    """The log cannot store or read events right now (locked, unwritable, out of space, corrupt)."""


@dataclass(frozen=True)
class StreamEvent:
    """One validated event in the raw schema (times in epoch milliseconds, UTC)."""

    event_id: str
    event_time_ms: int
    user_id: str
    item_id: str
    event_type: str
    session_id: str | None = None
    price: float | None = None
    quantity: float = 1.0


def _now_ms() -> int:
    return int(time.time() * 1000)


class EventLog:
    """Append-only, de-duplicated by event_id, with the push state of every event.

    busy_seconds bounds the wait for another process's write lock; past it the call raises EventLogError.
    """

    def __init__(self, directory: Path, busy_seconds: float = DEFAULT_BUSY_SECONDS) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "events.db"
        self._conn = sqlite3.connect(self.path, timeout=busy_seconds, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(_SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(events)")}
        if "pushed" not in columns:  # a log from before push states: its events were pushed before being acknowledged
            self._conn.execute("ALTER TABLE events ADD COLUMN pushed INTEGER NOT NULL DEFAULT 1")
            self._conn.execute("ALTER TABLE events ADD COLUMN claimed_ms INTEGER NOT NULL DEFAULT 0")
        self._conn.execute(_PENDING_INDEX)

    def append(self, events: Sequence[StreamEvent]) -> tuple[list[StreamEvent], list[StreamEvent]]:
        """Store new events durably in one transaction, claimed for pushing by the caller; return (accepted, duplicates).

        Inside the transaction (BEGIN IMMEDIATE: no other writer in between), one lookup finds the event_ids already
        logged, a repeated id within the message is a duplicate of its first occurrence, and the new events are
        inserted with one prepared statement (executemany).
        """
        accepted: list[StreamEvent] = []
        duplicates: list[StreamEvent] = []
        if not events:
            return accepted, duplicates
        now = _now_ms()
        with self._transaction():
            seen = self._logged([event.event_id for event in events])
            for event in events:
                if event.event_id in seen:
                    duplicates.append(event)
                else:
                    seen.add(event.event_id)
                    accepted.append(event)
            # pushed = 0 explicitly: in a log migrated from before push states the column's default is 1
            self._conn.executemany(
                f"INSERT INTO events ({_COLUMNS}, pushed, claimed_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                [(e.event_id, e.event_time_ms, e.user_id, e.item_id, e.event_type, e.session_id, e.price, e.quantity, now) for e in accepted],
            )
        return accepted, duplicates  # committed and fsync'd (synchronous=FULL) before anyone is told "accepted"

    def _logged(self, event_ids: Sequence[str]) -> set[str]:
        """Which of these event_ids are in the log already."""
        found: set[str] = set()
        for start in range(0, len(event_ids), _IDS_PER_QUERY):
            part = event_ids[start : start + _IDS_PER_QUERY]
            found.update(row[0] for row in self._conn.execute(
                f"SELECT event_id FROM events WHERE event_id IN ({','.join('?' * len(part))})", part))
        return found

    def mark_pushed(self, event_ids: Sequence[str]) -> None:
        """Record that these events reached the online store."""
        self._set(event_ids, "pushed = 1")

    def release(self, event_ids: Sequence[str]) -> None:
        """Give up the claim on these unpushed events, so that a retry may take them at once."""
        self._set(event_ids, "claimed_ms = 0")

    def claim_unpushed(self, limit: int, lease_seconds: float) -> list[StreamEvent]:
        """Claim up to `limit` unpushed events that nobody holds (oldest event time first), in one transaction."""
        now = _now_ms()
        with self._transaction():
            rows = self._conn.execute(
                f"UPDATE events SET claimed_ms = ? WHERE event_id IN ("
                f"  SELECT event_id FROM events WHERE pushed = 0 AND claimed_ms <= ? ORDER BY event_time_ms LIMIT ?"
                f") RETURNING {_COLUMNS}",
                (now, now - int(lease_seconds * 1000), limit),
            ).fetchall()
        return sorted((StreamEvent(*row) for row in rows), key=lambda e: e.event_time_ms)

    def has_claimable(self, lease_seconds: float) -> bool:
        """Whether claim_unpushed would find anything (a read, so idle retries take no write lock)."""
        cutoff = _now_ms() - int(lease_seconds * 1000)
        return bool(self._read(f"SELECT 1 FROM events WHERE pushed = 0 AND claimed_ms <= {cutoff} LIMIT 1"))

    def unpushed(self) -> int:
        """Events whose push has not succeeded yet (claimed or not)."""
        return self._read("SELECT count(*) FROM events WHERE pushed = 0")[0][0]

    def count(self) -> int:
        return self._read("SELECT count(*) FROM events")[0][0]

    def to_frame(self) -> pd.DataFrame:
        """All logged events in the raw schema (event_time as UTC timestamps), oldest first."""
        frame = pd.read_sql_query(
            "SELECT event_time_ms, user_id, item_id, event_type, event_id, session_id, price, quantity FROM events ORDER BY event_time_ms",
            self._conn,
        )
        frame.insert(0, "event_time", pd.to_datetime(frame.pop("event_time_ms"), unit="ms", utc=True).astype("datetime64[ns, UTC]"))
        return frame

    def forget(self, user_ids: Sequence[str]) -> int:
        """Delete every event of these users (erasure); returns how many. Then the file is rebuilt (VACUUM) and the WAL
        truncated, so that no freed page or old WAL frame still holds their bytes (docs/privacy.md)."""
        deleted = 0
        with self._transaction():
            for start in range(0, len(user_ids), _IDS_PER_QUERY):
                part = list(user_ids[start : start + _IDS_PER_QUERY])
                deleted += self._conn.execute(f"DELETE FROM events WHERE user_id IN ({','.join('?' * len(part))})", part).rowcount
        try:
            self._conn.execute("VACUUM")
            busy = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error as error:
            raise EventLogError(f"event log {self.path}: events deleted, but the file was not rebuilt: {error}") from error
        if busy:
            raise EventLogError(f"event log {self.path}: events deleted, but a reader kept the WAL from being truncated; retry")
        return deleted

    def close(self) -> None:
        self._conn.close()

    def _set(self, event_ids: Sequence[str], assignment: str) -> None:
        """A push-state change. Committed without its own fsync (synchronous=NORMAL in WAL: safe from a process crash,
        made durable by the next append's fsync): only a power loss in between can lose it, and a lost mark means
        a push done again after the lease, as when the process dies between a push and its mark (stores.md)."""
        if not event_ids:
            return
        try:
            self._conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as error:
            raise EventLogError(f"event log {self.path}: {error}") from error
        try:
            self._update(event_ids, assignment)
        finally:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA synchronous=FULL")  # appends stay fsync'd before they are acknowledged

    def _update(self, event_ids: Sequence[str], assignment: str) -> None:
        with self._transaction():
            for start in range(0, len(event_ids), _IDS_PER_QUERY):
                part = list(event_ids[start : start + _IDS_PER_QUERY])
                self._conn.execute(f"UPDATE events SET {assignment} WHERE event_id IN ({','.join('?' * len(part))})", part)

    def _read(self, sql: str) -> list[tuple]:
        try:
            return self._conn.execute(sql).fetchall()
        except sqlite3.Error as error:
            raise EventLogError(f"event log {self.path}: {error}") from error

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any failure; SQLite errors become EventLogError."""
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            raise EventLogError(f"event log {self.path}: {error}") from error
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException as error:
            with contextlib.suppress(sqlite3.Error):  # nothing open when SQLite already rolled back
                self._conn.execute("ROLLBACK")
            if isinstance(error, sqlite3.Error):
                raise EventLogError(f"event log {self.path}: {error}") from error
            raise
