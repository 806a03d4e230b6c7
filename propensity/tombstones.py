"""The list of forgotten shoppers, kept as keyed hashes: what `prepare` leaves out of every later build.

One JSON line per forgetting, {"user": HMAC-SHA256 of the id (hex), "at": when (ISO-8601, UTC)}, appended
and fsync'd before anything is erased, so a crash half-way through an erasure still leaves the id
excluded from the next build. The id itself is never written: matching an id means hashing it with the
same key (propensity.pseudonyms).

The rule (docs/privacy.md): a tombstone covers the shopper's events dated up to its time; later events are
a new shopper's under the same id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

from propensity.pseudonyms import keyed_hash

TOMBSTONES_FILE = Path("privacy") / "tombstones.jsonl"


class Tombstones:
    """The tombstone file of one work directory, read and appended with one key."""

    def __init__(self, path: Path, key: bytes | Callable[[], bytes]) -> None:
        self.path = path
        self._key_source = key  # a callable is asked only when a hash is needed: reading no tombstones needs no key

    @property
    def key(self) -> bytes:
        """The key, asked of its source (and cached) on first use."""
        if callable(self._key_source):
            self._key_source = self._key_source()
        return self._key_source

    def add(self, user_ids: Iterable[str], at: datetime) -> int:
        """Record that these users were forgotten at `at`; returns how many lines were written (durably)."""
        stamp = at.astimezone(timezone.utc).isoformat()
        lines = [json.dumps({"user": keyed_hash(self.key, user), "at": stamp}) + "\n" for user in dict.fromkeys(user_ids)]
        if not lines:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as out:
            out.writelines(lines)
            out.flush()
            os.fsync(out.fileno())  # the exclusion must outlive a crash in the erasure that follows
        return len(lines)

    def hashes(self) -> dict[str, datetime]:
        """Keyed hash -> the latest time that user was forgotten."""
        found: dict[str, datetime] = {}
        if self.path.exists():
            _merge_lines(self.path.read_text(), lambda number: f"{self.path} line {number}", found)
        return found

    def forgotten(self, user_ids: Iterable[str]) -> dict[str, datetime]:
        """Which of these ids are tombstoned, with the time each was (last) forgotten."""
        hashes = self.hashes()
        if not hashes:
            return {}
        matched = {}
        for user in user_ids:
            at = hashes.get(keyed_hash(self.key, user))
            if at is not None:
                matched[user] = at
        return matched

    def __len__(self) -> int:
        return len(self.hashes())


class TombstoneFeed:
    """The tombstones appended since some point of the file, read incrementally (the file is append-only).

    What a writer holding data read earlier needs: which shoppers were forgotten since it read. `new_hashes()`
    reads only the bytes added since the last call (complete lines only: a line being appended is read next time),
    so asking costs one stat() when nothing changed. A file replaced or truncated (restored from a backup) is read
    again from its start: more hashes than new, never fewer.
    """

    def __init__(self, tombstones: Tombstones, *, from_start: bool = False) -> None:
        self.tombstones = tombstones
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file read so far
        self._offset = 0
        if not from_start:
            self._offset, self._identity = self._end()

    def _end(self) -> tuple[int, tuple[int, int] | None]:
        try:
            stat = self.tombstones.path.stat()
        except FileNotFoundError:
            return 0, None
        return stat.st_size, (stat.st_dev, stat.st_ino)

    def new_hashes(self) -> dict[str, datetime]:
        """Keyed hash -> time, for the tombstone lines appended since the last call (or since this feed began)."""
        size, identity = self._end()
        if identity is None:
            return {}
        if identity != self._identity or size < self._offset:
            self._offset, self._identity = 0, identity
        if size == self._offset:
            return {}
        with self.tombstones.path.open("rb") as source:
            source.seek(self._offset)
            data = source.read(size - self._offset)
        complete = data[: data.rfind(b"\n") + 1]
        found: dict[str, datetime] = {}
        _merge_lines(complete.decode(), lambda number: f"{self.tombstones.path} at byte {self._offset}, new line {number}", found)
        self._offset += len(complete)
        return found

    def matching(self, hashes: dict[str, datetime] | set[str], user_ids: Iterable[str]) -> list[str]:
        """The ids among user_ids whose keyed hash is in hashes (each distinct id once)."""
        if not hashes:
            return []
        key = self.tombstones.key
        return [user for user in dict.fromkeys(user_ids) if keyed_hash(key, user) in hashes]


FORGOTTEN_EVENT_REASON = "a forgotten shopper's event dated before their erasure (tombstone rule, docs/privacy.md)"


class ForgottenIndex:
    """Every tombstone of a work directory in memory, kept current cheaply: for a check per ingested event.

    `forgotten_at(user)` is None for a shopper never forgotten. The file is re-read only when it changed (its
    size or identity; appends are read incrementally), and no key is needed (nor made) while there are none.
    """

    def __init__(self, tombstones: Tombstones) -> None:
        self._feed = TombstoneFeed(tombstones, from_start=True)
        self._hashes: dict[str, datetime] = {}

    def refresh(self) -> int:
        """Read tombstones appended since the last refresh; returns how many shoppers are forgotten in all."""
        _keep_latest(self._hashes, self._feed.new_hashes().items())
        return len(self._hashes)

    def forgotten_at(self, user_id: str) -> datetime | None:
        """When this shopper was (last) forgotten, after a refresh; None when never."""
        if not self.refresh():
            return None
        return self._hashes.get(keyed_hash(self._feed.tombstones.key, user_id))

    def covers(self, user_id: str, event_time_ms: int) -> bool:
        """Whether an event of this shopper at this time is one the tombstone rule drops (dated up to the forgetting)."""
        at = self.forgotten_at(user_id)
        return at is not None and event_time_ms <= at.timestamp() * 1000

    def checker(self) -> Callable[[str, int], bool] | None:
        """One refresh for a whole message: None when nobody was ever forgotten (no per-event cost), else
        covers(user_id, event_time_ms) over the tombstones as of now, hashing each distinct user of the message once."""
        if not self.refresh():
            return None
        key, hashes = self._feed.tombstones.key, self._hashes
        limits: dict[str, float] = {}  # user -> the latest event time (ms) the rule drops; -inf when never forgotten

        def covers(user_id: str, event_time_ms: int) -> bool:
            limit = limits.get(user_id)
            if limit is None:
                at = hashes.get(keyed_hash(key, user_id))
                limit = limits[user_id] = at.timestamp() * 1000 if at is not None else float("-inf")
            return event_time_ms <= limit

        return covers


def _keep_latest(found: dict[str, datetime], entries: Iterable[tuple[str, datetime]]) -> None:
    """Merge (hash, time) pairs into found, keeping each user's latest forgetting."""
    for user, at in entries:
        if user not in found or at > found[user]:
            found[user] = at


def _merge_lines(text: str, where: Callable[[int], str], found: dict[str, datetime]) -> None:
    """Parse tombstone lines (blank ones skipped) into found; a bad line raises naming where(line number)."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            entries.append((str(entry["user"]), datetime.fromisoformat(entry["at"])))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{where(number)}: not a tombstone ({error})") from error
    _keep_latest(found, entries)
