"""The server's side of erasure (ForgetUsers): this process's served-feature buffer first, then propensity.erasure."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from propensity.erasure import ErasureError, ErasureReport, forget_users, scrub_parquet
from propensity.settings import Settings
from server.errors import InvalidArgument, RecommendationError
from server.served_log import ServedFeatureLogger

log = logging.getLogger(__name__)


class ErasureUnavailable(RecommendationError):
    """This server cannot erase shoppers (it was started without the erasure wiring)."""


class Forgetter:
    """Erases shoppers for ForgetUsers, off the event loop (VACUUM and file rewrites take seconds on a big store)."""

    def __init__(self, settings: Settings, served_log: ServedFeatureLogger | None) -> None:
        self._settings = settings
        self._served_log = served_log
        self._lock = asyncio.Lock()  # one erasure at a time per process: two would rebuild the same files at once

    async def forget(self, user_ids: Sequence[str]) -> ErasureReport:
        async with self._lock:
            buffered = self._served_log.forget(user_ids) if self._served_log is not None else 0
            try:
                report = await asyncio.to_thread(forget_users, self._settings, user_ids)
            except ErasureError as error:
                raise InvalidArgument("user_ids", str(error)) from None
            if self._served_log is not None:
                # A request answered while the erasure ran (features not yet deleted) may have been sampled since:
                # drop it again, and scrub what a flush wrote meanwhile. From now on the user is unknown, and
                # unknown users' answers are never logged.
                buffered += self._served_log.forget(user_ids)
                await asyncio.to_thread(_scrub_dir, self._served_log.directory, list(user_ids))
        # Counts only: the ids are what must not reach the log.
        log.info("ForgetUsers: %s; %d buffered served-log rows dropped", report.summary(), buffered)
        return report


def _scrub_dir(directory: Path, user_ids: list[str]) -> None:
    for path in sorted(directory.glob("*.parquet")):
        scrub_parquet(path, user_ids)
