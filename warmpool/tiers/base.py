"""The interface of a tier, its results, and the one selector from a device string."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from warmpool.config import Settings
from warmpool.pool.entries import HOST_DEVICE
from warmpool.pool.registry.base import PoolEntry

if TYPE_CHECKING:
    import torch

    from warmpool.model.cache import MetadataCache
    from warmpool.model.uri import ModelURI
    from warmpool.pool.attached import AttachedModel
    from warmpool.pool.engine_key import EngineKey, ExportResult
    from warmpool.pool.entries import Pool

#: Called with a fill's total bytes once they are known; returns the per-chunk callback.
ProgressFactory = Callable[[int], Callable[[int], None]]


@dataclass(frozen=True)
class Loaded:
    """What a load achieved, on either tier: the one value from the pool to its caller."""

    uri: str
    device: str
    state: str
    entry: PoolEntry | None
    seconds: float
    loader: str = ""
    already_warm: bool = False
    error: str | None = None
    aliases: tuple[str, ...] = ()  # other URIs of the same bytes (uploaded twice)
    devices: tuple[str, ...] = ()  # a worker group's devices, the first one first


class Tier(Protocol):
    """A place models are held: the host tier, or one device of the node's workers."""

    device: str
    via: str  # who does the work: "process" (the host tier) or "workers"

    async def load(self, uri: ModelURI, *, tp: int = 1, sharding: str = "replicated",
                   loader: str = "auto", progress: ProgressFactory | None = None,
                   cache: MetadataCache | None = None,
                   content_hash: str | None = None) -> Loaded:
        """Make ``uri`` warm here (fill from its source), or find it warm.
        ``content_hash``: the caller's listing of it, when it has one."""
        ...

    async def evict(self, ref: str, *, force: bool = False) -> PoolEntry:
        """Free ``ref`` (a URI or content hash); refused while leased unless ``force``."""
        ...

    def attach(self, ref: str, holder: str = "") -> AttachedModel:
        """Zero-copy views of the warm model ``ref``, with a lease."""
        ...

    async def export(self, key: EngineKey, tensors: Iterable[tuple[str, torch.Tensor]], *,
                     checkpoint_uri: str) -> ExportResult:
        """Write an engine's processed parameters as the engine layout of ``key``."""
        ...

    def attach_layout(self, key: EngineKey, holder: str = "") -> tuple[
            AttachedModel | None, str]:
        """The engine layout of ``key`` as views with a lease, or None and why not."""
        ...

    def engine_keys(self) -> list[dict[str, Any]]:
        """The keys of the engine layouts warm here (to say what a miss missed)."""
        ...


def is_host(device: str) -> bool:
    """Whether ``device`` names the host tier (else a worker's device: cuda:N, cpu:N)."""
    return device == HOST_DEVICE


def tier_for(device: str, settings: Settings, *, pool: Pool | None = None,
             tp: int = 1) -> Tier:
    """The tier that holds models on ``device``: the one place that branches on it.

    ``pool`` is the caller's view of the registry (a controller's Redis one): the host
    tier fills through it, and a worker's entries are mirrored into it. A group
    (``tp`` > 1) is always the workers': the host tier holds one copy of a model."""
    if is_host(device) and tp == 1:
        from warmpool.tiers.host import HostTierOps

        return HostTierOps(settings, pool)
    from warmpool.tiers.workers import WorkerTierOps

    return WorkerTierOps(device, settings, pool)
