"""The server's side of erasure (ForgetUsers): propensity.erasure, and this process's served-feature log fenced by it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from propensity.erasure import ErasureError, ErasureReport, WriteFence, forget_users
from propensity.settings import Settings
from server.errors import InvalidArgument, RecommendationError
from server.served_log import ServedFeatureLogger

log = logging.getLogger(__name__)


class ErasureUnavailable(RecommendationError):
    """This server cannot erase shoppers (it was started without the erasure wiring)."""


class Forgetter:
    """Erases shoppers for ForgetUsers, off the event loop (VACUUM and file rewrites take seconds on a big store).

    It also fences this process's served-feature log against every erasure of the work directory, whichever worker
    or `propensity forget` runs it: each flush checks the tombstones under the erasure lock (WriteFence), so no
    worker writes a forgotten shopper's buffered rows after the erasure returned.
    """

    def __init__(self, settings: Settings, served_log: ServedFeatureLogger | None) -> None:
        self._settings = settings
        self._served_log = served_log
        self._lock = asyncio.Lock()  # one erasure at a time per process: two would rebuild the same files at once
        if served_log is not None:
            served_log.attach_fence(WriteFence.begin(settings))

    async def forget(self, user_ids: Sequence[str]) -> ErasureReport:
        async with self._lock:
            try:
                report = await asyncio.to_thread(forget_users, self._settings, user_ids)
            except ErasureError as error:
                raise InvalidArgument("user_ids", str(error)) from None
            # The fenced flushes drop these users' rows anyway; dropping them now only frees the memory early.
            # (A thread: the buffer's write lock may be held by a flush waiting for another process's erasure.)
            buffered = await asyncio.to_thread(self._served_log.forget, user_ids) if self._served_log is not None else 0
        # Counts only: the ids are what must not reach the log.
        log.info("ForgetUsers: %s; %d buffered served-log rows dropped", report.summary(), buffered)
        return report
