"""Module-level functions for tests that run code in server.build_process's helper (it receives functions by name).

Kept light: the helper imports this module, so heavy imports go inside the functions that need them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.item_cache import CatalogSpec, Pieces


def pid() -> int:
    return os.getpid()


def fail(message: str) -> None:
    raise ValueError(message)


def die() -> None:
    os._exit(3)


def blocking_build(marker: str, spec: CatalogSpec, known_digest: str) -> tuple[str, Pieces | None]:
    """Write this process's pid to <marker>/started, wait for <marker>/release, then build a catalog that counts as new."""
    from server.item_cache import build_catalog_pieces

    directory = Path(marker)
    (directory / "started").write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not (directory / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    digest, pieces = build_catalog_pieces(spec, "")  # "" never matches: the pieces always come back
    return digest + "-new", pieces


def counted_build(directory: str, spec: CatalogSpec, known_digest: str) -> tuple[str, Pieces | None]:
    """The real catalog build, recorded as one new file in `directory` per call."""
    import tempfile

    from server.item_cache import build_catalog_pieces

    tempfile.NamedTemporaryFile(dir=directory, prefix="build-", delete=False).close()
    return build_catalog_pieces(spec, known_digest)


def scheduling_group() -> tuple[int, str | None]:
    """This process's session id and its autogroup line (None where the kernel has no autogroups)."""
    try:
        with open("/proc/self/autogroup") as autogroup:
            line = autogroup.read().strip()
    except OSError:
        line = None
    return os.getsid(0), line
