"""Uploads: from "one object was written" to "this model is complete — warm it".

An upload of a sharded model is a burst of events, one per object, in any order. Each
event marks its model *pending* in Redis (``p:upload-pending:<uri>``, with the time of
the latest event); a model is checked only once no event has arrived for ``debounce_s``,
and then by one controller at a time (a short Redis lock). The check is one listing plus
the index (the completeness rule, :func:`warmpool.model.identity.check_complete`). A
complete model is handed on and forgotten; an incomplete one stays pending — remembered
in Redis, so another controller or a restarted one picks it up — and is checked again on
its next event and periodically.

Events are cheap to send and each pending model costs a listing per check, so pending
models are bounded: at most ``MAX_PENDING`` at once (events for new ones past that are
dropped, counted in one log line), a prefix that lists empty is forgotten (its objects
do not exist: 20 payloads of 1,000 records for missing objects once made 20,000 pending
models and 400 listings per 15 s), and the periodic re-check of an incomplete model backs
off (doubling from the sweep interval to an hour) until an event for it arrives.
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

from warmpool.contract.keys import RedisKeys
from warmpool.contract.redis_client import CONNECTION_ERRORS
from warmpool.contract.redis_lock import RedisLock
from warmpool.controller.dispatch import list_model
from warmpool.errors import ObjectNotFoundError, WarmpoolError
from warmpool.model.uri import ModelURI, parse_uri

log = logging.getLogger(__name__)
PENDING_TTL_S = 7 * 24 * 3600  # an upload abandoned half-way is forgotten after a week
MAX_PENDING = 10_000  # models whose upload is awaited at once
RECHECK_CAP_S = 3600.0  # the longest wait between two sweeps' checks of one model


class Uploads:
    def __init__(self, redis: Redis, keys: RedisKeys, *, cache: Any, debounce_s: float,
                 on_ready: Callable[[ModelURI], Awaitable[None]],
                 recheck_s: float = 30.0) -> None:
        self.redis = redis
        self.keys = keys
        self.cache = cache
        self.debounce_s = debounce_s
        self.on_ready = on_ready
        self._timers: dict[ModelURI, asyncio.Task[None]] = {}
        self.dropped = 0
        self.recheck_s = recheck_s  # the sweep's interval: the first re-check backoff

    async def seen(self, model: ModelURI) -> None:
        """Record an event for ``model`` and make sure a check follows the quiet period;
        dropped (and counted) when ``MAX_PENDING`` other models are pending already."""
        key = self.keys.upload_pending(model)
        if not await self.redis.sismember(self.keys.uploads_pending, str(model)) and \
                await self.redis.scard(self.keys.uploads_pending) >= MAX_PENDING:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("%d upload event(s) dropped: %d models are pending already "
                            "(the last: %s)", self.dropped, MAX_PENDING, model,
                            extra={"event": "upload_pending_full", "count": self.dropped})
            return
        now = repr(time.time())
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping={"uri": str(model), "last": now})
        pipe.hdel(key, "checks")  # an event: the next sweep checks it without backoff
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
            try:
                listing = await list_model(self.cache, model)
            except ObjectNotFoundError:  # a local directory that is not there
                listing = None
            # nothing there: the events named objects that do not exist
            if listing is None or not listing.objects:
                await self.redis.delete(key)
                await self.redis.srem(self.keys.uploads_pending, str(model))
                log.info("forgot the pending upload of %s: the prefix lists empty", model,
                         extra={"event": "upload_empty", "uri": str(model)})
                return "gone"
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
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping={"checked": repr(time.time()), "missing": json.dumps(missing)})
        pipe.hincrby(key, "checks", 1)
        await pipe.execute()
        log.info("%s is not complete yet (missing %s); waiting for more uploads", model,
                 ", ".join(missing) or "?", extra={"event": "upload_incomplete",
                                                   "uri": str(model), "missing": missing})

    async def recheck_all(self) -> None:
        """Check every pending model that has no timer of its own and whose re-check is
        due (periodic sweep): after ``n`` checks found it incomplete with no event since,
        the next waits ``recheck_s * 2**n`` (at most an hour)."""
        now = time.time()
        for raw in await self.redis.smembers(self.keys.uploads_pending):
            uri = raw.decode() if isinstance(raw, bytes) else raw
            try:
                model = parse_uri(uri)
            except WarmpoolError:
                await self.redis.srem(self.keys.uploads_pending, uri)
                continue
            if model in self._timers:
                continue
            checked, checks = await self.redis.hmget(self.keys.upload_pending(model),
                                                     ["checked", "checks"])
            if checked is not None and checks is not None:
                wait = min(RECHECK_CAP_S, self.recheck_s * 2 ** min(int(checks), 20))
                if now - float(checked) < wait:
                    continue
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
