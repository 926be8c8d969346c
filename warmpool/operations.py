"""The Python API beside ``attach``: prefetch, evict, status and metadata.

A platform's own code calls these instead of shelling out to the ``warmpool`` command,
which is formatting over them. Each call goes through this node's controller when one
runs (``redis_url`` given, ``WARMPOOL_REDIS_URL``, the config's ``redis_url``, or a
``warmpool serve`` with its embedded Redis): the controller owns the pool then, and work
done behind its back would be undone at its next reconciliation. Without one, the work
is done in this process (the host tier) or by the local GPU workers (``cuda:N``).

Each call returns one documented type whichever path served it: :class:`Prefetched`,
:class:`Evicted`, a list of :class:`~warmpool.pool.registry.base.PoolEntry`, and
:class:`~warmpool.model.cache.CachedModel`. The calls block; from async code run them
with ``await asyncio.to_thread(warmpool.prefetch, uri)``.

Imports stay inside the functions: a serving process imports :mod:`warmpool` for
``attach`` and must not pay for the controller's Redis client or a storage SDK.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from warmpool.config import Settings, parse_bytes
from warmpool.errors import ConfigError, PoolError
from warmpool.threads import run_sync

if TYPE_CHECKING:
    from pathlib import Path

    from warmpool.compile.serving import ServingStart
    from warmpool.compile.store import CompileCache
    from warmpool.controller.failures import Failing
    from warmpool.controller.fleet import ClusterModel
    from warmpool.model.cache import CachedModel
    from warmpool.pool.arena import ArenaStatus
    from warmpool.pool.registry.base import PoolEntry

#: Called with the total bytes once they are known; returns the per-chunk callback.
ProgressFactory = Callable[[int], Callable[[int], None]]
#: Evicted, failed and lost entries are kept this long for ``status(history=True)``,
#: then forgotten, so the registry does not grow with every model ever warmed.
HISTORY_KEEP_S = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Prefetched:
    """A model made warm (or found warm) on a device, or a tensor-parallel group."""

    uri: str
    content_hash: str
    node: str
    device: str  # the first device of the group
    devices: tuple[str, ...]
    bytes: int
    tensors: int
    seconds: float
    loader: str  # what streamed it: "runai", "native", "pread"; "" when already warm
    already_warm: bool
    via: str  # "controller", "workers" or "process": who did the work
    aliases: tuple[str, ...] = ()  # other URIs of the same bytes (uploaded twice)

    @property
    def gb_per_s(self) -> float | None:
        if self.already_warm or not self.seconds:
            return None
        return self.bytes / self.seconds / 1e9

    def to_json(self) -> dict[str, Any]:
        rate = self.gb_per_s
        return {"uri": self.uri, "aliases": list(self.aliases),
                "content_hash": self.content_hash, "state": "warm",
                "node": self.node, "device": self.device, "devices": list(self.devices),
                "bytes": self.bytes, "tensors": self.tensors, "seconds": round(self.seconds, 4),
                "loader": self.loader, "already_warm": self.already_warm, "via": self.via,
                "gb_per_s": None if rate is None else round(rate, 3)}


@dataclass(frozen=True)
class Evicted:
    """A model freed from a device; ``state`` is ``retiring`` when a controller waits
    for its last lease to end before freeing it."""

    uri: str
    content_hash: str
    device: str
    state: str  # "evicted" or "retiring"
    via: str

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "content_hash": self.content_hash, "device": self.device,
                "state": self.state, "via": self.via}


def prefetch(uri: str, device: str = "cpu", *, tp: int = 1, sharding: str = "replicated",
             loader: str = "auto", concurrency: int | None = None,
             memory_limit: int | str | None = None, distributed: bool | None = None,
             settings: Settings | None = None, redis_url: str | None = None,
             progress: ProgressFactory | None = None,
             timeout_s: float | None = None) -> Prefetched:
    """Make ``uri`` warm on ``device`` (``tp`` consecutive devices for a group); return
    when it is, or raise a :class:`~warmpool.errors.WarmpoolError` saying why not.

    ``loader``, ``concurrency``, ``memory_limit`` and ``distributed`` tune the streaming
    this process does; a running controller streams with its own configuration, so they
    are refused (:class:`~warmpool.errors.ConfigError`) rather than ignored there.
    """
    from warmpool.loading.loaders import check_loader

    check_loader(loader)
    tuning = {"loader": loader if loader != "auto" else None, "concurrency": concurrency,
              "memory_limit": memory_limit, "distributed": distributed}
    settings = _settings(settings, redis_url, concurrency=concurrency,
                         memory_limit=parse_bytes(memory_limit), distributed=distributed)
    controller = _controller(settings)
    if controller:
        _refuse_tuning(tuning, settings)
        return run_sync(_prefetch_controller(controller, uri, settings, device, tp, sharding,
                                         timeout_s))
    from warmpool.model.uri import parse_uri
    from warmpool.pool.entries import Pool
    from warmpool.tiers.base import tier_for

    pool = Pool(settings)
    run_sync(pool.forget_history(HISTORY_KEEP_S))
    tier = tier_for(device, settings, pool=pool, tp=tp)
    loaded = run_sync(tier.load(parse_uri(uri), tp=tp, sharding=sharding, loader=loader,
                            progress=progress))
    if loaded.entry is None or loaded.state != "warm":
        raise PoolError(f"{uri} on {device}: {loaded.error or loaded.state}")
    e = loaded.entry
    return Prefetched(uri=loaded.uri, content_hash=e.content_hash, node=e.node or settings.node,
                      device=loaded.devices[0] if loaded.devices else device,
                      devices=loaded.devices or (device,), bytes=e.bytes, tensors=e.tensors,
                      seconds=loaded.seconds, loader=loaded.loader,
                      already_warm=loaded.already_warm, via=tier.via, aliases=loaded.aliases)


def evict(ref: str, device: str = "cpu", *, force: bool = False,
          settings: Settings | None = None, redis_url: str | None = None) -> Evicted:
    """Free ``ref`` (a URI or a content-hash prefix) from ``device``.

    Refused with :class:`~warmpool.errors.LeaseHeldError` while a serving process holds
    a lease, unless ``force``; through a controller, a leased model is evicted when its
    last lease ends (``state == "retiring"``), and the controller stops wanting it warm.
    """
    settings = _settings(settings, redis_url)
    controller = _controller(settings)
    _reclaim(settings, registry=not controller)
    if controller:
        from warmpool.controller import remote

        reply = run_sync(remote.evict(controller, ref, settings=settings, device=device,
                                  force=force))
        return _evicted(reply, via="controller")
    from warmpool.tiers.base import tier_for

    tier = tier_for(device, settings)
    entry = run_sync(tier.evict(ref, force=force))
    return _evicted(entry.to_json(), via=tier.via)


def status(*, history: bool = False, settings: Settings | None = None,
           redis_url: str | None = None) -> list[PoolEntry]:
    """The pool's entries, newest first: those warm or on their way by default; with
    ``history`` also the evicted, failed and lost ones (kept for a while, then dropped).
    Through a controller: every node's entries."""
    settings = _settings(settings, redis_url)
    controller = _controller(settings)
    _reclaim(settings, registry=not controller)
    if controller:
        from warmpool.controller import remote

        entries = run_sync(remote.status(controller, settings))
    else:
        from warmpool.pool.entries import Pool

        entries = run_sync(_local_entries(Pool(settings)))
    if not history:
        entries = [e for e in entries if e.state.active or e.state.value == "warm"]
    return sorted(entries, key=lambda e: e.updated_at, reverse=True)


def cluster(*, settings: Settings | None = None,
            redis_url: str | None = None) -> list[ClusterModel]:
    """Every model across the fleet: each node's state of it, what the fleet wants of it
    (``replicas``, ``nodes: all``, a selector) and the bytes read from its store. Needs
    the controllers' Redis: a node without one is a fleet of one (`status`)."""
    settings = _settings(settings, redis_url)
    controller = _controller(settings)
    if not controller:
        raise ConfigError("status --cluster reads the fleet from the controllers' Redis: "
                          "give --redis or WARMPOOL_REDIS_URL (no controller runs here)")
    from warmpool.controller import remote

    return run_sync(remote.cluster(controller, settings))


def failing(*, settings: Settings | None = None,
            redis_url: str | None = None) -> list[Failing]:
    """Desired models of this node whose warm-ups keep failing (backing off, or given
    up until asked again; ``evict`` removes one). Only a controller keeps desired state:
    without one, none."""
    settings = _settings(settings, redis_url)
    controller = _controller(settings)
    if not controller:
        return []
    from warmpool.controller import remote

    return run_sync(remote.failing(controller, settings))


def metadata(uri: str, *, settings: Settings | None = None) -> CachedModel:
    """Fetch ``uri``'s small files (config, tokenizer) and safetensors headers into the
    local cache; ``files_dir`` of the result is the directory an engine reads its config
    and tokenizer from. Always done here: the cache is this node's directory, shared
    safely by file locks with the controller and every other process."""
    from warmpool.model.cache import default_cache
    from warmpool.model.uri import parse_uri

    settings = settings or Settings.load()
    _reclaim(settings)
    return run_sync(default_cache(settings).fetch(parse_uri(uri)))


def arena(*, settings: Settings | None = None) -> ArenaStatus | None:
    """This node's host arena (size, used, free, faulted bytes), or None when no fill has
    used one. Always this node's: the arena is its shared memory."""
    from warmpool.pool.host import HostTier

    settings = _settings(settings, None)
    host = HostTier(settings.runtime_dir, settings.host_arena_chunk)
    return host.arena.status() if host.has_arena() else None


def trim(keep: int | str = 0, *, settings: Settings | None = None) -> int:
    """Give the pages of the arena's free chunks back to the kernel, keeping ``keep``
    bytes of them faulted for the next fills; returns the bytes given back. Chunks of
    warm models, of fills in progress and of leased evictions are never touched."""
    from warmpool.pool.host import HostTier

    settings = _settings(settings, None)
    keep_bytes = parse_bytes(keep) if isinstance(keep, str) else keep
    if keep_bytes is None or keep_bytes < 0:
        raise ConfigError(f"trim: keep must be a size of 0 bytes or more, not {keep!r}")
    host = HostTier(settings.runtime_dir, settings.host_arena_chunk)
    return host.arena.trim(keep_bytes) if host.has_arena() else 0


def engine_env(uri: str, *, engine: str = "vllm", tp: int = 1, dtype: str = "auto",
               max_model_len: int | None = None, compilation: dict[str, Any] | None = None,
               python: Path | None = None, settings: Settings | None = None) -> ServingStart:
    """How a serving start of ``engine`` takes ``uri`` from this node's pool: the model
    directory, the variables (its compile cache, when an export made one for this key)
    and the engine's arguments (:mod:`warmpool.compile.serving`). The engine's versions
    are read in its own Python: ``python``, else the configured export Python, else this
    one."""
    from warmpool.compile.key import probe, probe_python
    from warmpool.compile.serving import serving_start
    from warmpool.engines import layout_engine
    from warmpool.model.uri import parse_uri

    settings = _settings(settings, None)
    setting = layout_engine(engine).python_setting
    python = python or (getattr(settings, setting) if setting else None)
    runtime = probe_python(python, engine) if python else probe(engine)
    cached = metadata(uri, settings=settings)
    return serving_start(str(parse_uri(uri)), cached.files_dir, cached.content_hash, runtime,
                         dtype=dtype, tp=tp, max_model_len=max_model_len,
                         compilation=compilation, settings=settings)


def compile_caches(*, settings: Settings | None = None) -> list[CompileCache]:
    """This node's compile caches (complete or being written), with their sizes."""
    from warmpool.compile.store import CompileCaches

    return CompileCaches(_settings(settings, None)).all()


# --- helpers -------------------------------------------------------------------------


def _settings(settings: Settings | None, redis_url: str | None, **overrides: Any) -> Settings:
    if settings is None:
        return Settings.load(redis_url=redis_url, **overrides)
    from dataclasses import replace

    if redis_url:
        settings = replace(settings, redis_url=redis_url)
    streamer = {k: v for k, v in overrides.items() if v is not None}
    if streamer:
        settings = replace(settings, streamer=replace(settings.streamer, **streamer))
    return settings


def _reclaim(settings: Settings, *, registry: bool = False) -> None:
    """Every operation cleans up after killed prefetches: their partial segments (as
    large as the model) and, where this process owns the pool's registry, their entries
    that still say ``streaming``. The entry locks say which writers are gone."""
    from warmpool.pool.entries import Pool
    from warmpool.pool.host import HostTier

    if registry:
        run_sync(Pool(settings).reclaim(vanished=False))  # a read does not judge warm entries
    else:
        HostTier(settings.runtime_dir).reclaim()


def _controller(settings: Settings) -> str | None:
    from warmpool.controller.remote import controller_url

    return controller_url(settings)


def _refuse_tuning(tuning: dict[str, Any], settings: Settings) -> None:
    given = [name for name, value in tuning.items() if value is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ConfigError(
            f"{flags}: the controller of node {settings.node} streams with its own settings "
            "and cannot take these per request; set them in its config file (streamer: "
            "section) and restart it, or prefetch in this process with WARMPOOL_REDIS_URL "
            "unset and no `warmpool serve` running")


async def _prefetch_controller(url: str, uri: str, settings: Settings, device: str, tp: int,
                               sharding: str, timeout_s: float | None) -> Prefetched:
    from warmpool.controller import remote

    reply = await remote.prefetch(url, uri, settings=settings, device=device, tp=tp,
                                  sharding=sharding, timeout_s=timeout_s)
    return _prefetched({**reply, "devices": _group(device, tp)},
                       node=settings.node, via="controller")


async def _local_entries(pool: Any) -> list[PoolEntry]:
    await pool.forget_history(HISTORY_KEEP_S)
    return list(await pool.entries())


def _group(device: str, tp: int) -> list[str]:
    kind, _, index = device.partition(":")
    if tp <= 1 or not index.isdigit():
        return [device]
    return [f"{kind}:{int(index) + rank}" for rank in range(tp)]


def _prefetched(data: dict[str, Any], *, node: str, via: str) -> Prefetched:
    return Prefetched(uri=str(data["uri"]), content_hash=str(data["content_hash"]),
                      node=str(data.get("node") or node),
                      device=str(data.get("devices", [data["device"]])[0]),
                      devices=tuple(data.get("devices") or [data["device"]]),
                      bytes=int(data["bytes"]), tensors=int(data["tensors"]),
                      seconds=float(data.get("seconds") or 0.0),
                      loader=str(data.get("loader") or ""),
                      already_warm=bool(data.get("already_warm")), via=via,
                      aliases=tuple(str(a) for a in data.get("aliases") or ()))


def _evicted(data: dict[str, Any], *, via: str) -> Evicted:
    return Evicted(uri=str(data["uri"]), content_hash=str(data.get("content_hash") or ""),
                   device=str(data["device"]), state=str(data.get("state") or "evicted"),
                   via=via)
