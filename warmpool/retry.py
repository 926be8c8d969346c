"""Retries with exponential backoff and full jitter, for errors a retry can cure.

Only :class:`~warmpool.errors.TransientStorageError` (and whatever a caller names in
``retry_on``) is retried; a missing object or a refused credential fails at once, so a
typo costs one round trip instead of a minute of backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from warmpool.errors import TransientStorageError

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    attempts: int = 5
    base: float = 0.1
    cap: float = 5.0

    def delay(self, attempt: int) -> float:
        """Full-jitter delay before retry number ``attempt`` (1-based)."""
        return random.uniform(0, min(self.cap, self.base * 2 ** (attempt - 1)))


DEFAULT_BACKOFF = Backoff()


async def retry_async(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    backoff: Backoff = DEFAULT_BACKOFF,
    retry_on: tuple[type[BaseException], ...] = (TransientStorageError,),
) -> T:
    """Await ``op()`` until it succeeds, a non-retryable error escapes, or attempts run out."""
    for attempt in range(1, backoff.attempts + 1):
        try:
            return await op()
        except retry_on as exc:
            if attempt == backoff.attempts:
                raise
            delay = backoff.delay(attempt)
            log.warning("%s failed (%s); retry %d/%d in %.2fs", what, exc, attempt,
                        backoff.attempts - 1, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
