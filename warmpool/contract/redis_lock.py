"""A lease-style lock in Redis: ``SET key token NX PX ttl``, renewed while held.

Two controllers that share a Redis must never stream the same model to the same device
twice. The lock expires on its own if its holder dies (no one has to clean up after a
SIGKILL), so the holder renews it every third of its TTL; release and renewal compare
the token first, so a holder whose lock already expired can never free or extend a lock
that someone else has taken since.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from redis.asyncio import Redis

from warmpool.contract.redis_client import CONNECTION_ERRORS

log = logging.getLogger(__name__)

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""


class RedisLock:
    def __init__(self, redis: Redis, key: str, ttl_ms: int = 30_000) -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = ttl_ms
        self.token = secrets.token_hex(12)
        self._release = redis.register_script(_RELEASE)
        self._renew = redis.register_script(_RENEW)

    async def acquire(self) -> bool:
        """Take the lock if it is free; never waits."""
        return bool(await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms))

    async def renew(self) -> bool:
        """Extend our lock, or take it again if it vanished (a Redis that restarted
        empty); False when someone else holds it now."""
        return bool(await self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))

    async def release(self) -> None:
        await self._release(keys=[self.key], args=[self.token])

    @contextlib.asynccontextmanager
    async def renewed(self) -> AsyncIterator[None]:
        """Keep renewing while the block runs (the lock must be held on entry).

        Leaving the block never waits on Redis for long: renewal stops at once, and the
        release is given one renewal interval (a lock not released expires by itself).
        """
        stop = asyncio.Event()
        task = asyncio.create_task(self._keep(stop), name=f"renew {self.key}")
        try:
            yield
        finally:
            stop.set()
            await asyncio.wait({task}, timeout=self.ttl_ms / 3000)
            if not task.done():  # cannot happen: _keep returns when it sees stop
                task.cancel()
            await _bounded(self.release(), self.ttl_ms / 3000)

    async def _keep(self, stop: asyncio.Event) -> None:
        """Renew every third of the TTL until ``stop`` is set.

        A renewal is never awaited directly: redis-py swallows a cancel that arrives while
        a command waits for its reply, so with Redis paused (a long fsync, SIGSTOP, a
        network partition) a plain ``await`` would keep this task — and whoever waits
        for it — for ever. We wait for the renewal *or* the stop signal, and leave an
        unanswered renewal behind (one at a time) when told to stop.
        """
        interval = self.ttl_ms / 3000
        stopped = asyncio.ensure_future(stop.wait())
        renewal: asyncio.Future[bool] | None = None
        try:
            while not stop.is_set():
                await asyncio.wait({stopped}, timeout=interval)
                if stop.is_set():
                    return
                if renewal is None or renewal.done():
                    renewal = asyncio.ensure_future(self.renew())
                    renewal.add_done_callback(_consume)
                either: set[asyncio.Future[Any]] = {renewal, stopped}
                await asyncio.wait(either, timeout=interval,
                                   return_when=asyncio.FIRST_COMPLETED)
                if renewal.done() and not renewal.cancelled():
                    self._report(renewal)
        finally:
            stopped.cancel()

    def _report(self, renewal: asyncio.Future[bool]) -> None:
        exc = renewal.exception()
        if exc is None and not renewal.result():
            log.warning("lock %s was taken by another holder while we held it",
                        self.key, extra={"event": "lock_lost", "lock": self.key})
        elif isinstance(exc, CONNECTION_ERRORS):
            log.debug("cannot renew %s (%s); will retry", self.key, exc)
        elif exc is not None:
            log.warning("renewing lock %s failed: %s", self.key, exc,
                        extra={"event": "lock_renew_failed", "lock": self.key})


def _consume(future: asyncio.Future[bool]) -> None:
    """Retrieve the outcome of a renewal nobody waits for any more (no "exception was
    never retrieved" noise)."""
    if not future.cancelled():
        future.exception()


async def _bounded(call: Awaitable[object], timeout: float) -> None:
    """Run ``call`` for at most ``timeout`` seconds without awaiting it past that (see
    :meth:`RedisLock._keep`); its errors are dropped: the lock expires on its own."""
    future = asyncio.ensure_future(call)
    future.add_done_callback(lambda f: None if f.cancelled() else f.exception())
    await asyncio.wait({future}, timeout=timeout)
