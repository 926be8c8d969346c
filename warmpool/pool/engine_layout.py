"""Engine-layout entries: a model's parameters exactly as one engine holds them.

An engine repacks a checkpoint when it loads it (fused q/k/v, one tensor-parallel shard
per rank, padded vocabularies, quantisation repacking), so views of the checkpoint's
tensors cannot become its parameters. An engine-layout entry holds the *processed*
parameters instead, written once by an engine that loaded the model the slow way
(:func:`export`), and attached by later engines with the same key without a copy
(:func:`attach_engine_layout`).

The key names everything that changes those bytes: the checkpoint's content hash, the
engine and its version, dtype, quantisation, tensor-parallel size and rank. The entry's
own content hash is derived from the checkpoint hash and the key, so a different engine
version or configuration looks up a different entry and never attaches wrong bytes: it
misses, and the caller falls back to its copy path.

Otherwise it is an ordinary pool entry — on the host tier one segment, a layout record and
a registry entry; on a worker's device (``cuda:N``, ``cpu:N``) one buffer of the worker,
written device to device (:mod:`warmpool.workers.export_client`) — so eviction, leases,
capacity, ``status`` and the controller treat it like any other. Its URI is the
checkpoint's URI with the key as a fragment: no model URI carries a fragment, so it never
answers to the checkpoint's name (an attach or evict by URI, the controller's bookkeeping)
and is named by its content hash instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from collections.abc import Coroutine, Iterable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, TypeVar

from warmpool.config import Settings
from warmpool.errors import NotWarmError, WarmpoolError, WorkerError
from warmpool.locks import async_file_lock
from warmpool.pool.entries import HOST_DEVICE, Pool
from warmpool.pool.host import HostTier
from warmpool.pool.layout import ALIGNMENT, Layout, Slot, align_up
from warmpool.pool.registry.base import PoolEntry, State, entry_key

if TYPE_CHECKING:
    import torch

    from warmpool.pool.attachment import AttachedModel

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What an engine-layout slot records as its source file: the bytes came from an engine.
#: Not empty: the layout index stores file names joined, and one empty name reads back
#: as no file at all.
ENGINE_SOURCE = "engine"


@dataclass(frozen=True)
class EngineKey:
    """Everything that decides the bytes of an engine's processed parameters."""

    checkpoint: str  # content hash of the checkpoint the engine loaded
    engine: str  # "vllm", "sglang"
    engine_version: str
    dtype: str  # the engine's model dtype, e.g. "bfloat16"
    quantization: str = "none"
    tp_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if not self.checkpoint or not self.engine or not self.engine_version:
            raise ValueError("an engine key needs a checkpoint hash, an engine and its version")
        if self.tp_size < 1 or not 0 <= self.rank < self.tp_size:
            raise ValueError(f"rank {self.rank} is outside tensor-parallel size {self.tp_size}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def dumps(self) -> str:
        """The stable text form: sorted keys, no spaces; the content hash is taken of it."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineKey:
        known = {f.name for f in fields(cls)}
        missing = known - set(data)
        if missing:
            raise ValueError(f"engine key lacks {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def content_hash(self) -> str:
        """The entry's own content hash: of the checkpoint's hash and this key."""
        digest = hashlib.sha256()
        digest.update(b"warmpool-engine-layout\0")
        digest.update(self.checkpoint.encode())
        digest.update(b"\0")
        digest.update(self.dumps().encode())
        return digest.hexdigest()

    def label(self) -> str:
        """Short human form, used as the entry URI's fragment and in log lines."""
        return (f"{self.engine}-{self.engine_version},{self.dtype},quant={self.quantization},"
                f"tp={self.tp_size},rank={self.rank}")

    def differences(self, other: EngineKey) -> dict[str, tuple[Any, Any]]:
        """field → (ours, theirs) for each field that differs."""
        mine, theirs = self.to_json(), other.to_json()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}


def layout_uri(checkpoint_uri: str, key: EngineKey) -> str:
    return f"{checkpoint_uri}#{key.label()}"


def plan_engine_layout(key: EngineKey,
                       tensors: Iterable[tuple[str, torch.Tensor]]) -> Layout:
    """One aligned buffer for the named tensors, in the order given."""
    from warmpool.pool.views import TORCH_DTYPES

    names = {dtype: name for name, dtype in TORCH_DTYPES.items()}
    slots: list[Slot] = []
    seen: set[str] = set()
    offset = 0
    for name, tensor in tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} given twice")
        seen.add(name)
        if tensor.dtype not in names:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which a layout "
                            "cannot record")
        if tensor.is_sparse or tensor.device.type == "meta":
            raise TypeError(f"tensor {name!r} is not a dense tensor with data")
        offset = align_up(offset, ALIGNMENT)
        nbytes = tensor.numel() * tensor.element_size()
        slots.append(Slot(name, names[tensor.dtype], tuple(tensor.shape), offset, nbytes,
                          ENGINE_SOURCE, 0))
        offset += nbytes
    return Layout(key.content_hash, align_up(max(offset, 1), ALIGNMENT), tuple(slots),
                  ALIGNMENT)


@dataclass(frozen=True)
class ExportResult:
    entry: PoolEntry
    seconds: float
    already_warm: bool


def is_host(device: str) -> bool:
    """Whether ``device`` names the host tier (else a worker's device: cuda:N, cpu:N)."""
    return device == HOST_DEVICE


async def export(key: EngineKey, tensors: Iterable[tuple[str, torch.Tensor]], *,
                 checkpoint_uri: str, settings: Settings,
                 pool: Pool | None = None, device: str = HOST_DEVICE) -> ExportResult:
    """Write ``tensors`` (an engine's processed parameters) as the engine-layout entry for
    ``key`` on ``device``: a new host segment for the host tier (``cpu``), or a buffer of
    the device's worker (``cuda:N``, ``cpu:N``); return at once if it is already warm.

    Like a prefetch: capacity is reserved before any byte is written (evicting what must
    go, or failing with :class:`CapacityError`), the segment is filled under a partial
    name and published only when complete; any failure discards it and records the entry
    ``failed``. Tensors may live on any device; each is copied once, bit for bit.
    """
    if not is_host(device):
        from warmpool.workers.export_client import export_to_worker

        items = list(tensors)
        return await asyncio.to_thread(export_to_worker, key, items,
                                       checkpoint_uri=checkpoint_uri, device=device,
                                       settings=settings)
    started = time.perf_counter()
    pool = pool or Pool(settings)
    items = list(tensors)
    await pool.reclaim()
    ekey = entry_key(key.content_hash, HOST_DEVICE)
    warm = await pool.warm_host_entry(ekey)
    if warm is not None:
        return ExportResult(warm, time.perf_counter() - started, True)
    async with async_file_lock(pool.host.lock_path(ekey)):
        warm = await pool.warm_host_entry(ekey)
        if warm is not None:
            return ExportResult(warm, time.perf_counter() - started, True)
        entry = await _fill(pool, key, items, checkpoint_uri, settings)
    try:
        await pool.retire_older(entry)
    except Exception as exc:  # noqa: BLE001 - the layout IS warm; retiring can wait
        log.warning("engine layout %s is warm, but retiring older ones failed: %s",
                    entry.uri, exc, extra={"event": "retire_failed", "uri": entry.uri})
    return ExportResult(entry, time.perf_counter() - started, False)



async def _fill(pool: Pool, key: EngineKey, items: list[tuple[str, torch.Tensor]],
                checkpoint_uri: str, settings: Settings) -> PoolEntry:
    from warmpool.pool.views import tensor_views

    uri = layout_uri(checkpoint_uri, key)
    previous = await pool.registry.get(entry_key(key.content_hash, HOST_DEVICE))
    entry = PoolEntry(uri=uri, content_hash=key.content_hash, device=HOST_DEVICE,
                      node=settings.node, transport="shm", created_at=time.time(),
                      history=[], pinned=previous.pinned if previous else False,
                      engine=key.to_json())
    entry = await pool.registry.transition(entry, State.PENDING)
    segment = None
    try:
        layout = plan_engine_layout(key, items)
        entry = await pool.reserve(entry, layout.total_bytes)
        segment = pool.host.create(key.content_hash, layout.total_bytes)
        views = tensor_views(segment.buffer, layout)
        for name, tensor in items:
            views[name].copy_(tensor.detach())
        del views
        segment.close()
        pool.host.publish(segment, uri, layout, entry.created_at, engine=key.to_json())
        return await pool.registry.transition(entry, State.WARM, error=None,
                                              loader=f"export:{key.engine}",
                                              tensors=len(layout.slots))
    except BaseException as exc:
        await pool.fail(entry, segment, exc)
        raise


def export_sync(key: EngineKey, tensors: Iterable[tuple[str, torch.Tensor]], *,
                checkpoint_uri: str, settings: Settings,
                device: str = HOST_DEVICE) -> ExportResult:
    """:func:`export` for an engine's synchronous loader (which may run inside an event
    loop of its own: then the export runs on a thread with a loop of its own)."""
    if not is_host(device):  # blocking already: no event loop needed
        from warmpool.workers.export_client import export_to_worker

        return export_to_worker(key, tensors, checkpoint_uri=checkpoint_uri, device=device,
                                settings=settings)
    return _run_sync(export(key, tensors, checkpoint_uri=checkpoint_uri, settings=settings))


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name="warmpool-export")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def attach_engine_layout(key: EngineKey, settings: Settings, holder: str = "",
                         logger: logging.Logger | None = None,
                         device: str = HOST_DEVICE) -> AttachedModel | None:
    """The engine-layout entry for ``key`` on ``device`` (the host tier, or a worker's
    ``cuda:N``/``cpu:N``) as zero-copy views with a lease, or None when there is none
    (the caller falls back to its copy path). A miss is logged (on ``logger``: an engine
    passes its own, whose lines it shows) with the keys that *are* warm for the same
    checkpoint, so a configuration change that stops the zero-copy start is visible."""
    if not is_host(device):
        return _attach_from_worker(key, settings, holder, logger or log, device)
    from warmpool.pool.attachment import attach

    host = HostTier(settings.runtime_dir)
    resident = host.resident(key.content_hash)
    if resident is None or resident.engine != key.to_json():
        _log_miss(key, _host_keys(host), logger or log, HOST_DEVICE)
        return None
    try:
        return attach(key.content_hash, HOST_DEVICE, settings=settings, holder=holder)
    except NotWarmError:  # evicted between the look-up and the lease
        _log_miss(key, _host_keys(host), logger or log, HOST_DEVICE)
        return None


def _attach_from_worker(key: EngineKey, settings: Settings, holder: str,
                        logger: logging.Logger, device: str) -> AttachedModel | None:
    """Attach by content hash through the worker; the key it answers with must be ours."""
    from warmpool.pool.attachment import AttachedModel
    from warmpool.workers.gpu_attach import attach_gpu

    try:
        gpu = attach_gpu(key.content_hash, device, settings, holder=holder)
    except (NotWarmError, WorkerError) as exc:
        _log_miss(key, _worker_keys(settings, device), logger, device,
                  "" if isinstance(exc, NotWarmError) else f" ({exc})")
        return None
    if gpu.engine != key.to_json():
        gpu.close()
        _log_miss(key, _worker_keys(settings, device), logger, device,
                  f" (the worker's entry {key.content_hash[:12]} has key {gpu.engine!r})")
        return None
    return AttachedModel(gpu.uri, gpu.content_hash, device, gpu.layout, gpu.tensors,
                         gpu.transport, gpu.close)


def _host_keys(host: HostTier) -> list[dict[str, Any]]:
    return [r.engine for r in host.residents() if r.engine is not None]


def _worker_keys(settings: Settings, device: str) -> list[dict[str, Any]]:
    """The engine keys warm on ``device``'s worker, as its status tells them."""
    from warmpool.workers.client import call, worker_for

    try:
        reply = call(worker_for(settings, device), {"op": "status"}, timeout=5.0)
    except (WarmpoolError, OSError):
        return []
    return [r["engine"] for r in reply.get("residents", [])
            if isinstance(r.get("engine"), dict) and r.get("state") == "warm"]


def engine_layouts(settings: Settings, checkpoint: str | None = None) -> list[EngineKey]:
    """The keys of the engine layouts resident on the host tier (of one checkpoint)."""
    found = []
    for resident in HostTier(settings.runtime_dir).residents():
        if resident.engine is None:
            continue
        try:
            key = EngineKey.from_json(resident.engine)
        except (TypeError, ValueError):
            continue
        if checkpoint is None or key.checkpoint == checkpoint:
            found.append(key)
    return found


def _log_miss(key: EngineKey, warm: Iterable[dict[str, Any]], logger: logging.Logger,
              device: str, why: str = "") -> None:
    others = []
    for engine in warm:
        if engine.get("checkpoint") != key.checkpoint:
            continue
        try:
            other = EngineKey.from_json(engine)
        except (TypeError, ValueError):
            continue
        diff = ", ".join(f"{k} {ours!r} != {theirs!r}"
                         for k, (ours, theirs) in key.differences(other).items())
        others.append(f"{other.label()} ({diff})")
    detail = ("; warm for this checkpoint: " + "; ".join(others)) if others else (
        "; none is warm for this checkpoint")
    logger.info("no engine layout for %s (%s) on %s%s%s", key.label(), key.checkpoint[:12],
                device, why, detail,
                extra={"event": "engine_layout_miss", "engine_key": key.to_json(),
                       "device": device})
