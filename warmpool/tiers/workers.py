"""A worker's device behind the tier interface: ``cuda:N`` (and ``cpu:N``, the same
worker on the host's memory, which the tests and the dry GPU check use).

Workers own their devices' buffers and record their entries in the runtime directory's
file registry (the supervisor marks them lost there when a worker dies). A load, evict
or export is a call to the worker (:mod:`warmpool.workers.client`); when the caller keeps
another registry (a controller's, in Redis) the worker's entry is copied into it — the
one write path of an entry made on either tier, so placement and ``warmpool status`` see
GPU entries too. On a host without the workers package, or without a worker for the
device, a load fails at once with :data:`NO_WORKERS` in its error.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from warmpool.config import Settings
from warmpool.errors import NotWarmError, WarmpoolError, WorkerError
from warmpool.pool.attached import AttachedModel, gc_paused
from warmpool.pool.engine_key import EngineKey, ExportResult
from warmpool.pool.registry.base import PoolEntry, Registry, State, entry_key
from warmpool.pool.registry.files import FileRegistry
from warmpool.tiers.base import Loaded, ProgressFactory

if TYPE_CHECKING:
    import torch

    from warmpool.model.cache import MetadataCache
    from warmpool.model.uri import ModelURI
    from warmpool.pool.entries import Pool

NO_WORKERS = "no GPU workers on this node"
log = logging.getLogger(__name__)


class WorkerTierOps:
    """One device of the node's workers."""

    def __init__(self, device: str, settings: Settings, pool: Pool | None = None) -> None:
        self.device = device
        self.via = "workers"  # who did the work, as the Python API reports it
        self.settings = settings
        self.pool = pool
        self.local = FileRegistry(settings.runtime_dir)  # where workers record entries

    async def load(self, uri: ModelURI, *, tp: int = 1, sharding: str = "replicated",
                   loader: str = "auto", progress: ProgressFactory | None = None,
                   cache: MetadataCache | None = None,
                   content_hash: str | None = None) -> Loaded:
        """Have the workers of this device (and the next ``tp - 1``) load ``uri``. A
        failure is recorded in the caller's registry too (when its content hash is known)
        and raised."""
        try:
            client = await _client()
            try:
                for each in client.group_devices(self.device, tp):
                    client.worker_for(self.settings, each)
            except WarmpoolError as exc:
                raise WorkerError(f"{NO_WORKERS} for {self.device}: {exc}") from None
            summary = await client.load_on_workers(str(uri), device=self.device, tp=tp,
                                                   sharding=sharding, loader=loader,
                                                   settings=self.settings)
        except WarmpoolError as exc:
            if content_hash is not None:
                await self._failed(str(uri), content_hash, str(exc))
            raise
        entry = await self.mirror(entry_key(str(summary["content_hash"]), self.device))
        return Loaded(str(summary["uri"]), self.device, str(summary.get("state", "failed")),
                      entry, float(summary.get("seconds") or 0.0),
                      str(summary.get("loader") or ""), bool(summary.get("already_warm")),
                      summary.get("error"), tuple(summary.get("aliases") or ()),
                      tuple(summary.get("devices") or (self.device,)))

    async def evict(self, ref: str, *, force: bool = False) -> PoolEntry:
        client = await _client()
        data = await client.evict_on_worker(ref, device=self.device, settings=self.settings,
                                            force=force)
        entry = PoolEntry.from_json(data)
        return await self.mirror(entry.key) or entry

    def attach(self, ref: str, holder: str = "") -> AttachedModel:
        from warmpool.workers.gpu_attach import attach_gpu

        with gc_paused():
            gpu = attach_gpu(ref, self.device, self.settings, holder=holder)
        return AttachedModel(gpu.uri, gpu.content_hash, self.device, gpu.layout,
                             gpu.tensors, gpu.transport, gpu.close)

    async def export(self, key: EngineKey, tensors: Iterable[tuple[str, torch.Tensor]], *,
                     checkpoint_uri: str) -> ExportResult:
        """Device to device into the worker's buffer (the call blocks: on a thread)."""
        return await asyncio.to_thread(self.export_sync, key, tensors,
                                       checkpoint_uri=checkpoint_uri)

    def export_sync(self, key: EngineKey, tensors: Iterable[tuple[str, torch.Tensor]], *,
                    checkpoint_uri: str) -> ExportResult:
        from warmpool.workers.export_client import export_to_worker

        return export_to_worker(key, list(tensors), checkpoint_uri=checkpoint_uri,
                                device=self.device, settings=self.settings)

    def attach_layout(self, key: EngineKey, holder: str = "") -> tuple[
            AttachedModel | None, str]:
        """Attach by content hash through the worker; the key it answers with must be
        ours."""
        from warmpool.workers.gpu_attach import attach_gpu

        try:
            gpu = attach_gpu(key.content_hash, self.device, self.settings, holder=holder)
        except (NotWarmError, WorkerError) as exc:
            return None, "" if isinstance(exc, NotWarmError) else f" ({exc})"
        if gpu.engine != key.to_json():
            gpu.close()
            return None, (f" (the worker's entry {key.content_hash[:12]} has key "
                          f"{gpu.engine!r})")
        return AttachedModel(gpu.uri, gpu.content_hash, self.device, gpu.layout,
                             gpu.tensors, gpu.transport, gpu.close), ""

    def engine_keys(self) -> list[dict[str, Any]]:
        """The engine keys warm on this device's worker, as its status tells them."""
        from warmpool.workers.client import call, worker_for

        try:
            reply = call(worker_for(self.settings, self.device), {"op": "status"},
                         timeout=5.0)
        except (WarmpoolError, OSError):
            return []
        return [r["engine"] for r in reply.get("residents", [])
                if isinstance(r.get("engine"), dict) and r.get("state") == "warm"]

    async def mirror(self, key: str) -> PoolEntry | None:
        """The worker's entry ``key``, copied into the caller's registry when that is
        another one and the copy there is older (the pin, which only the controller
        sets, is kept)."""
        local = self.local.get_sync(key)
        registry = self.pool.registry if self.pool is not None else None
        if registry is None or isinstance(registry, FileRegistry):
            return local
        return await mirror_entry(local, registry, key)

    async def _failed(self, uri: str, content_hash: str, error: str) -> None:
        if self.pool is None or isinstance(self.pool.registry, FileRegistry):
            return  # the worker recorded it in the runtime directory, if it got that far
        entry = PoolEntry(uri=uri, content_hash=content_hash, device=self.device,
                          node=self.settings.node, history=[])
        await self.pool.registry.transition(entry, State.FAILED, error=error)


async def mirror_worker_entries(settings: Settings, registry: Registry) -> None:
    """Every entry the node's workers recorded, copied into ``registry`` where it is newer
    there (the controller's heartbeat: a worker that died is marked lost in the files by
    its supervisor, and the cluster must see it)."""
    from warmpool.pool.entries import HOST_DEVICE

    for entry in FileRegistry(settings.runtime_dir).list_sync():
        if entry.device != HOST_DEVICE:
            await mirror_entry(entry, registry, entry.key)


async def mirror_entry(local: PoolEntry | None, registry: Registry,
                       key: str) -> PoolEntry | None:
    known = await registry.get(key)
    if local is not None and (known is None or known.updated_at < local.updated_at):
        await registry.put(replace(local, pinned=known.pinned if known else False))
        return await registry.get(key)
    return known


async def _client() -> Any:
    """The workers' client module. Its first import (torch, CUDA bindings) takes seconds:
    on a thread, not on the caller's event loop; without the workers package, a
    :class:`WorkerError` naming what is missing."""
    try:
        return await asyncio.to_thread(importlib.import_module, "warmpool.workers.client")
    except ImportError:
        raise WorkerError(NO_WORKERS) from None
