"""Prefetch: one model from its URI to a warm entry on the host tier.

The order is the data flow: list → content hash → metadata cache → layout
→ reserve room → stream into a partial segment → publish → ``warm``. Every step records
its state in the registry; any failure (storage error, corrupt file, Ctrl-C) discards
the partial segment and records ``failed`` with the error, so nothing half-loaded stays.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from warmpool.config import Settings
from warmpool.errors import ObjectChangedError
from warmpool.loading.loaders import Loader
from warmpool.loading.peers import fill_with_peers, first_fill, peer_source
from warmpool.loading.streaming import fill_buffer
from warmpool.locks import async_file_lock
from warmpool.model.cache import MetadataCache, default_cache
from warmpool.model.uri import ModelURI, parse_uri
from warmpool.pool.entries import HOST_DEVICE, Pool
from warmpool.pool.layout import plan_layout
from warmpool.pool.registry.base import PoolEntry, State, entry_key
from warmpool.storage import open_store
from warmpool.tiers.base import ProgressFactory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefetchResult:
    entry: PoolEntry
    seconds: float
    loader: str  # "runai", "native", "pread", or "" when it was already warm
    already_warm: bool
    asked: str = ""  # the URI the caller named (an entry may answer to several)

    @property
    def uri(self) -> str:
        return self.asked or self.entry.uri

    @property
    def aliases(self) -> list[str]:
        """The other URIs that name the same bytes (identical files uploaded twice)."""
        return [u for u in self.entry.uris if u != self.uri]

    def to_json(self) -> dict[str, Any]:
        e = self.entry
        return {"uri": self.uri, "aliases": self.aliases, "content_hash": e.content_hash,
                "state": e.state.value,
                "device": e.device, "bytes": e.bytes, "tensors": e.tensors,
                "seconds": round(self.seconds, 4), "loader": self.loader,
                "already_warm": self.already_warm,
                "gb_per_s": round(e.bytes / self.seconds / 1e9, 3) if self.seconds else None}


async def prefetch(uri: str | ModelURI, *, settings: Settings, pool: Pool | None = None,
                   loader: Loader = "auto", progress: ProgressFactory | None = None,
                   cache: MetadataCache | None = None) -> PrefetchResult:
    """Make ``uri`` warm on the host tier; return at once if it already is.

    A model re-uploaded while it streams fails that fill (nothing of it is published) and
    is started over once, from a new listing: the bytes of the new version.
    """
    started = time.perf_counter()
    model = uri if isinstance(uri, ModelURI) else parse_uri(uri)
    pool = pool or Pool(settings)
    cache = cache or default_cache(settings)
    try:
        return await _prefetch_once(model, settings, pool, loader, progress, cache, started)
    except ObjectChangedError as exc:
        log.info("%s changed while it was streaming (%s); starting over", model, exc,
                 extra={"event": "source_changed", "uri": str(model)})
        return await _prefetch_once(model, settings, pool, loader, progress, cache, started)


async def _prefetch_once(model: ModelURI, settings: Settings, pool: Pool, loader: Loader,
                         progress: ProgressFactory | None, cache: MetadataCache,
                         started: float) -> PrefetchResult:
    await pool.reclaim()
    async with open_store(model) as store:
        listing = await cache.inspect(model, store)
        key = entry_key(listing.content_hash, HOST_DEVICE)
        warm = await pool.warm_host_entry(key)
        if warm is None:
            # One filler per entry across processes; a second prefetch waits here and
            # then finds the entry warm.
            async with async_file_lock(pool.host.lock_path(key)):
                warm = await pool.warm_host_entry(key)
                if warm is None:
                    entry = await _fill(pool, cache, model, store, listing.content_hash,
                                        loader, progress, settings)
    if warm is not None:
        if str(model) in warm.uris:
            return PrefetchResult(warm, time.perf_counter() - started, "", True, str(model))
        # The same bytes under another URI (identical files uploaded twice): resident
        # once, and this URI names them too.
        entry = await pool.add_name(warm, str(model))
        log.info("%s is warm already: same content as %s (%s)", model, warm.uri,
                 warm.content_hash[:12], extra={"event": "same_content", "uri": str(model),
                                                "as": warm.uri})
    try:
        await pool.retire_older(entry, str(model))
    except Exception as exc:  # noqa: BLE001 - the model IS warm; retiring can wait
        # A registry that is out of reach a moment (Redis failing over) must not turn a
        # warm model into a failed prefetch; capacity eviction or the next prefetch of
        # this URI retires the old versions.
        log.warning("%s is warm, but retiring its older versions failed: %s", model, exc,
                    extra={"event": "retire_failed", "uri": str(model)})
    if warm is not None:
        return PrefetchResult(entry, time.perf_counter() - started, "", True, str(model))
    try:
        await cache.bound(await pool.in_use(), settings)
    except Exception as exc:  # noqa: BLE001 - the model IS warm; the next prefetch prunes
        log.warning("pruning the metadata cache failed: %s", exc,
                    extra={"event": "prune_failed"})
    return PrefetchResult(entry, time.perf_counter() - started, entry.loader, False,
                          str(model))



async def _fill(pool: Pool, cache: MetadataCache, model: ModelURI, store: Any,
                content_hash: str, loader: Loader, progress: ProgressFactory | None,
                settings: Settings) -> PoolEntry:
    previous = await pool.registry.get(entry_key(content_hash, HOST_DEVICE))
    entry = PoolEntry(uri=str(model), content_hash=content_hash, device=HOST_DEVICE,
                      node=settings.node, transport="shm",
                      created_at=time.time(), history=[],
                      pinned=previous.pinned if previous else False)
    entry = await pool.registry.transition(entry, State.PENDING)
    segment = None
    try:
        entry = await pool.registry.transition(entry, State.FETCHING_METADATA)
        cached = await cache.fetch(model, store)
        if cached.content_hash != content_hash:  # its headers are another version's
            raise ObjectChangedError(f"{model} changed since it was listed", key="")
        layout = plan_layout(content_hash, cached.headers.items())
        entry = await pool.reserve(entry, layout.total_bytes)
        segment = pool.host.create(content_hash, layout.total_bytes)
        on_chunk = progress(layout.total_bytes) if progress else None
        peers = peer_source(settings, pool)

        async def from_store(files: list[str] | None) -> str:
            return await fill_buffer(model, layout, segment.buffer,
                                     options=settings.streamer, loader=loader,
                                     progress=on_chunk, store=store, pins=cached.objects,
                                     files=files)

        async with first_fill(peers, content_hash) as seeds:
            filled = await fill_with_peers(peers, seeds, layout, segment.buffer, from_store,
                                           on_chunk)
        segment.close()
        pool.host.publish(segment, str(model), layout, entry.created_at)
        return await pool.registry.transition(
            entry, State.WARM, error=None, loader=filled.loader, tensors=len(layout.slots),
            peer_bytes=filled.peer_bytes)
    except BaseException as exc:
        await pool.fail(entry, segment, exc)
        raise
