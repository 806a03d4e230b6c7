"""A model registry root that is an fsspec URL (s3://, gs://, az://, file://, memory://...), mirrored in a local directory.

The registry code (model_registry, registry_history) works on a local directory, and the server loads
models from local disk. For a URL root, that directory is a cache (<model_cache_dir>/<hash of the URL>)
holding a `.remote` file with the URL; the registry functions pull from and push to the URL through the
primitives below, so a plain path keeps its code path, and its speed, unchanged.

How promotion stays atomic on an object store, where there is no rename:
- a version is immutable and written files first, `metadata.json` last, each as one object: a version whose
  metadata.json exists is complete (readers never download a version without it);
- `CURRENT` is one small object replaced with a single PUT, after the version is complete: a reader's GET
  returns the old or the new pointer, never a mix (S3, GCS and Azure Blob replace an object atomically and
  read-after-write consistently). routing.json and history.jsonl are single objects written the same way.
- on `file://` (fsspec's LocalFileSystem writes in place) each object is written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

MARKER = ".remote"
_remotes: dict[Path, str | None] = {}  # local root -> its URL (None: a plain local root); read once per process


class RemoteRegistryError(OSError):
    """The registry's URL cannot be read or written (network, credentials, missing fsspec implementation)."""


def is_url(location: str) -> bool:
    return "://" in location


def local_root(location: str, default: Path, cache_dir: Path) -> Path:
    """The local directory of a registry location: the path itself, or for a URL its cache (created, with the marker)."""
    if not location:
        return default
    if not is_url(location):
        return Path(location).expanduser()
    url = location.rstrip("/")
    root = cache_dir / hashlib.sha256(url.encode()).hexdigest()[:16]
    marker = root / MARKER
    if not marker.exists() or marker.read_text().strip() != url:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{MARKER}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(url + "\n")
        os.replace(tmp, marker)
    _remotes[root] = url
    return root


def remote_url(root: Path) -> str | None:
    """The URL a local root mirrors, or None for a plain local registry (no syscall after the first call per root)."""
    try:
        return _remotes[root]
    except KeyError:
        pass
    try:
        url: str | None = (root / MARKER).read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        url = None
    _remotes[root] = url
    return url


class Remote:
    """The registry's objects at a URL, addressed by names relative to the root ("CURRENT", "versions/v1/metadata.json")."""

    def __init__(self, url: str) -> None:
        try:
            import fsspec

            self.fs: AbstractFileSystem
            self.fs, self.base = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as error:  # ValueError: unknown protocol; ImportError: s3fs/gcsfs/adlfs missing
            raise RemoteRegistryError(f"model registry {url}: {error}") from error
        self.url = url
        self._local = type(self.fs).__name__ == "LocalFileSystem"

    def _path(self, name: str) -> str:
        return f"{self.base.rstrip('/')}/{name}"

    def read(self, name: str) -> bytes | None:
        """An object's bytes, or None when it does not exist."""
        try:
            return self.fs.cat_file(self._path(name))
        except FileNotFoundError:
            return None
        except Exception as error:
            raise RemoteRegistryError(f"model registry {self.url}: cannot read {name}: {error}") from error

    def exists(self, name: str) -> bool:
        try:
            return bool(self.fs.exists(self._path(name)))
        except Exception as error:
            raise RemoteRegistryError(f"model registry {self.url}: cannot check {name}: {error}") from error

    def write(self, name: str, data: bytes) -> None:
        """Replace one object whole: a reader sees the old or the new content."""
        path = self._path(name)
        try:
            if self._local:  # LocalFileSystem writes in place: write aside, then rename (atomic on one file system)
                parent = path.rsplit("/", 1)[0]
                self.fs.makedirs(parent, exist_ok=True)
                tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, path)
            else:
                self.fs.pipe_file(path, data)  # one PUT
        except Exception as error:
            raise RemoteRegistryError(f"model registry {self.url}: cannot write {name}: {error}") from error

    def children(self, name: str, kind: str) -> list[str]:
        """Names directly under a prefix of one kind, "file" or "directory" ("versions" -> ["v1", "v2"]); [] when there is none."""
        path = self._path(name)
        try:
            self.fs.invalidate_cache(path)  # listings are cached by some implementations (s3fs): a poll must see new versions
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        except Exception as error:
            raise RemoteRegistryError(f"model registry {self.url}: cannot list {name}: {error}") from error
        return sorted({str(entry["name"]).rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry.get("type") == kind})

    def download(self, name: str, local: Path) -> None:
        try:
            self.fs.get_file(self._path(name), str(local))
        except Exception as error:
            raise RemoteRegistryError(f"model registry {self.url}: cannot download {name}: {error}") from error

    def upload(self, local: Path, name: str) -> None:
        """Upload one local file as one object (atomically, as write does)."""
        self.write(name, local.read_bytes())


def remote_for(root: Path) -> Remote | None:
    """The Remote of a mirrored root, or None for a plain local registry."""
    url = remote_url(root)
    return None if url is None else Remote(url)


def write_local(path: Path, data: bytes) -> None:
    """Replace a file of the local mirror atomically (a unique temporary name: processes may share the cache)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def pull_file(root: Path, name: str) -> None:
    """Make the mirror's copy of one small object (CURRENT, routing.json, history.jsonl) the URL's; removed if the URL has none."""
    remote = remote_for(root)
    if remote is None:
        return
    data = remote.read(name)
    path = root / name
    if data is None:
        path.unlink(missing_ok=True)
    elif not path.exists() or path.read_bytes() != data:
        write_local(path, data)


def push_file(root: Path, name: str) -> None:
    """Publish the mirror's copy of one small object to the URL (one atomic write)."""
    remote = remote_for(root)
    if remote is not None:
        remote.upload(root / name, name)


def discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
