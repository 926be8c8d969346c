"""A seeder: the models a process holds warm, readable by peers over NIXL.

Two kinds of process hold weights, and each runs one: the controller for the host tier
(whose process fills it, and so holds the NIXL agent, :mod:`warmpool.loading.nixl_agent`),
and each device worker for its own buffers (VRAM on a GPU: a peer's worker reads GPU to
GPU, with GPUDirect RDMA where the NIC has it). What differs between them is in
:class:`Holdings`; the rest is here.

At every pass the seeder registers each newly warm checkpoint (never an engine layout, a
lease file or a record: only weight bytes, on the host mapped read-only) and publishes a
seed for it (:mod:`warmpool.contract.seeds`) with a checksum per range, computed once from
the bytes it registers; a model that went is deregistered before its memory is let go, so
a late read fails at the reader instead of touching freed memory.

A reader asks for a lease before it reads (``p:peer-asks:<name>``); the seeder takes one
on its behalf and holds it while the reader's key (``p:peer-reading:<id>``) lives, so that
eviction waits for the read. A forced evict or a death does not wait: the reader's
checksums and fallback cover those.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from redis.asyncio import Redis

from warmpool.config import Settings
from warmpool.contract.keys import RedisKeys
from warmpool.contract.seeds import Seed, encode_metadata
from warmpool.pool.host import HostResident, HostTier, map_resident
from warmpool.pool.layout import Layout

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Reads one seeder lends to at once: an ask past it is told "busy" (and reads the bucket
#: or another peer), so asks alone cannot pin every model here for ever.
MAX_LEASES = 64
_ASK_ID = re.compile(r"[A-Za-z0-9._:@-]{1,300}")
_HASH = re.compile(r"[0-9a-f]{64}")

Release = Callable[[], None]


@dataclass
class Holding:
    """One warm model's bytes, opened for peers."""

    uri: str
    tensor: torch.Tensor
    layout: Layout
    kind: str = "DRAM"  # "VRAM": a worker's device buffer
    device_id: int = 0
    close: Release = field(default=lambda: None)


class Holdings(Protocol):
    """What one process holds warm (the host tier in a controller, a worker's buffers).
    Called on the event loop: an implementation that blocks moves itself to a thread."""

    async def current(self) -> dict[str, tuple[str, object]]:
        """content hash -> (URI, a stamp that changes when the bytes are replaced)."""

    async def open(self, content_hash: str) -> Holding: ...

    async def lease(self, content_hash: str, holder: str) -> Release | None:
        """Keep ``content_hash`` from being evicted until the returned call; None when
        it is not held any more."""


class HostHoldings:
    """The host tier's checkpoints: each published segment mapped read-only."""

    def __init__(self, host: HostTier) -> None:
        self.host = host
        self._residents: dict[str, HostResident] = {}

    async def current(self) -> dict[str, tuple[str, object]]:
        residents = await asyncio.to_thread(self.host.residents)
        self._residents = {r.content_hash: r for r in residents if r.engine is None}
        return {h: (r.uri, (r.segment, r.arena)) for h, r in self._residents.items()}

    async def open(self, content_hash: str) -> Holding:
        resident = self._residents[content_hash]
        mapping, tensor = await asyncio.to_thread(map_resident, resident)

        def close() -> None:
            with contextlib.suppress(BufferError):  # a view still alive: GC unmaps it
                mapping.close()

        return Holding(resident.uri, tensor, resident.layout.to_layout(), close=close)

    async def lease(self, content_hash: str, holder: str) -> Release | None:
        resident = self._residents.get(content_hash)
        if resident is None:
            return None
        taken = await asyncio.to_thread(self.host.lease, resident, holder)
        return taken.release if taken is not None else None


@dataclass
class _Served:
    stamp: object
    holding: Holding
    handle: Any
    seed: Seed


class Seeder:
    def __init__(self, settings: Settings, redis: Redis, keys: RedisKeys, ttl_s: float,
                 holdings: Holdings | None = None, name: str | None = None) -> None:
        """``name``: who seeds, in the seeds and their keys (the node's name for its host
        tier, ``<node>@<device>`` for a worker); also its NIXL agent's name."""
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self.name = name or settings.node
        self.ttl_ms = int(ttl_s * 1000)
        self.holdings = holdings or HostHoldings(HostTier(settings.runtime_dir))
        self._served: dict[str, _Served] = {}  # content hash -> what is registered
        self._leases: dict[str, Release] = {}  # ask id -> ends the lease held for it
        self._agent: Any = None
        self._meta: str | None = None  # the agent's metadata, as published
        self._meta_of: tuple[str, ...] = ()  # ... when these models were registered

    @property
    def agent(self) -> Any:
        if self._agent is None:
            from warmpool.loading.nixl_agent import peer_agent

            self._agent = peer_agent(self.settings.peers, self.name)
        return self._agent

    async def start(self) -> None:
        """Make the agent now (off the loop): a node configured for peers without NIXL, or
        whose UCX cannot start, says so when it starts rather than at its first seed."""
        await asyncio.to_thread(lambda: self.agent)

    # --- seeds ----------------------------------------------------------------------------
    async def publish(self) -> int:
        """Register what became warm, drop what went, and renew every seed; returns how
        many models this seeder serves."""
        await self.start()
        held = await self.holdings.current()
        for content_hash in [h for h, s in self._served.items()
                             if h not in held or held[h][1] != s.stamp]:
            await self.drop(content_hash)
        for content_hash, (uri, stamp) in held.items():
            if content_hash not in self._served:
                try:
                    holding = await self.holdings.open(content_hash)
                    self._served[content_hash] = await asyncio.to_thread(
                        self._serve, content_hash, holding, stamp)
                except Exception as exc:  # noqa: BLE001 - one model must not stop the rest
                    log.warning("cannot seed %s to peers: %s", uri, exc,
                                extra={"event": "seed_failed", "uri": uri})
        registered = tuple(sorted(self._served))
        if self._meta is None or registered != self._meta_of:
            # Only when what is registered changed: the metadata carries the registered
            # regions' keys, and making it while a transfer runs stalls that transfer
            # (0.1-0.2 s a call measured here; every tick, a reader's fill took 40% longer).
            self._meta = encode_metadata(await asyncio.to_thread(self.agent.metadata))
            self._meta_of = registered
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.peer_agent(self.name), self._meta, px=self.ttl_ms)
        for content_hash, served in self._served.items():
            pipe.set(self.keys.seed(content_hash, self.name), served.seed.to_json(),
                     px=self.ttl_ms)
            pipe.sadd(self.keys.seeds(content_hash), self.name)
        await pipe.execute()
        return len(self._served)

    def _serve(self, content_hash: str, holding: Holding, stamp: object) -> _Served:
        from warmpool.loading.checksums import range_sums
        from warmpool.loading.nixl_agent import Region
        from warmpool.loading.peers import layout_digest

        size = holding.layout.total_bytes
        unit = self.settings.peers.range_bytes
        try:
            sums = range_sums(holding.tensor, size, unit)
            handle = self.agent.register(holding.tensor)
        except BaseException:
            holding.close()
            raise
        region = Region(holding.tensor.data_ptr(), size, holding.device_id, holding.kind)
        seed = Seed(self.name, self.agent.name, content_hash, size,
                    layout_digest(holding.layout), region.to_json(), unit, sums,
                    device="cpu" if holding.kind == "DRAM" else f"cuda:{holding.device_id}")
        log.info("seeding %s to peers (%d bytes, %d ranges)", holding.uri, size,
                 len(sums), extra={"event": "seeding", "uri": holding.uri})
        return _Served(stamp, holding, handle, seed)

    async def drop(self, content_hash: str) -> None:
        """Stop serving ``content_hash``: withdrawn from Redis, then deregistered; only
        then may its memory go (a worker calls this before it frees a buffer)."""
        served = self._served.pop(content_hash, None)
        if served is None:
            return
        with contextlib.suppress(Exception):
            await self.redis.delete(self.keys.seed(content_hash, self.name))
            await self.redis.srem(self.keys.seeds(content_hash), self.name)
        # Deregistered first: a read that arrives after this fails at the reader; the
        # memory goes only once no transfer can reach it.
        await asyncio.to_thread(self.agent.deregister, served.handle)
        served.holding.close()
        log.info("no longer seeding %s", served.holding.uri,
                 extra={"event": "seed_dropped", "uri": served.holding.uri})

    # --- leases for readers -----------------------------------------------------------------
    async def answer(self, timeout_s: float = 1.0) -> None:
        """Answer the asks that arrive within ``timeout_s``, then let go of the leases
        whose readers are done or gone."""
        popped = await self.redis.blpop([self.keys.peer_asks(self.name)],
                                        timeout=timeout_s)
        if popped is not None:
            await self._answer_one(popped[1])
        for ask_id in list(self._leases):
            if not await self.redis.exists(self.keys.peer_reading(ask_id)):
                self._leases.pop(ask_id)()

    async def _answer_one(self, raw: bytes | str) -> None:
        try:
            ask = json.loads(raw)
            ask_id, content_hash = ask["id"], ask["content_hash"]
            if not (isinstance(ask_id, str) and _ASK_ID.fullmatch(ask_id)
                    and isinstance(content_hash, str) and _HASH.fullmatch(content_hash)):
                raise ValueError("an ask has an id and a content hash")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a malformed peer ask: %s", exc,
                        extra={"event": "bad_peer_ask"})
            return
        reader = str(ask.get("reader", ""))[:253]
        why = ""
        if content_hash not in self._served:
            why = "not seeded here"
        elif ask_id in self._leases:
            why = "an ask of that id is already held"
        elif len(self._leases) >= MAX_LEASES:
            why = "busy"
        else:
            release = await self.holdings.lease(content_hash, f"peer:{reader}")
            if release is None:
                why = "evicted"
            else:
                self._leases[ask_id] = release
        grant = self.keys.peer_grant(ask_id)
        await self.redis.rpush(grant, json.dumps({"ok": not why, "why": why or None}))
        await self.redis.expire(grant, 30)

    @property
    def leases(self) -> int:
        return len(self._leases)

    @property
    def models(self) -> int:
        return len(self._served)

    async def close(self) -> None:
        """Stop seeding: leases go, seeds are withdrawn, memory is deregistered."""
        for release in self._leases.values():
            release()
        self._leases.clear()
        for content_hash in list(self._served):
            with contextlib.suppress(Exception):
                await self.drop(content_hash)
        with contextlib.suppress(Exception):
            await self.redis.delete(self.keys.peer_agent(self.name))


async def seed_forever(seeder: Seeder, stopping: asyncio.Event, tick: float = 1.0) -> None:
    """Publish the seeds every ``tick`` and answer asks in between, until ``stopping``;
    an error is logged and retried, never the end of the process that seeds."""
    while not stopping.is_set():
        try:
            await seeder.publish()
            deadline = asyncio.get_running_loop().time() + tick
            while asyncio.get_running_loop().time() < deadline and not stopping.is_set():
                await seeder.answer(timeout_s=0.2)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - seeding must not stop the node
            log.warning("seeding to peers failed: %s; trying again", exc,
                        extra={"event": "seed_failed"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 5.0)
