"""The registry in Redis: cluster-wide, so every node and dashboard reads one truth.

Each entry is a hash at ``p:entry:<hash>:<node>:<device>`` holding the whole entry as
JSON plus a few plain fields (state, uri, device, node, updated_at) that tools such as
``redis-cli`` can read without parsing, and a stamp of every write (``written_at``,
``writer``). Two index sets — every entry, and each node's — spare ``status`` a SCAN.

The :class:`~warmpool.pool.registry.base.Registry` interface names entries ``<hash>@<device>``
on *this* node (the pool's view); :meth:`RedisRegistry.list_cluster` reads every node's.

A Redis without persistence that restarts comes back empty. The registry remembers what
it last wrote for its own node, and :meth:`RedisRegistry.resync` writes that back, so a
node's warm models reappear without being streamed again.
"""

from __future__ import annotations

import builtins  # the class's own ``list`` method shadows the type in its body
import json
import os
import time
from collections.abc import Iterable
from dataclasses import replace

from redis.asyncio import Redis

from warmpool.contract.keys import RedisKeys
from warmpool.pool.registry.base import PoolEntry, Registry, parse_entry


class RedisRegistry(Registry):
    def __init__(self, redis: Redis, keys: RedisKeys = RedisKeys(), node: str | None = None,
                 *, owns_client: bool = False) -> None:
        self.redis = redis
        self.keys = keys
        self.node = node or os.uname().nodename
        self.writer = f"{self.node}:{os.getpid()}"
        self._owns_client = owns_client
        self._mirror: dict[str, PoolEntry] = {}  # what this node last wrote, by entry_key

    def _redis_key(self, key: str, node: str | None = None) -> str:
        content_hash, sep, device = key.partition("@")
        if not sep or not content_hash or not device:
            raise ValueError(f"bad entry key {key!r} (want <hash>@<device>)")
        return self.keys.entry(content_hash, device, node or self.node)

    # --- the Registry interface (this node) ------------------------------------------
    async def get(self, key: str) -> PoolEntry | None:
        raw = await self.redis.hget(self._redis_key(key), "entry")
        return _decode(raw)

    async def put(self, entry: PoolEntry) -> None:
        if entry.node != self.node:
            entry = _with_node(entry, self.node)
        redis_key = self._redis_key(entry.key)
        fields = {
            "entry": json.dumps(entry.to_json(), separators=(",", ":")),
            "state": entry.state.value, "uri": entry.uri, "device": entry.device,
            "node": entry.node, "content_hash": entry.content_hash,
            "updated_at": repr(entry.updated_at),
            "written_at": repr(time.time()), "writer": self.writer,
        }
        # One key at a time, no MULTI: under Redis Cluster these keys live in different
        # slots. A reader that sees the index before the hash skips the missing entry.
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(redis_key, mapping=fields)  # type: ignore[arg-type]  # invariant key type
        pipe.sadd(self.keys.entries_index, redis_key)
        pipe.sadd(self.keys.node_entries(self.node), redis_key)
        await pipe.execute()
        self._mirror[entry.key] = entry

    async def delete(self, key: str) -> None:
        redis_key = self._redis_key(key)
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(redis_key)
        pipe.srem(self.keys.entries_index, redis_key)
        pipe.srem(self.keys.node_entries(self.node), redis_key)
        await pipe.execute()
        self._mirror.pop(key, None)

    async def list(self) -> list[PoolEntry]:
        """This node's entries."""
        index = self.keys.node_entries(self.node)
        return await self._read(index, await self.redis.smembers(index))

    # --- cluster-wide -----------------------------------------------------------------
    async def list_cluster(self) -> builtins.list[PoolEntry]:
        """Every node's entries."""
        index = self.keys.entries_index
        return await self._read(index, await self.redis.smembers(index))

    async def resync(self) -> int:
        """Write back this node's entries that Redis lost (it restarted empty, or was
        flushed); returns how many were restored."""
        restored = 0
        for key, entry in list(self._mirror.items()):
            if not await self.redis.exists(self._redis_key(key)):
                await self.put(entry)
                restored += 1
        return restored

    async def close(self) -> None:
        if self._owns_client:
            await self.redis.aclose()

    async def _read(self, index: str, members: Iterable[bytes | str]) -> builtins.list[PoolEntry]:
        names = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
        if not names:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hget(name, "entry")
        raws = await pipe.execute()
        entries, stale = [], []
        for name, raw in zip(names, raws, strict=True):
            if raw is None:
                stale.append(name)
            elif (entry := _decode(raw, name)) is not None:  # a bad one is logged, skipped
                entries.append(entry)
        if stale:  # deleted (or lost) between the index read and the hash read
            await self.redis.srem(index, *stale)
        return entries


def _decode(raw: bytes | str | None, name: str = "") -> PoolEntry | None:
    if raw is None:
        return None
    return parse_entry(raw, name or "in Redis")


def _with_node(entry: PoolEntry, node: str) -> PoolEntry:
    return replace(entry, node=node)
