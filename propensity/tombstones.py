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
    def _key(self) -> bytes:
        if callable(self._key_source):
            self._key_source = self._key_source()
        return self._key_source

    def add(self, user_ids: Iterable[str], at: datetime) -> int:
        """Record that these users were forgotten at `at`; returns how many lines were written (durably)."""
        stamp = at.astimezone(timezone.utc).isoformat()
        lines = [json.dumps({"user": keyed_hash(self._key, user), "at": stamp}) + "\n" for user in dict.fromkeys(user_ids)]
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
        if not self.path.exists():
            return found
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                at = datetime.fromisoformat(entry["at"])
                user = str(entry["user"])
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{self.path} line {number}: not a tombstone ({error})") from error
            if user not in found or at > found[user]:
                found[user] = at
        return found

    def forgotten(self, user_ids: Iterable[str]) -> dict[str, datetime]:
        """Which of these ids are tombstoned, with the time each was (last) forgotten."""
        hashes = self.hashes()
        if not hashes:
            return {}
        matched = {}
        for user in user_ids:
            at = hashes.get(keyed_hash(self._key, user))
            if at is not None:
                matched[user] = at
        return matched

    def __len__(self) -> int:
        return len(self.hashes())
