"""The controller's side of the node's GPU workers (:mod:`warmpool.workers`).

Workers own their devices' buffers and keep their entries in the runtime directory's file
registry (the supervisor marks them lost there when a worker dies). The controller asks
them to load and evict through their client, and copies their entries into the
cluster-wide registry, so placement and ``warmpool status`` see GPU entries too. On a
host without the workers package, or without a worker for the device, a load fails at
once with :data:`NO_WORKERS` in its error.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from warmpool.config import Settings
from warmpool.errors import WarmpoolError, WorkerError
from warmpool.pool.registry.base import PoolEntry, entry_key
from warmpool.pool.registry.files import FileRegistry
from warmpool.pool.registry.redis import RedisRegistry

NO_WORKERS = "no GPU workers on this node"


class WorkerBridge:
    def __init__(self, settings: Settings, registry: RedisRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.local = FileRegistry(settings.runtime_dir)  # where workers record their entries

    async def load(self, uri: str, content_hash: str, *, device: str, tp: int, sharding: str,
                   loader: str) -> tuple[dict[str, Any], PoolEntry | None]:
        """Have the workers of ``device`` (and the next ``tp - 1``) load ``uri``; their
        summary and the mirrored entry. Raises :class:`WarmpoolError` on failure."""
        try:
            from warmpool.workers.client import group_devices, prefetch_via_workers, worker_for
        except ImportError:
            raise WorkerError(NO_WORKERS) from None
        try:
            for each in group_devices(device, tp):
                worker_for(self.settings, each)
        except WarmpoolError as exc:
            raise WorkerError(f"{NO_WORKERS} for {device}: {exc}") from None
        summary = await asyncio.to_thread(prefetch_via_workers, uri, device=device, tp=tp,
                                          sharding=sharding, loader=loader, settings=self.settings)
        return summary, await self.mirror(entry_key(content_hash, device))

    async def evict(self, entry: PoolEntry, *, force: bool = False) -> None:
        """Free ``entry``'s buffer (``LeaseHeldError`` while a serving process holds it)."""
        try:
            from warmpool.workers.client import evict_via_workers
        except ImportError:
            raise WorkerError(NO_WORKERS) from None
        await asyncio.to_thread(evict_via_workers, entry.content_hash, device=entry.device,
                                settings=self.settings, force=force)
        await self.mirror(entry.key)

    async def mirror(self, key: str) -> PoolEntry | None:
        """Copy a worker's entry into the cluster-wide registry when it is newer there
        (the pin, which only the controller sets, is kept)."""
        local = self.local.get_sync(key)
        known = await self.registry.get(key)
        if local is not None and (known is None or known.updated_at < local.updated_at):
            await self.registry.put(replace(local, pinned=known.pinned if known else False))
            return await self.registry.get(key)
        return known

    async def mirror_all(self, host_device: str = "cpu") -> None:
        for entry in self.local.list_sync():
            if entry.device != host_device:
                await self.mirror(entry.key)
