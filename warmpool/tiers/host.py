"""The host tier behind the tier interface: models in this node's shared memory.

Loading is a prefetch (:mod:`warmpool.tiers.prefetch`); attaching maps the segment
read-only and builds views lazily; evicting and the registry are the :class:`Pool`'s;
an engine layout is a segment of its own. Nothing here imports a loader, a storage SDK or
the workers until a load asks for them: a serving process that only attaches pays for
none of them.

Attach reads one small JSON record from the private runtime directory, maps the layout
index and the model's shared-memory segment read-only (two ``mmap``s, no page of the
segment touched), checks every slot in a few vectorised operations, and builds each view
when it is first asked for: what remains per tensor is decoding its name. It never reads
the source files (they may be gone). A lease is held from the call until ``close()`` or
the process's death, and keeps the entry from being evicted.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from warmpool.config import Settings
from warmpool.errors import ConfigError, NotWarmError
from warmpool.locks import async_file_lock
from warmpool.pool.attached import AttachedModel, gc_paused
from warmpool.pool.engine_key import (
    EngineKey,
    ExportResult,
    layout_uri,
    plan_engine_layout,
    write_engine_layout,
)
from warmpool.pool.entries import HOST_DEVICE, Pool
from warmpool.pool.host import HostResident, HostTier, map_resident
from warmpool.pool.leases import Lease
from warmpool.pool.refs import ModelRef
from warmpool.pool.registry.base import PoolEntry, State, entry_key
from warmpool.tiers.base import Loaded, ProgressFactory

if TYPE_CHECKING:
    import torch

    from warmpool.model.cache import MetadataCache
    from warmpool.model.uri import ModelURI

log = logging.getLogger(__name__)


class HostTierOps:
    """The host tier (device ``cpu``), in this process."""

    device = HOST_DEVICE
    via = "process"  # who did the work, as the Python API reports it

    def __init__(self, settings: Settings, pool: Pool | None = None) -> None:
        self.settings = settings
        self._pool = pool

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            self._pool = Pool(self.settings)
        return self._pool

    async def load(self, uri: ModelURI, *, tp: int = 1, sharding: str = "replicated",
                   loader: str = "auto", progress: ProgressFactory | None = None,
                   cache: MetadataCache | None = None,
                   content_hash: str | None = None) -> Loaded:
        from warmpool.loading.loaders import check_loader
        from warmpool.tiers.prefetch import prefetch

        if tp != 1:
            raise ConfigError(f"the host tier holds one copy of a model: a group of {tp} "
                              "is loaded by workers (devices cpu:N or cuda:N)")
        result = await prefetch(uri, settings=self.settings, pool=self.pool,
                                loader=check_loader(loader), progress=progress, cache=cache)
        entry = result.entry
        return Loaded(result.uri, HOST_DEVICE, entry.state.value, entry, result.seconds,
                      result.loader, result.already_warm, entry.error,
                      tuple(result.aliases), (HOST_DEVICE,))

    async def evict(self, ref: str, *, force: bool = False) -> PoolEntry:
        return await self.pool.evict(ref, HOST_DEVICE, force=force)

    def attach(self, ref: str, holder: str = "") -> AttachedModel:
        from warmpool.pool.views import tensor_views

        host = HostTier(self.settings.runtime_dir)
        host.reclaim_partials()  # what a killed prefetch left must not hold memory for ever
        with gc_paused():
            resident = _resolve(host, ref)
            # Checked again under the entry's lock: an eviction may have won the race
            # since _resolve.
            lease = host.lease(resident, holder)
            if lease is None:
                raise not_warm(ref)
            try:
                mapping, buffer = map_resident(resident)
                tensors = tensor_views(buffer, resident.layout)
            except FileNotFoundError:  # a forced evict between the lease and the open
                lease.release()
                raise not_warm(ref) from None
            except BaseException:
                lease.release()
                raise
        return AttachedModel(_name(resident, ref), resident.content_hash, HOST_DEVICE,
                             resident.layout, tensors, "shm", _HostCloser(lease, mapping))

    async def export(self, key: EngineKey, tensors: Iterable[tuple[str, torch.Tensor]], *,
                     checkpoint_uri: str) -> ExportResult:
        """A new host segment for the engine layout of ``key``; at once if it is warm.

        Like a prefetch: capacity is reserved before any byte is written (evicting what
        must go, or failing with :class:`CapacityError`), the segment is filled under a
        partial name and published only when complete; any failure discards it and
        records the entry ``failed``. Tensors may live on any device; each is copied
        once, bit for bit."""
        started = time.perf_counter()
        pool = self.pool
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
            entry = await _fill(pool, key, items, checkpoint_uri, self.settings)
        try:
            await pool.retire_older(entry)
        except Exception as exc:  # noqa: BLE001 - the layout IS warm; retiring can wait
            log.warning("engine layout %s is warm, but retiring older ones failed: %s",
                        entry.uri, exc, extra={"event": "retire_failed", "uri": entry.uri})
        return ExportResult(entry, time.perf_counter() - started, False)

    def attach_layout(self, key: EngineKey, holder: str = "") -> tuple[
            AttachedModel | None, str]:
        resident = HostTier(self.settings.runtime_dir).resident(key.content_hash)
        if resident is None or resident.engine != key.to_json():
            return None, ""
        try:
            return self.attach(key.content_hash, holder), ""
        except NotWarmError:  # evicted between the look-up and the lease
            return None, ""

    def engine_keys(self) -> list[dict[str, Any]]:
        return [r.engine for r in HostTier(self.settings.runtime_dir).residents()
                if r.engine is not None]


async def _fill(pool: Pool, key: EngineKey, items: list[tuple[str, torch.Tensor]],
                checkpoint_uri: str, settings: Settings) -> PoolEntry:

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
        write_engine_layout(segment.buffer, layout, items)
        segment.close()
        pool.host.publish(segment, uri, layout, entry.created_at, engine=key.to_json())
        return await pool.registry.transition(entry, State.WARM, error=None,
                                              loader=f"export:{key.engine}",
                                              tensors=len(layout.slots))
    except BaseException as exc:
        await pool.fail(entry, segment, exc)
        raise


class _HostCloser:
    """Ends the lease; the mapping is left to the views (unmapping under a live view
    would turn a later read into a crash), and goes when the last of them does."""

    def __init__(self, lease: Lease, mapping: mmap.mmap) -> None:
        self.lease = lease
        self.mapping = mapping

    def __call__(self) -> None:
        self.lease.release()


def _resolve(host: HostTier, ref: str) -> HostResident:
    # NotWarmError for text that names nothing; a bug (a ref that is no string) is not
    # caught here, so it surfaces as the TypeError it is rather than as "not warm".
    wanted = ModelRef.parse(ref)
    if wanted.is_hash:
        matches = host.residents(hash_prefix=wanted.text)  # parses only the matching records
    else:
        matches = [r for r in host.residents()
                   if any(wanted.matches(name, r.content_hash) for name in r.names)]
    if not matches:
        raise not_warm(ref)
    return max(matches, key=lambda r: r.created_at)


def _name(resident: HostResident, ref: str) -> str:
    """The URI the caller attached by (one of the model's names), or its first name."""
    with contextlib.suppress(NotWarmError):
        wanted = ModelRef.parse(ref)
        if not wanted.is_hash and wanted.text in resident.names:
            return wanted.text
    return resident.uri


def not_warm(ref: str, device: str = HOST_DEVICE) -> NotWarmError:
    return NotWarmError(f"{ref} is not warm on {device}: run `warmpool prefetch {ref}` "
                        f"first (and `warmpool status` to see what is warm)")
