"""Who changed what the registry serves, and why: promotions, rollbacks, the A/B split and the shadow version.

Files under the models root, next to CURRENT (docs/models.md describes the file protocol):

- history.jsonl  append-only, one JSON object per change: time, action (promote | rollback | split | shadow),
  version, previous, by, reason, forced, gate. Each append rewrites the file through a temporary file and
  os.replace, so a reader sees the old or the new file, never a half-written line.
- routing.json   {"traffic_split": {version: weight}, "shadow_version": str, ...}: what every server replica
  uses instead of its own settings (server.traffic_split / server.shadow_version) once the file exists.

Changes take an exclusive lock (.lock, flock), so two operators promoting at once both end up in the history.

With a URL root (propensity/registry_remote.py) both files are single objects: read from the URL before use,
written whole (one PUT) after the local write. The flock then serialises the processes of one machine only:
two operators changing the registry from two machines at the same moment can lose one history line (the
pointer itself stays atomic); run registry changes from one place (the pipeline job, one operator).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from propensity import registry_remote
from propensity.model_registry import METADATA, ModelLoadError, check_version_id, current_version, ensure_local_version, promote

HISTORY = "history.jsonl"
ROUTING = "routing.json"
_LOCK = ".lock"


@dataclass(frozen=True)
class Routing:
    """The A/B split and shadow version recorded in the registry (None: not set there, settings apply)."""

    traffic_split: dict[str, float] | None = None
    shadow_version: str | None = None
    extra: dict = field(default_factory=dict)


def default_user() -> str:
    """Who is changing the registry: $USER, else the login name."""
    try:
        return os.environ.get("USER") or getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Serialise registry changes between processes."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / _LOCK).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    try:
        registry_remote.push_file(path.parent, path.name)  # a URL root: the URL's object too (no-op for a local root)
    except registry_remote.RemoteRegistryError as error:
        raise ModelLoadError(str(error)) from None


def _pull(root: Path, name: str, fatal: bool) -> None:
    """A URL root: refresh the mirror's copy of `name` from the URL (fatal=False keeps the mirror's copy when unreachable)."""
    try:
        registry_remote.pull_file(root, name)
    except registry_remote.RemoteRegistryError as error:
        if fatal:
            raise ModelLoadError(str(error)) from None


def read_history(root: Path) -> list[dict]:
    """Every recorded change, oldest first (a line that does not parse is skipped, never fatal)."""
    _pull(root, HISTORY, fatal=False)
    try:
        lines = (root / HISTORY).read_text().splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _append(root: Path, entry: dict) -> dict:
    """Append one entry (call under `locked`)."""
    _pull(root, HISTORY, fatal=True)  # never overwrite the URL's history with a stale copy
    path = root / HISTORY
    existing = path.read_text() if path.exists() else ""
    if existing and not existing.endswith("\n"):
        existing += "\n"
    entry = {"time": datetime.now(timezone.utc).isoformat(), **entry}
    _write_atomically(path, existing + json.dumps(entry, sort_keys=True) + "\n")
    return entry


def _current_or_none(root: Path) -> str | None:
    try:
        return current_version(root)
    except ModelLoadError:
        return None


def _check_exists(root: Path, version: str) -> None:
    check_version_id(version)
    ensure_local_version(root, version)
    if not (root / "versions" / version / METADATA).exists():
        raise ModelLoadError(f"{root}: no model version {version}")


def serving_stack(root: Path, history: list[dict] | None = None) -> list[str]:
    """Versions made current, oldest first, with rolled-back ones removed: the last is current, the one before it is where rollback goes."""
    stack: list[str] = []
    for entry in history if history is not None else read_history(root):
        if entry.get("action") == "promote":
            previous = entry.get("previous")
            if previous and (not stack or stack[-1] != previous):  # made current outside this module (older code, by hand)
                stack.append(previous)
            stack.append(entry["version"])
        elif entry.get("action") == "rollback" and stack:
            stack.pop()
            if not stack or stack[-1] != entry["version"]:
                stack.append(entry["version"])
    current = _current_or_none(root)
    if current and (not stack or stack[-1] != current):  # promoted outside this module (older code, by hand)
        stack.append(current)
    return stack


def promote_version(root: Path, version: str, by: str | None = None, reason: str = "", forced: bool = False, gate: dict | None = None) -> dict:
    """Make `version` current (atomically) and record who, why, what it replaced and the gate's verdict; returns the entry."""
    with locked(root):
        _check_exists(root, version)
        previous = _current_or_none(root)
        promote(root, version)
        return _append(root, {"action": "promote", "version": version, "previous": previous, "by": by or default_user(),
                              "reason": reason, "forced": forced, "gate": gate})


def rollback(root: Path, by: str | None = None, reason: str = "") -> dict:
    """Make the previously current version current again; ModelLoadError when there is none."""
    with locked(root):
        stack = serving_stack(root)
        if len(stack) < 2:
            raise ModelLoadError(f"{root}: no previously current version to roll back to (history: {stack or 'empty'})")
        target, previous = stack[-2], stack[-1]
        _check_exists(root, target)
        promote(root, target)
        return _append(root, {"action": "rollback", "version": target, "previous": previous, "by": by or default_user(), "reason": reason})


def read_routing(root: Path) -> Routing:
    """The split and shadow recorded in the registry; fields the file lacks (or no file) are None."""
    _pull(root, ROUTING, fatal=True)
    try:
        data = json.loads((root / ROUTING).read_text())
    except FileNotFoundError:
        return Routing()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{root / ROUTING}: unreadable: {error}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{root / ROUTING}: not a JSON object")
    split = data.get("traffic_split")
    shadow = data.get("shadow_version")
    if split is not None and (not isinstance(split, dict) or not all(isinstance(w, (int, float)) for w in split.values())):
        raise ModelLoadError(f"{root / ROUTING}: traffic_split must map version ids to weights")
    if shadow is not None and not isinstance(shadow, str):
        raise ModelLoadError(f"{root / ROUTING}: shadow_version must be a string")
    for version in [*(split or {}), *([shadow] if shadow else [])]:
        check_version_id(version, root / ROUTING)
    return Routing({k: float(v) for k, v in split.items()} if split is not None else None, shadow, data)


def _set_routing(root: Path, key: str, value: object, by: str | None, reason: str) -> dict:
    with locked(root):
        data = dict(read_routing(root).extra)
        data[key] = value
        who = by or default_user()
        data.update(updated_at=datetime.now(timezone.utc).isoformat(), updated_by=who)
        _write_atomically(root / ROUTING, json.dumps(data, indent=2, sort_keys=True) + "\n")
        action = "split" if key == "traffic_split" else "shadow"
        return _append(root, {"action": action, key: value, "by": who, "reason": reason})


def set_split(root: Path, weights: Mapping[str, float], by: str | None = None, reason: str = "") -> dict:
    """Record the A/B split of unpinned traffic (version -> weight); {} sends all traffic to current."""
    weights = {str(v): float(w) for v, w in weights.items()}
    for version in weights:
        _check_exists(root, version)
    if weights and (any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0):
        raise ValueError(f"split weights must be >= 0 and sum to > 0, got {weights}")
    return _set_routing(root, "traffic_split", weights, by, reason)


def set_shadow(root: Path, version: str, by: str | None = None, reason: str = "") -> dict:
    """Record the shadow version ('' turns shadow scoring off)."""
    if version:
        _check_exists(root, version)
    return _set_routing(root, "shadow_version", version, by, reason)
