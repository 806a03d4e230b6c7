"""Keyed hashes of user ids: what logs and erasure tombstones hold instead of the ids themselves.

HMAC-SHA256 with the key of `privacy.key` (settings): without the key, a hash cannot be turned back into an
id, nor can anyone check a guessed id against it (a plain hash of a short id would fall to a dictionary).
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from propensity.settings import Settings

KEY_FILE = Path("privacy") / "key"
LOG_HASH_CHARS = 16  # 64 bits: enough to follow one shopper through the logs, short enough to read

# The one process-wide key of log pseudonyms: log calls sit deep in code that never sees the settings,
# and logging itself is process-wide. set_log_key() is called once where logging is configured.
_log_key: bytes | None = None


def privacy_key(settings: Settings) -> bytes:
    """The key from settings, or else the work directory's own generated key (made once, owner-only)."""
    configured = settings.privacy.key.get_secret_value()
    if configured:
        return configured.encode()
    path = settings.work_dir / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole under a private name, then linked into place: link() fails if the key exists, so replicas
        # starting together agree on one key, and none can read a key file that is created but not yet written
        # (an O_EXCL create-then-write let a second replica read it empty: seen in a CI run of test_deploy).
        staged = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(staged, path)
        except FileExistsError:  # another process made it first: use theirs
            pass
        finally:
            staged.unlink()
    key = path.read_text().strip()
    if not key:
        raise ValueError(f"{path}: empty privacy key file; delete it to make a new one, or set PROPENSITY_PRIVACY__KEY")
    return key.encode()


def keyed_hash(key: bytes, user_id: str) -> str:
    """HMAC-SHA256 of the id, hex (64 characters)."""
    return hmac.digest(key, user_id.encode(), "sha256").hex()  # the one-shot form: same value, several times faster per call


def set_log_key(key: bytes) -> None:
    """Use this key for pseudonymise() in this process."""
    global _log_key
    _log_key = key


def pseudonymise(user_id: str) -> str:
    """What a log line may say about a user: 'u:' and 16 hex digits of the keyed hash.

    Without a key set (a library use that configured no logging), a random per-process key is made, so
    the line still carries no id.
    """
    global _log_key
    if _log_key is None:
        _log_key = secrets.token_bytes(32)
    return "u:" + keyed_hash(_log_key, user_id)[:LOG_HASH_CHARS]
