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
import contextlib
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from warmpool.config import Settings
from warmpool.errors import WarmpoolError, WorkerError
from warmpool.pool.registry.base import PoolEntry, entry_key
from warmpool.pool.registry.files import FileRegistry
from warmpool.pool.registry.redis import RedisRegistry

NO_WORKERS = "no GPU workers on this node"
T = TypeVar("T")


class WorkerBridge:
    def __init__(self, settings: Settings, registry: RedisRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.local = FileRegistry(settings.runtime_dir)  # where workers record their entries

    async def load(self, uri: str, content_hash: str, *, device: str, tp: int, sharding: str,
                   loader: str) -> tuple[dict[str, Any], PoolEntry | None]:
        """Have the workers of ``device`` (and the next ``tp - 1``) load ``uri``; their
        summary and the mirrored entry. Raises :class:`WarmpoolError` on failure."""
        summary = await in_daemon_thread(_load, uri, device, tp, sharding, loader,
                                         self.settings)
        return summary, await self.mirror(entry_key(content_hash, device))

    async def evict(self, entry: PoolEntry, *, force: bool = False) -> None:
        """Free ``entry``'s buffer (``LeaseHeldError`` while a serving process holds it)."""
        await in_daemon_thread(_evict, entry.content_hash, entry.device, self.settings, force)
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


def _load(uri: str, device: str, tp: int, sharding: str, loader: str,
          settings: Settings) -> dict[str, Any]:
    # The import (torch, CUDA bindings) takes seconds: it happens here, in the thread.
    try:
        from warmpool.workers.client import group_devices, prefetch_via_workers, worker_for
    except ImportError:
        raise WorkerError(NO_WORKERS) from None
    try:
        for each in group_devices(device, tp):
            worker_for(settings, each)
    except WarmpoolError as exc:
        raise WorkerError(f"{NO_WORKERS} for {device}: {exc}") from None
    summary: dict[str, Any] = prefetch_via_workers(uri, device=device, tp=tp,
                                                   sharding=sharding, loader=loader,
                                                   settings=settings)
    return summary


def _evict(content_hash: str, device: str, settings: Settings, force: bool) -> None:
    try:
        from warmpool.workers.client import evict_via_workers
    except ImportError:
        raise WorkerError(NO_WORKERS) from None
    evict_via_workers(content_hash, device=device, settings=settings, force=force)


async def in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a daemon thread of its own, awaited.

    A worker call blocks on a socket for as long as a load takes; in the default
    executor it would keep the process from exiting (the executor joins its threads at
    shutdown). Cancelling abandons the thread, which the worker's answer (or the
    process's exit) ends.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if future.done():
            return  # the caller was cancelled meanwhile
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name=f"warmpool {fn.__name__}", daemon=True).start()
    return await future
