"""Connections to Redis, and the loop that keeps a Redis-reading task alive.

Redis may restart or drop a connection at any time (a failover, an OOM kill, a network
blip). Single commands retry briefly inside redis-py; a long-running reader (pub/sub,
a stream consumer) instead runs under :func:`keep_running`, which logs the loss, waits
with jittered exponential backoff and starts the reader again — re-subscribing and
re-creating its consumer group is the reader's own first step, so resuming is the same
code path as starting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from redis import exceptions as rexc
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from warmpool.retry import Backoff

log = logging.getLogger(__name__)

#: Errors that mean "Redis is not reachable right now", as opposed to a bad command.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    rexc.ConnectionError, rexc.TimeoutError, ConnectionError, OSError,
)
RECONNECT = Backoff(attempts=1_000_000, base=0.1, cap=5.0)


def connect(url: str, *, name: str = "warmpool") -> Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``unix://``).

    Commands retry three times within about a second; longer outages surface as
    :data:`CONNECTION_ERRORS` for :func:`keep_running` to ride out.
    """
    retry = Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), retries=3)
    return Redis.from_url(url, retry=retry, socket_connect_timeout=2.0, socket_timeout=10.0,
                          retry_on_error=[rexc.ConnectionError, rexc.TimeoutError],
                          health_check_interval=15, client_name=name)


async def keep_running(what: str, step: Callable[[], Awaitable[None]],
                       stopping: asyncio.Event, *, backoff: Backoff = RECONNECT) -> None:
    """Await ``step()`` until ``stopping`` is set; after a connection loss, back off and
    call it again. ``step`` returns normally only when it noticed ``stopping``."""
    failures = 0
    while not stopping.is_set():
        started = time.monotonic()
        try:
            await step()
        except CONNECTION_ERRORS as exc:
            # a step that ran a while before failing had reconnected: start the backoff over
            failures = 1 if time.monotonic() - started > 30 else failures + 1
            delay = backoff.delay(min(failures, 10))
            level = logging.WARNING if failures == 1 else logging.DEBUG
            log.log(level, "%s lost Redis (%s); reconnecting in %.2fs", what, exc, delay,
                    extra={"event": "redis_lost", "task": what, "attempt": failures})
            await _sleep_or_stop(delay, stopping)
        except rexc.ResponseError as exc:
            # e.g. NOGROUP after a Redis that lost its data came back: the step re-creates
            # what it needs when it starts again.
            log.warning("%s: Redis answered %s; starting again", what, exc,
                        extra={"event": "redis_error", "task": what})
            await _sleep_or_stop(0.1, stopping)


async def retry_until(what: str, op: Callable[[], Awaitable[None]],
                      stopping: asyncio.Event, *, backoff: Backoff = RECONNECT) -> None:
    """Await ``op()`` until it succeeds once (or ``stopping`` is set), backing off while
    Redis is unreachable — a controller may start before its Redis does."""
    failures = 0
    while not stopping.is_set():
        try:
            await op()
            return
        except CONNECTION_ERRORS as exc:
            failures += 1
            delay = backoff.delay(min(failures, 10))
            log.warning("%s: Redis unreachable (%s); retrying in %.2fs", what, exc, delay,
                        extra={"event": "redis_unreachable", "task": what})
            await _sleep_or_stop(delay, stopping)


async def _sleep_or_stop(seconds: float, stopping: asyncio.Event) -> None:
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except TimeoutError:
        pass


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs (credentials are never logged)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
