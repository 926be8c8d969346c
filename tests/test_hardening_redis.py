"""A paused Redis (SIGSTOP: a long fsync, a frozen VM, a partition) must not wedge the
controller: a renewed lock stops renewing when asked, whatever Redis does."""

from __future__ import annotations

import asyncio
import os
import signal

from tests.redis_server import RedisServer
from warmpool.contract.redis_client import connect
from warmpool.contract.redis_lock import RedisLock


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


async def test_a_heartbeat_lost_to_a_redis_pause_is_not_a_missing_controller(
        redis_server: RedisServer) -> None:
    """After a pause longer than the heartbeat's TTL the heartbeat has expired, but the
    controller's stream consumer was active: the CLI waits for the next beat."""
    from warmpool.contract.keys import RedisKeys
    from warmpool.controller import remote
    from warmpool.errors import WarmpoolError

    keys = RedisKeys()
    redis = connect(redis_server.url)
    try:
        with __import__("pytest").raises(WarmpoolError, match="no warmpool controller"):
            await remote._require_controller(redis, keys, "n1", redis_server.url)
        controller = connect(redis_server.url, name="warmpool-n1")  # as `warmpool serve`
        await controller.ping()

        async def beat_again() -> None:
            await asyncio.sleep(1.0)  # the controller's next heartbeat after the pause
            await redis.set(keys.node("n1"), "{}", px=15_000)

        beat = asyncio.ensure_future(beat_again())
        await remote._require_controller(redis, keys, "n1", redis_server.url)
        await beat
        await controller.aclose()
    finally:
        await redis.aclose()
