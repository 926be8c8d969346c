"""Dispatch: make one model warm on one device of this node — once.

Deduplication happens twice. In this process, every request for the same (model,
device) while one is in flight awaits that one task. Across controllers sharing a Redis,
a lock per (content hash, node, device) lets one stream while the others wait and then
find the entry warm. The device's tier fills it (:func:`warmpool.tiers.base.tier_for`):
the host tier (``cpu``) in this process, ``cuda:N`` through the node's GPU workers.

A new version of a model (a re-upload changed its content hash) replaces the old one:
once the new entry is warm the old one is evicted, or — while a serving process still
holds a lease on it — put on the node's *retiring* set and evicted when the lease ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from redis.asyncio import Redis

from warmpool.config import Settings
from warmpool.contract.keys import RedisKeys
from warmpool.contract.redis_client import CONNECTION_ERRORS
from warmpool.contract.redis_lock import RedisLock
from warmpool.contract.requests import Request
from warmpool.controller.exports import EngineExports
from warmpool.controller.metrics import Metrics
from warmpool.errors import LeaseHeldError, NotWarmError, WarmpoolError
from warmpool.model.uri import ModelURI
from warmpool.pool.entries import Pool
from warmpool.pool.eviction import inherits_pin, layouts_of, superseded
from warmpool.pool.registry.base import PoolEntry, State
from warmpool.pool.registry.redis import RedisRegistry
from warmpool.tiers.base import tier_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What a request achieved; also the reply a ``warmpool prefetch`` waits for."""

    uri: str
    device: str
    state: str
    entry: PoolEntry | None = None
    seconds: float = 0.0
    loader: str = ""
    already_warm: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        e = self.entry
        return {"uri": self.uri, "device": self.device, "state": self.state,
                "content_hash": e.content_hash if e else None, "node": e.node if e else None,
                "bytes": e.bytes if e else 0, "tensors": e.tensors if e else 0,
                "pinned": e.pinned if e else False, "seconds": round(self.seconds, 4),
                "loader": self.loader, "already_warm": self.already_warm, "error": self.error}


def _cancelling() -> bool:
    task = asyncio.current_task()
    return bool(task is not None and task.cancelling())


async def list_model(cache: Any, uri: ModelURI) -> Any:
    """One listing of ``uri`` (objects, content hash, completeness) — cheap, no download."""
    from warmpool.storage import open_store

    async with open_store(uri) as store:
        return await cache.inspect(uri, store)


class Dispatcher:
    def __init__(self, *, settings: Settings, pool: Pool, registry: RedisRegistry,
                 redis: Redis, keys: RedisKeys, metrics: Metrics, loader: str = "auto",
                 lock_ttl_ms: int = 30_000, lock_poll_s: float = 0.2) -> None:
        from warmpool.model.cache import default_cache

        self.settings = settings
        self.pool = pool
        self.registry = registry
        self.redis = redis
        self.keys = keys
        self.metrics = metrics
        self.loader = loader
        self.lock_ttl_ms = lock_ttl_ms
        self.lock_poll_s = lock_poll_s
        self.node = registry.node
        self.cache = default_cache(settings)
        self.exports = EngineExports(settings, pool)
        self._inflight: dict[tuple[str, str], asyncio.Task[Outcome]] = {}
        self._closing = False

    # --- warming -------------------------------------------------------------------
    async def warm(self, target: Request) -> Outcome:
        """Warm the model a deploy or pin ``target`` names (and pin it for a pin),
        joining a warm-up of the same model already in flight."""
        slot = (str(target.uri), target.device)
        task = self._inflight.get(slot)
        if task is None or task.cancelling():  # an evict is ending that one: start anew
            task = asyncio.create_task(self._warm(target), name=f"warm {slot[0]} {slot[1]}")
            self._inflight[slot] = task
            task.add_done_callback(lambda t: self._forget(slot, t))
        try:
            outcome = await asyncio.shield(task)
        except asyncio.CancelledError:
            if self._closing or not task.cancelled() or _cancelling():
                raise  # shutdown, or our caller was cancelled: not done, not acknowledged
            # an evict cancelled the warm-up: the request is answered, not retried
            return Outcome(str(target.uri), target.device, "cancelled",
                           error="cancelled by an evict of the same model")
        if target.pinned and outcome.entry is not None and not outcome.entry.pinned:
            await self.set_pin(str(target.uri), target.device, True)
            outcome = replace(outcome, entry=replace(outcome.entry, pinned=True))
        return outcome

    def _forget(self, slot: tuple[str, str], task: asyncio.Task[Outcome]) -> None:
        if self._inflight.get(slot) is task:
            del self._inflight[slot]

    async def _warm(self, target: Request) -> Outcome:
        started = time.perf_counter()
        try:
            listing = await list_model(self.cache, target.uri)
            lock = RedisLock(self.redis, self.keys.lock(listing.content_hash, target.device,
                                                        self.node), self.lock_ttl_ms)
            while not await lock.acquire():  # noqa: ASYNC110 - the holder is another node
                await asyncio.sleep(self.lock_poll_s)  # streaming it: wait, then find it warm
            async with lock.renewed():
                outcome = await self._fill(target, listing.content_hash)
        except CONNECTION_ERRORS:
            raise  # not the model's fault: the request stays unacknowledged and is retried
        except WarmpoolError as exc:
            outcome = Outcome(str(target.uri), target.device, State.FAILED.value,
                              error=str(exc), seconds=time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - one model's failure must not stop others
            log.exception("warming %s on %s failed", target.uri, target.device)
            outcome = Outcome(str(target.uri), target.device, State.FAILED.value,
                              error=f"{type(exc).__name__}: {exc}",
                              seconds=time.perf_counter() - started)
        self._count(outcome)
        if outcome.state == State.WARM.value and outcome.entry is not None:
            await self._retire_old_versions(outcome.entry, str(target.uri))
        return outcome

    async def _fill(self, target: Request, content_hash: str) -> Outcome:
        tier = tier_for(target.device, self.settings, pool=self.pool, tp=target.tp)
        loaded = await tier.load(target.uri, tp=target.tp, sharding=target.sharding,
                                 loader=self.loader,
                                 progress=self.metrics.progress(target.device),
                                 cache=self.cache, content_hash=content_hash)
        return Outcome(str(target.uri), target.device, loaded.state, loaded.entry,
                       loaded.seconds, loaded.loader, loaded.already_warm, loaded.error)

    def _count(self, outcome: Outcome) -> None:
        if outcome.already_warm:
            return
        if outcome.state == State.WARM.value:
            self.metrics.streamed.labels(outcome.device).inc()
            self.metrics.time_to_warm.labels(outcome.device).observe(outcome.seconds)
            if outcome.entry is not None:
                self.metrics.observe_fill(outcome.entry)
        log.info("%s on %s: %s%s", outcome.uri, outcome.device, outcome.state,
                 f" ({outcome.error})" if outcome.error else "",
                 extra={"event": "warm_done", "uri": outcome.uri, "device": outcome.device,
                        "state": outcome.state, "seconds": round(outcome.seconds, 3),
                        "error": outcome.error})

    async def shutdown(self) -> None:
        """Cancel warm-ups in flight; prefetch discards their partial segments."""
        self._closing = True
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    @property
    def busy(self) -> int:
        return len(self._inflight)

    @property
    def tasks(self) -> list[asyncio.Task[Outcome]]:
        return list(self._inflight.values())

    # --- pins, eviction, retirement ----------------------------------------------------
    async def set_pin(self, uri: str, device: str, pinned: bool) -> list[PoolEntry]:
        changed = []
        for entry in await self._entries(uri, device):
            if entry.pinned != pinned and entry.state != State.EVICTED:
                changed.append(replace(entry, pinned=pinned))
                await self.registry.put(changed[-1])
        return changed

    async def evict(self, uri: str, device: str, *, force: bool = False) -> Outcome:
        """Evict every version of ``uri`` on ``device``; leased ones retire later, or go
        now with ``force`` (their holders are asked to detach first)."""
        task = self._inflight.get((uri, device))
        if task is not None:  # a warm-up in flight ends first, its partial entry failed
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        evicted: list[PoolEntry] = []
        retiring: list[PoolEntry] = []
        entries = await self.pool.entries()
        for entry in [e for e in entries if uri in e.uris and e.device == device]:
            if entry.state in (State.WARM, State.FAILED, State.LOST):
                renamed = await self.pool.drop_name(entry, uri)  # another URI keeps it
                done = renamed is not None or await self.retire(entry, force=force)
                (evicted if done else retiring).append(entry)
                if renamed is None:  # the checkpoint goes: its engine layouts go with it
                    for layout in layouts_of(entries, entry):
                        await self.retire(layout, force=force)
        state = "retiring" if retiring else State.EVICTED.value
        error = (f"{len(retiring)} version(s) still leased; evicted when the leases end"
                 if retiring else None)
        done_or_waiting = retiring or evicted
        last = done_or_waiting[-1] if done_or_waiting else None
        return Outcome(uri, device, state, last, error=error)

    async def retire(self, entry: PoolEntry, *, force: bool = False) -> bool:
        """Evict ``entry`` now, or remember it until its leases end; True when evicted."""
        try:
            await self._evict_entry(entry, force=force)
        except LeaseHeldError:
            await self.redis.sadd(self.keys.retiring(self.node), entry.key)
            log.info("%s (%s) on %s is leased; evicting it when the lease ends", entry.uri,
                     entry.content_hash[:12], entry.device,
                     extra={"event": "retiring", "uri": entry.uri, "device": entry.device})
            return False
        except NotWarmError:
            pass
        except WarmpoolError as exc:  # a worker that is down or refuses: try again later
            if entry.state == State.WARM:
                log.warning("cannot evict %s from %s now (%s); will retry", entry.uri,
                            entry.device, exc, extra={"event": "evict_failed",
                                                      "uri": entry.uri, "device": entry.device})
                await self.redis.sadd(self.keys.retiring(self.node), entry.key)
                return False
            await self.registry.transition(entry, State.EVICTED)  # nothing resident to free
        await self.redis.srem(self.keys.retiring(self.node), entry.key)
        return True

    async def retry_retiring(self) -> None:
        for raw in await self.redis.smembers(self.keys.retiring(self.node)):
            key = raw.decode() if isinstance(raw, bytes) else raw
            entry = await self.registry.get(key)
            if entry is None or entry.state not in (State.WARM, State.FAILED, State.LOST):
                await self.redis.srem(self.keys.retiring(self.node), key)
            else:
                await self.retire(entry)

    async def _retire_old_versions(self, current: PoolEntry, uri: str) -> None:
        """The pool's rule (:func:`superseded`): pinned old versions go too, the pin
        moves to ``current``; leased ones wait on the retiring set; a version another
        URI still names only loses the name ``uri``."""
        old = superseded(await self.pool.entries(), current, uri)
        if inherits_pin(old) and not current.pinned:
            await self.registry.put(replace(current, pinned=True))
        for entry in old:
            if await self.pool.drop_name(entry, uri) is not None:
                continue
            log.info("%s changed: retiring version %s", entry.uri, entry.content_hash[:12],
                     extra={"event": "new_version", "uri": entry.uri,
                            "old": entry.content_hash, "new": current.content_hash})
            await self.retire(entry)
            for layout in layouts_of(await self.pool.entries(), entry):
                await self.retire(layout)

    async def _evict_entry(self, entry: PoolEntry, *, force: bool = False) -> None:
        tier = tier_for(entry.device, self.settings, pool=self.pool)
        await tier.evict(entry.content_hash, force=force)

    async def _entries(self, uri: str, device: str) -> list[PoolEntry]:
        return [e for e in await self.pool.entries() if uri in e.uris and e.device == device]
