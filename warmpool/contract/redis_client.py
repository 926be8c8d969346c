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
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

from redis import exceptions as rexc
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from warmpool.errors import ConfigError
from warmpool.retry import Backoff

log = logging.getLogger(__name__)

#: Errors that mean "Redis is not reachable right now", as opposed to a bad command.
#: Only Redis's own: the client wraps its socket errors in them, and a bare ``OSError``
#: from a storage backend or the local disk (a dangling link in a model) is the model's
#: failure, to record and answer, not an outage to wait out.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (rexc.ConnectionError, rexc.TimeoutError)
RECONNECT = Backoff(attempts=1_000_000, base=0.1, cap=5.0)


SENTINEL_SCHEME = "redis+sentinel://"
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelURL:
    """``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]
    [?sentinel_password=...]``: the Sentinels to ask, the monitored service (master)
    name, and the credentials of the master (in the URL's user part) and of the
    Sentinels themselves (a query parameter: they often differ)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, url: str) -> SentinelURL:
        if not url.startswith(SENTINEL_SCHEME):
            raise ConfigError(f"{redact(url)} is not a {SENTINEL_SCHEME} URL")
        rest, _, query = url[len(SENTINEL_SCHEME):].partition("?")
        netloc, _, path = rest.partition("/")
        userinfo, _, hosts = netloc.rpartition("@")
        username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
        sentinels = []
        for item in filter(None, hosts.split(",")):
            if item.startswith("["):  # [IPv6]:port
                host, _, port = item[1:].partition("]")
                port = port.removeprefix(":")
            else:
                host, _, port = item.partition(":")
            try:
                sentinels.append((unquote(host), int(port) if port else SENTINEL_PORT))
            except ValueError:
                raise ConfigError(f"{redact(url)}: bad Sentinel address {item!r}") from None
        service, _, db = path.partition("/")
        db = db.strip("/")
        if not sentinels or not service:
            raise ConfigError(f"{redact(url)}: a Sentinel URL names at least one Sentinel and "
                              "the service, as redis+sentinel://host:26379/mymaster")
        if db and not db.isdigit():
            raise ConfigError(f"{redact(url)}: database {db!r} is not a number")
        options = parse_qs(query)
        return cls(tuple(sentinels), unquote(service), int(db or 0),
                   unquote(username) or None, unquote(password) or None,
                   options.get("sentinel_password", [None])[0])


def connect(url: str, *, name: str = "warmpool") -> Redis:
    """A client for ``url``: ``redis://``, ``rediss://``, ``unix://``, or
    ``redis+sentinel://`` (see :class:`SentinelURL`), whose client asks the Sentinels for
    the current master on every new connection, so a failover looks like one more
    dropped connection.

    Commands retry three times within about a second; longer outages surface as
    :data:`CONNECTION_ERRORS` for :func:`keep_running` to ride out.
    """
    options: dict[str, Any] = {
        "retry": Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), retries=3),
        "retry_on_error": [rexc.ConnectionError, rexc.TimeoutError],
        "socket_connect_timeout": 2.0, "socket_timeout": 10.0,
        "health_check_interval": 15, "client_name": name,
    }
    if url.startswith(SENTINEL_SCHEME):
        from redis.asyncio.sentinel import Sentinel

        parsed = SentinelURL.parse(url)
        sentinel = Sentinel(list(parsed.sentinels),
                            sentinel_kwargs={"password": parsed.sentinel_password,
                                             "socket_connect_timeout": 2.0,
                                             "socket_timeout": 2.0})
        return sentinel.master_for(parsed.service, db=parsed.db, username=parsed.username,
                                   password=parsed.password, **options)
    return Redis.from_url(url, **options)


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
    """``url`` without its passwords, for messages and logs (credentials are never
    logged): the user part's and a ``sentinel_password`` query parameter's."""
    url = re.sub(r"^([a-z+]+://[^:/@]*:)[^/]*@", r"\1***@", url, flags=re.IGNORECASE)
    return re.sub(r"([?&]sentinel_password=)[^&]*", r"\1***", url)
