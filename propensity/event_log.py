"""The durable log of ingested events: written before an event is acknowledged, read by the next batch build.

SQLite in WAL mode with synchronous=FULL: a committed event survives a crash, the event_id
primary key makes ingestion idempotent, and several server processes can append concurrently.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
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
    ingested_at_ms INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))
)
"""


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


class EventLog:
    """Append-only, de-duplicated by event_id."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "events.db"
        self._conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(_SCHEMA)

    def append(self, events: Sequence[StreamEvent]) -> tuple[list[StreamEvent], list[StreamEvent]]:
        """Store new events durably in one transaction; return (accepted, duplicates)."""
        accepted: list[StreamEvent] = []
        duplicates: list[StreamEvent] = []
        if not events:
            return accepted, duplicates
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            for event in events:
                cursor = self._conn.execute(
                    "INSERT OR IGNORE INTO events (event_id, event_time_ms, user_id, item_id, event_type, session_id, price, quantity) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (event.event_id, event.event_time_ms, event.user_id, event.item_id, event.event_type,
                     event.session_id, event.price, event.quantity),
                )
                (accepted if cursor.rowcount == 1 else duplicates).append(event)
            self._conn.execute("COMMIT")  # fsync'd (synchronous=FULL) before anyone is told "accepted"
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        return accepted, duplicates

    def count(self) -> int:
        return self._conn.execute("SELECT count(*) FROM events").fetchone()[0]

    def to_frame(self) -> pd.DataFrame:
        """All logged events in the raw schema (event_time as UTC timestamps), oldest first."""
        frame = pd.read_sql_query(
            "SELECT event_time_ms, user_id, item_id, event_type, event_id, session_id, price, quantity FROM events ORDER BY event_time_ms",
            self._conn,
        )
        frame.insert(0, "event_time", pd.to_datetime(frame.pop("event_time_ms"), unit="ms", utc=True).astype("datetime64[ns, UTC]"))
        return frame

    def close(self) -> None:
        self._conn.close()
