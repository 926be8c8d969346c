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
from collections.abc import AsyncIterator

from redis.asyncio import Redis

from warmpool.controller.redis_client import CONNECTION_ERRORS

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
        """Keep renewing while the block runs (the lock must be held on entry)."""
        task = asyncio.create_task(self._keep(), name=f"renew {self.key}")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(*CONNECTION_ERRORS):
                await self.release()

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                if not await self.renew():
                    log.warning("lock %s was taken by another holder while we held it",
                                self.key, extra={"event": "lock_lost", "lock": self.key})
            except CONNECTION_ERRORS as exc:
                log.debug("cannot renew %s (%s); will retry", self.key, exc)
