"""Uploads: from "one object was written" to "this model is complete — warm it".

An upload of a sharded model is a burst of events, one per object, in any order. Each
event marks its model *pending* in Redis (``p:upload-pending:<uri>``, with the time of
the latest event); a model is checked only once no event has arrived for ``debounce_s``,
and then by one controller at a time (a short Redis lock). The check is one listing plus
the index (the completeness rule, :func:`warmpool.model.identity.check_complete`). A complete model is handed on and forgotten;
an incomplete one stays pending — remembered in Redis, so another controller or a
restarted one picks it up — and is checked again on its next event and periodically.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis

from warmpool.controller.dispatch import list_model
from warmpool.errors import WarmpoolError
from warmpool.controller.keys import RedisKeys
from warmpool.controller.redis_client import CONNECTION_ERRORS
from warmpool.controller.redis_lock import RedisLock
from warmpool.model.uri import ModelURI, parse_uri

log = logging.getLogger(__name__)
PENDING_TTL_S = 7 * 24 * 3600  # an upload abandoned half-way is forgotten after a week


class Uploads:
    def __init__(self, redis: Redis, keys: RedisKeys, *, cache: Any, debounce_s: float,
                 on_ready: Callable[[ModelURI], Awaitable[None]]) -> None:
        self.redis = redis
        self.keys = keys
        self.cache = cache
        self.debounce_s = debounce_s
        self.on_ready = on_ready
        self._timers: dict[ModelURI, asyncio.Task[None]] = {}

    async def seen(self, model: ModelURI) -> None:
        """Record an event for ``model`` and make sure a check follows the quiet period."""
        key = self.keys.upload_pending(model)
        now = repr(time.time())
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping={"uri": str(model), "last": now})
        pipe.hsetnx(key, "first", now)
        pipe.hincrby(key, "events", 1)
        pipe.expire(key, PENDING_TTL_S)
        pipe.sadd(self.keys.uploads_pending, str(model))
        await pipe.execute()
        self._schedule(model, self.debounce_s)

    def _schedule(self, model: ModelURI, delay: float) -> None:
        # One timer per model: a later event does not restart it; when it fires it reads
        # the latest event time from Redis and waits out the rest of the quiet period.
        if model not in self._timers:
            self._timers[model] = asyncio.create_task(self._after(model, delay),
                                                      name=f"debounce {model}")

    async def _after(self, model: ModelURI, delay: float) -> None:
        await asyncio.sleep(delay)
        self._timers.pop(model, None)
        await self._check_logged(model)

    async def check(self, model: ModelURI) -> str:
        """``gone``, ``waiting``, ``busy``, ``incomplete`` or ``ready``."""
        key = self.keys.upload_pending(model)
        last = await self.redis.hget(key, "last")
        if last is None:
            await self.redis.srem(self.keys.uploads_pending, str(model))
            return "gone"
        quiet = time.time() - float(last)
        if quiet < self.debounce_s:
            self._schedule(model, self.debounce_s - quiet)
            return "waiting"
        lock = RedisLock(self.redis, self.keys.upload_check(model), ttl_ms=60_000)
        if not await lock.acquire():
            return "busy"  # another controller is checking it right now
        try:
            listing = await list_model(self.cache, model)
            if not listing.completeness.complete:
                await self._still_incomplete(key, model, listing.completeness)
                return "incomplete"
            if await self.redis.hget(key, "last") != last:
                return "waiting"  # an event arrived while we listed: its timer checks again
            await self.redis.delete(key)
            await self.redis.srem(self.keys.uploads_pending, str(model))
        finally:
            await lock.release()
        log.info("upload of %s is complete", model,
                 extra={"event": "upload_complete", "uri": str(model)})
        await self.on_ready(model)
        return "ready"

    async def _still_incomplete(self, key: str, model: ModelURI, completeness: Any) -> None:
        missing = list(getattr(completeness, "missing", ()))[:20]
        await self.redis.hset(key, mapping={"checked": repr(time.time()),
                                            "missing": json.dumps(missing)})
        log.info("%s is not complete yet (missing %s); waiting for more uploads", model,
                 ", ".join(missing) or "?", extra={"event": "upload_incomplete",
                                                   "uri": str(model), "missing": missing})

    async def recheck_all(self) -> None:
        """Check every pending model that has no timer of its own (periodic sweep)."""
        for raw in await self.redis.smembers(self.keys.uploads_pending):
            uri = raw.decode() if isinstance(raw, bytes) else raw
            try:
                model = parse_uri(uri)
            except WarmpoolError:
                await self.redis.srem(self.keys.uploads_pending, uri)
                continue
            if model not in self._timers:
                await self._check_logged(model)

    async def _check_logged(self, model: ModelURI) -> None:
        try:
            await self.check(model)
        except CONNECTION_ERRORS as exc:  # still pending in Redis: the periodic sweep retries
            log.warning("cannot check %s: Redis unreachable (%s)", model, exc,
                        extra={"event": "upload_check_failed", "uri": str(model)})
        except WarmpoolError as exc:  # the store cannot be listed now: keep it pending
            log.warning("cannot check %s: %s", model, exc,
                        extra={"event": "upload_check_failed", "uri": str(model)})
        except Exception:  # noqa: BLE001 - a timer must never die silently
            log.exception("checking %s failed", model)

    async def close(self) -> None:
        timers = list(self._timers.values())
        self._timers.clear()
        for task in timers:
            task.cancel()
        for task in timers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
