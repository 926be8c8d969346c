"""The node's pool: entries and their states, capacity, and eviction.

It joins three pieces that each do one job: the registry (states, the source of truth
for ``status``), the host tier (segments and the records attach reads) and the leases.
Capacity is enforced when a prefetch *reserves* its bytes, before any byte is streamed,
by the policy of :mod:`warmpool.pool.eviction`: least-recently-attached entries without
leases or pins are evicted to make room, or the prefetch fails at once with the free and
needed bytes — never half-way through.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import replace

from warmpool.config import Settings, private_dir
from warmpool.errors import LeaseHeldError, NotWarmError, WarmpoolError
from warmpool.locks import async_file_lock, try_lock
from warmpool.pool.arena import chunks_for
from warmpool.pool.eviction import (
    choose_victims,
    entry_candidate,
    inherits_pin,
    layouts_of,
    superseded,
)
from warmpool.pool.host import ArenaSegment, HostTier, WritableSegment
from warmpool.pool.leases import Leases
from warmpool.pool.refs import ModelRef
from warmpool.pool.registry.base import PoolEntry, Registry, State
from warmpool.pool.registry.files import FileRegistry

HOST_DEVICE = "cpu"

log = logging.getLogger(__name__)


class Pool:
    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self.settings = settings
        self.runtime_dir = private_dir(settings.runtime_dir)
        self.registry = registry or FileRegistry(self.runtime_dir)
        self.host = HostTier(self.runtime_dir, settings.host_arena_chunk
                             if settings.host_arena else None)
        self.leases = Leases(self.runtime_dir)
        self._pool_lock = self.host.locks / "pool.lock"

    # --- reading -------------------------------------------------------------------
    async def entries(self) -> list[PoolEntry]:
        """Every entry, with live lease counts and last-attached times filled in."""
        out = []
        for entry in await self.registry.list():
            last = self.leases.last_attached(entry.key)
            # Host leases are lock files here; a worker reports its own (connections).
            leases = (self.leases.count(entry.key) if entry.device == HOST_DEVICE
                      else entry.leases)
            out.append(replace(entry, leases=leases,
                               last_attached_at=max(filter(None, (last, entry.last_attached_at)),
                                                    default=None)))
        return out

    async def find(self, ref: str, device: str = HOST_DEVICE,
                   states: tuple[State, ...] = (State.WARM,)) -> PoolEntry | None:
        """The newest entry on ``device`` in one of ``states`` that ``ref`` names
        (:class:`~warmpool.pool.refs.ModelRef`)."""
        wanted = ModelRef.parse(ref)
        matches = [e for e in await self.entries()
                   if e.device == device and e.state in states
                   and any(wanted.matches(uri, e.content_hash) for uri in e.uris)]
        return max(matches, key=lambda e: e.updated_at, default=None)

    async def in_use(self) -> set[str]:
        """Content hashes the pool uses — warm or being filled, or leased on any device —
        whose metadata the cache must keep."""
        used = {e.content_hash for e in await self.entries()
                if e.state == State.WARM or e.state.active or e.leases}
        return used | self.leases.held_hashes()

    # --- capacity ------------------------------------------------------------------
    async def warm_host_entry(self, key: str) -> PoolEntry | None:
        """The entry ``key`` if it is warm and its segment is really there."""
        entry = await self.registry.get(key)
        if entry is None or entry.state != State.WARM:
            return None
        return entry if self.host.resident(entry.content_hash) is not None else None

    async def fail(self, entry: PoolEntry, segment: WritableSegment | ArenaSegment | None,
                   exc: BaseException) -> PoolEntry:
        """A fill that raised: its partial segment goes, and the entry says why, so that
        nothing half-loaded is ever published or left behind."""
        if segment is not None:
            self.host.discard(segment)
        stopped = (KeyboardInterrupt, SystemExit, asyncio.CancelledError)
        reason = "interrupted" if isinstance(exc, stopped) else (
            str(exc) if isinstance(exc, WarmpoolError) else f"{type(exc).__name__}: {exc}")
        return await self.registry.transition(entry, State.FAILED, error=reason)

    def footprint(self, nbytes: int) -> int:
        """The host memory ``nbytes`` of a model take: whole chunks in the arena."""
        if not self.settings.host_arena:
            return nbytes
        return chunks_for(nbytes, self.settings.host_arena_chunk) * self.settings.host_arena_chunk

    def host_capacity(self) -> int:
        if self.settings.host_capacity is not None:
            return self.settings.host_capacity
        total, _ = self.host.shm_bytes()
        return int(total * 0.8)

    async def reserve(self, entry: PoolEntry, nbytes: int) -> PoolEntry:
        """Record ``entry`` as streaming ``nbytes``, evicting what must go to make room.

        Room is the smaller of what the capacity leaves and what the shared-memory
        filesystem will really give (other users of /dev/shm, and fills that reserved
        bytes they have not allocated yet, take from it too)."""
        async with async_file_lock(self._pool_lock):
            entries = [e for e in await self.entries()
                       if e.device == entry.device and e.key != entry.key]
            used = sum(self.footprint(e.bytes) for e in entries if e.state.holds_memory)
            _, shm_free = self.host.shm_bytes()
            unallocated = sum(max(0, self.footprint(e.bytes)
                                  - self.host.allocated(e.content_hash))
                              for e in entries if e.state == State.STREAMING)
            if self.settings.host_arena and self.host.has_arena():
                # free chunks still faulted are room /dev/shm no longer shows as free
                arena = self.host.arena.status()
                shm_free += arena.faulted if arena is not None else 0
            room = min(self.host_capacity() - used, shm_free - unallocated)
            candidates = [replace(c, nbytes=self.footprint(c.nbytes))
                          for c in map(entry_candidate, entries)]
            victims = choose_victims(candidates, self.footprint(nbytes), room,
                                     who=entry.uri, device=entry.device)
            for victim in victims:
                await self._evict_one(victim, force=False, reason="capacity")
            return await self.registry.transition(entry, State.STREAMING, bytes=nbytes)

    # --- eviction ------------------------------------------------------------------
    async def evict(self, ref: str, device: str = HOST_DEVICE, force: bool = False) -> PoolEntry:
        """Evict ``ref``: by hash, the bytes; by URI, that name — the bytes go with the
        last name, and stay resident while another URI still names them."""
        entry = await self.find(ref, device, states=(State.WARM, State.FAILED, State.LOST))
        if entry is None:
            raise NotWarmError(f"nothing to evict: {ref} is not in the pool on {device}")
        wanted = ModelRef.parse(ref)
        if not wanted.is_hash:
            renamed = await self.drop_name(entry, wanted.text)
            if renamed is not None:
                return renamed
        evicted = await self._evict_one(entry, force=force, reason="requested")
        await self._evict_layouts_of(entry, force=force)
        return evicted

    async def _evict_layouts_of(self, checkpoint: PoolEntry, *, force: bool) -> None:
        """Evict the engine layouts of ``checkpoint`` (gone or superseded); a leased one
        stays until its leases end, logged (a controller retires it then)."""
        for layout in layouts_of(await self.entries(), checkpoint):
            try:
                await self._evict_one(layout, force=force, reason="checkpoint evicted")
            except LeaseHeldError:
                log.info("engine layout %s of %s is leased: it goes when its leases end",
                         layout.uri, checkpoint.content_hash[:12],
                         extra={"event": "layout_leased", "uri": layout.uri})

    # --- names ---------------------------------------------------------------------
    async def add_name(self, entry: PoolEntry, uri: str) -> PoolEntry:
        """Let ``uri`` name ``entry``'s bytes too: identical files under two URIs are one
        content hash, resident once, and attachable (and listed) under either."""
        if uri in entry.uris:
            return entry
        async with async_file_lock(self.host.lock_path(entry.key)):
            fresh = await self.registry.get(entry.key) or entry
            if uri in fresh.uris or fresh.state != State.WARM:
                return fresh
            return await self._rename(fresh, [*fresh.uris, uri])

    async def drop_name(self, entry: PoolEntry, uri: str) -> PoolEntry | None:
        """Stop naming ``entry``'s bytes ``uri`` while another URI still names them;
        None when ``uri`` is its only name (then evicting it frees the bytes)."""
        if uri not in entry.uris or len(entry.uris) == 1:
            return None
        async with async_file_lock(self.host.lock_path(entry.key)):
            fresh = await self.registry.get(entry.key) or entry
            names = [n for n in fresh.uris if n != uri]
            if not names or uri not in fresh.uris:
                return None
            return await self._rename(fresh, names)

    async def _rename(self, entry: PoolEntry, names: list[str]) -> PoolEntry:
        if entry.device == HOST_DEVICE:
            self.host.rename(entry.content_hash, names[0], names[1:])
        renamed = replace(entry, uri=names[0], aliases=names[1:])
        await self.registry.put(renamed)
        return renamed

    async def _evict_one(self, entry: PoolEntry, *, force: bool, reason: str) -> PoolEntry:
        # The entry lock keeps a new attach from taking a lease between our check and
        # the unlink (attach takes the same lock, shared, while it takes its lease).
        async with async_file_lock(self.host.lock_path(entry.key)):
            holders = self.leases.count(entry.key)
            if holders and not force:
                raise LeaseHeldError(
                    f"{entry.uri} on {entry.device} has {holders} live lease(s); "
                    "detach them first or evict with --force")
            self.host.remove(entry.content_hash)
            self.leases.forget(entry.key)
            evicted = await self.registry.transition(entry, State.EVICTED, error=None,
                                                     leases=0)
        if self.settings.host_arena_keep is not None and self.host.has_arena():
            self.host.arena.trim(self.settings.host_arena_keep)
        if entry.engine is not None:
            await self._sweep_compile_caches()
        return evicted

    async def _sweep_compile_caches(self) -> None:
        """A compile cache goes with the last engine layout of its model and engine, on
        any device (a GPU engine's layouts live in its worker's buffer)."""
        from warmpool.compile.store import CompileCaches

        warm = [e.engine for e in await self.entries()
                if e.engine is not None and (e.state.active or e.state == State.WARM)]
        for cache in CompileCaches(self.settings).sweep(warm):
            log.info("compile cache %s removed with its model's last engine layout",
                     cache.key.label(), extra={"event": "compile_cache_removed",
                                               "reason": "evicted"})

    async def retire_older(self, current: PoolEntry, uri: str | None = None) -> list[PoolEntry]:
        """Evict the versions ``current`` supersedes as ``uri`` (default: its URI) —
        :func:`superseded`: a re-upload, or a regenerated directory, must not keep the
        old bytes resident. A pin moves to
        ``current``; a leased old version loses its pin and stays until it is free (then
        capacity eviction takes it)."""
        uri = uri or current.uri
        old = superseded(await self.entries(), current, uri)
        if inherits_pin(old) and not current.pinned:
            await self.registry.put(replace(current, pinned=True))
        retired = []
        for entry in old:
            if await self.drop_name(entry, uri) is not None:
                continue  # another URI still names those bytes: they stay, for it
            if entry.pinned:
                entry = replace(entry, pinned=False)
                await self.registry.put(entry)
            if entry.leases:
                continue
            try:
                retired.append(await self._evict_one(entry, force=False, reason="superseded"))
            except LeaseHeldError:
                continue  # attached between the listing and the lock: keep it
            await self._evict_layouts_of(entry, force=False)
        return retired

    async def forget_history(self, older_than_s: float) -> list[PoolEntry]:
        """Drop evicted, failed and lost entries not updated for ``older_than_s``: they
        are history for ``status --history``, and kept forever they would make every
        listing (and the registry) grow with every model this node ever warmed."""
        cutoff = time.time() - older_than_s
        gone = [e for e in await self.registry.list()
                if e.state in (State.EVICTED, State.FAILED, State.LOST)
                and e.updated_at < cutoff]
        for entry in gone:
            await self.registry.delete(entry.key)
        return gone

    # --- recovery ------------------------------------------------------------------
    async def adopt_residents(self) -> list[PoolEntry]:
        """Register published host segments that the registry does not know: a registry
        that lost its data (a Redis restarted empty, or a new one) would otherwise leave
        warm, attachable models that nobody can see, evict or count against capacity."""
        adopted = []
        for resident in self.host.residents():
            if await self.registry.get(resident.key) is not None:
                continue
            entry = PoolEntry(uri=resident.uri, aliases=list(resident.aliases),
                              content_hash=resident.content_hash,
                              device=HOST_DEVICE, node=self.settings.node,
                              bytes=resident.layout.total_bytes,
                              tensors=len(resident.layout), transport="shm",
                              created_at=resident.created_at, history=[],
                              engine=resident.engine)
            adopted.append(await self.registry.transition(entry, State.WARM))
        return adopted

    async def reclaim(self, *, vanished: bool = True) -> list[str]:
        """Clean up after crashed processes: orphaned segments, and entries that claim to
        be streaming (or, with ``vanished``, warm) while their segment is gone."""
        removed = self.host.reclaim()
        for entry in await self.registry.list():
            if entry.device != HOST_DEVICE:
                continue
            if entry.state.active or (vanished and entry.state == State.WARM
                                      and self.host.resident(entry.content_hash) is None):
                await self._settle(entry, vanished)
        return removed

    async def _settle(self, seen: PoolEntry, vanished: bool) -> None:
        """Mark a dead fill failed, or a vanished segment lost — under the entry's lock,
        and only as the registry says *now*. The listing is a snapshot: an evict holds
        the lock while it removes the segment and writes ``evicted``, a fill while it
        streams and writes ``warm``, and neither outcome may be overwritten by what the
        snapshot saw (a deploy's prefetch once marked a model lost that an evict beside
        it had just evicted)."""
        fd = try_lock(self.host.lock_path(seen.key))
        if fd is None:
            return  # a fill or an evict is at work on it: nothing died, nothing vanished
        try:
            entry = await self.registry.get(seen.key)
            if entry is None:
                return
            if entry.state.active:
                await self.registry.transition(
                    entry, State.FAILED, error="interrupted: the prefetching process died")
            elif (vanished and entry.state == State.WARM
                  and self.host.resident(entry.content_hash) is None):
                await self.registry.transition(entry, State.LOST,
                                               error="segment vanished (host rebooted?)")
        finally:
            os.close(fd)

