"""A paused Redis (SIGSTOP: a long fsync, a frozen VM, a partition) must not wedge the
controller: a renewed lock stops renewing when asked, whatever Redis does."""

from __future__ import annotations

import asyncio
import os
import signal

from tests.redis_server import RedisServer
from warmpool.controller.redis_client import connect
from warmpool.controller.redis_lock import RedisLock


async def test_leaving_a_renewed_lock_does_not_wait_for_a_paused_redis(
        redis_server: RedisServer) -> None:
    assert redis_server.process is not None
    pid = redis_server.process.pid
    redis = connect(redis_server.url)
    lock = RedisLock(redis, "wp:lock:test", ttl_ms=300)
    assert await lock.acquire()
    loop = asyncio.get_running_loop()
    resume = loop.call_later(60, os.kill, pid, signal.SIGCONT)  # never leave it stopped
    left = asyncio.Event()

    async def hold() -> None:
        async with lock.renewed():
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(0.5)  # renewals are in flight now, unanswered
        left.set()

    holder = asyncio.ensure_future(hold())
    try:
        await asyncio.wait({holder}, timeout=30)
        assert left.is_set(), "leaving the block waited on the paused Redis"
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("renew ")
                    and not t.done()]
    finally:
        os.kill(pid, signal.SIGCONT)
        resume.cancel()
        await asyncio.wait({holder}, timeout=30)
        await redis.aclose()
    # Redis is back: the lock we left is released or expires; it can be taken again.
    again = RedisLock(connect(redis_server.url), "wp:lock:test", ttl_ms=300)
    for _ in range(50):
        if await again.acquire():
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the lock was never freed")
    await again.redis.aclose()
