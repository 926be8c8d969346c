"""The node's seeder: its warm host models, readable by peers over NIXL.

Runs in the controller, whose process fills the host tier and so holds the NIXL agent
(:mod:`warmpool.loading.nixl_agent`). At every pass it registers each newly warm
checkpoint (never an engine layout, a lease file or a record: only weight bytes, mapped
read-only) and publishes a seed for it (:mod:`warmpool.contract.seeds`) with a checksum
per range, computed once from the bytes it registers; a model that went is deregistered
before its mapping is dropped, so a late read fails instead of touching unmapped memory.

A reader asks for a lease before it reads (``p:peer-asks:<node>``); the seeder takes a
pool lease on its behalf and holds it while the reader's key (``p:peer-reading:<id>``)
lives, so that eviction waits for the read. A forced evict or a death does not wait:
the reader's checksums and fallback cover those.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import re
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from warmpool.config import Settings
from warmpool.contract.keys import RedisKeys
from warmpool.contract.seeds import Seed, encode_metadata
from warmpool.pool.host import HostResident, HostTier, map_resident
from warmpool.pool.leases import Lease

log = logging.getLogger(__name__)

#: Reads this node lends to at once: an ask past it is told "busy" (and reads the bucket
#: or another peer), so asks alone cannot pin every model here for ever.
MAX_LEASES = 64
_ASK_ID = re.compile(r"[A-Za-z0-9._:@-]{1,300}")
_HASH = re.compile(r"[0-9a-f]{64}")


@dataclass
class _Served:
    resident: HostResident
    mapping: mmap.mmap
    tensor: Any
    handle: Any
    seed: Seed


class Seeder:
    def __init__(self, settings: Settings, redis: Redis, keys: RedisKeys,
                 ttl_s: float) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self.node = settings.node
        self.ttl_ms = int(ttl_s * 1000)
        self.host = HostTier(settings.runtime_dir)
        self._served: dict[str, _Served] = {}  # content hash -> what is registered
        self._leases: dict[str, Lease] = {}  # ask id -> the lease held for its reader
        self._agent: Any = None
        self._meta: str | None = None  # the agent's metadata, as published
        self._meta_of: tuple[str, ...] = ()  # ... when these models were registered

    @property
    def agent(self) -> Any:
        if self._agent is None:
            from warmpool.loading.nixl_agent import peer_agent

            self._agent = peer_agent(self.settings.peers, self.node)
        return self._agent

    async def start(self) -> None:
        """Make the agent now (off the loop): a node configured for peers without NIXL, or
        whose UCX cannot start, says so when it starts rather than at its first seed."""
        await asyncio.to_thread(lambda: self.agent)

    # --- seeds ----------------------------------------------------------------------------
    async def publish(self) -> int:
        """Register what became warm, drop what went, and renew every seed; returns how
        many models this node seeds."""
        await self.start()
        residents = {r.content_hash: r for r in
                     await asyncio.to_thread(self.host.residents) if r.engine is None}
        for content_hash in [h for h, s in self._served.items()
                             if residents.get(h) is None
                             or residents[h].segment != s.resident.segment
                             or residents[h].arena != s.resident.arena]:
            await self._drop(content_hash)
        for content_hash, resident in residents.items():
            if content_hash not in self._served:
                try:
                    self._served[content_hash] = await asyncio.to_thread(self._serve,
                                                                         resident)
                except Exception as exc:  # noqa: BLE001 - one model must not stop the rest
                    log.warning("cannot seed %s to peers: %s", resident.uri, exc,
                                extra={"event": "seed_failed", "uri": resident.uri})
        registered = tuple(sorted(self._served))
        if self._meta is None or registered != self._meta_of:
            # Only when what is registered changed: the metadata carries the registered
            # regions' keys, and making it while a transfer runs stalls that transfer
            # (0.1-0.2 s a call measured here; every tick, a reader's fill took 40% longer).
            self._meta = encode_metadata(await asyncio.to_thread(self.agent.metadata))
            self._meta_of = registered
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.peer_agent(self.node), self._meta, px=self.ttl_ms)
        for content_hash, served in self._served.items():
            pipe.set(self.keys.seed(content_hash, self.node), served.seed.to_json(),
                     px=self.ttl_ms)
            pipe.sadd(self.keys.seeds(content_hash), self.node)
        await pipe.execute()
        return len(self._served)

    def _serve(self, resident: HostResident) -> _Served:
        from warmpool.loading.checksums import range_sums
        from warmpool.loading.nixl_agent import Region
        from warmpool.loading.peers import layout_digest

        mapping, tensor = map_resident(resident)
        size = resident.layout.total_bytes
        unit = self.settings.peers.range_bytes
        try:
            sums = range_sums(tensor, size, unit)
            handle = self.agent.register(tensor)
        except BaseException:
            del tensor
            with contextlib.suppress(BufferError):
                mapping.close()
            raise
        region = Region(tensor.data_ptr(), size)
        seed = Seed(self.node, self.agent.name, resident.content_hash, size,
                    layout_digest(resident.layout.to_layout()), region.to_json(), unit,
                    sums)
        log.info("seeding %s to peers (%d bytes, %d ranges)", resident.uri, size,
                 len(sums), extra={"event": "seeding", "uri": resident.uri})
        return _Served(resident, mapping, tensor, handle, seed)

    async def _drop(self, content_hash: str) -> None:
        served = self._served.pop(content_hash)
        with contextlib.suppress(Exception):
            await self.redis.delete(self.keys.seed(content_hash, self.node))
            await self.redis.srem(self.keys.seeds(content_hash), self.node)
        # Deregistered first: a read that arrives after this fails at the reader; the
        # mapping goes only once no transfer can reach it.
        await asyncio.to_thread(self.agent.deregister, served.handle)
        served.tensor = None
        with contextlib.suppress(BufferError):
            served.mapping.close()
        log.info("no longer seeding %s", served.resident.uri,
                 extra={"event": "seed_dropped", "uri": served.resident.uri})

    # --- leases for readers -----------------------------------------------------------------
    async def answer(self, timeout_s: float = 1.0) -> None:
        """Answer the asks that arrive within ``timeout_s``, then let go of the leases
        whose readers are done or gone."""
        popped = await self.redis.blpop([self.keys.peer_asks(self.node)],
                                        timeout=timeout_s)
        if popped is not None:
            await self._answer_one(popped[1])
        for ask_id in list(self._leases):
            if not await self.redis.exists(self.keys.peer_reading(ask_id)):
                self._leases.pop(ask_id).release()

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
        served = self._served.get(content_hash)
        if served is None:
            why = "not seeded here"
        elif ask_id in self._leases:
            why = "an ask of that id is already held"
        elif len(self._leases) >= MAX_LEASES:
            why = "busy"
        else:
            lease = await asyncio.to_thread(self.host.lease, served.resident,
                                            f"peer:{reader}")
            if lease is None:
                why = "evicted"
            else:
                self._leases[ask_id] = lease
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
        for lease in self._leases.values():
            lease.release()
        self._leases.clear()
        for content_hash in list(self._served):
            with contextlib.suppress(Exception):
                await self._drop(content_hash)
        with contextlib.suppress(Exception):
            await self.redis.delete(self.keys.peer_agent(self.node))
