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

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from warmpool.config import Settings
from warmpool.pool.engine_key import EngineKey, ExportResult
from warmpool.pool.entries import HOST_DEVICE
from warmpool.threads import run_sync
from warmpool.tiers.base import tier_for

if TYPE_CHECKING:
    import torch

    from warmpool.pool.attached import AttachedModel
    from warmpool.pool.entries import Pool

log = logging.getLogger(__name__)


async def export(key: EngineKey, tensors: Iterable[tuple[str, torch.Tensor]], *,
                 checkpoint_uri: str, settings: Settings,
                 pool: Pool | None = None, device: str = HOST_DEVICE) -> ExportResult:
    """Write ``tensors`` (an engine's processed parameters) as the engine-layout entry for
    ``key`` on ``device``: a new host segment for the host tier (``cpu``), or a buffer of
    the device's worker (``cuda:N``, ``cpu:N``); return at once if it is already warm.
    Capacity is reserved before any byte is written, and a failure leaves nothing."""
    return await tier_for(device, settings, pool=pool).export(
        key, tensors, checkpoint_uri=checkpoint_uri)


def export_sync(key: EngineKey, tensors: Iterable[tuple[str, torch.Tensor]], *,
                checkpoint_uri: str, settings: Settings,
                device: str = HOST_DEVICE) -> ExportResult:
    """:func:`export` for an engine's synchronous loader (which may run inside an event
    loop of its own: then the export runs on a thread with a loop of its own)."""
    return run_sync(export(key, tensors, checkpoint_uri=checkpoint_uri, settings=settings,
                           device=device))


def attach_engine_layout(key: EngineKey, settings: Settings, holder: str = "",
                         logger: logging.Logger | None = None,
                         device: str = HOST_DEVICE) -> AttachedModel | None:
    """The engine-layout entry for ``key`` on ``device`` (the host tier, or a worker's
    ``cuda:N``/``cpu:N``) as zero-copy views with a lease, or None when there is none
    (the caller falls back to its copy path). A miss is logged (on ``logger``: an engine
    passes its own, whose lines it shows) with the keys that *are* warm for the same
    checkpoint, so a configuration change that stops the zero-copy start is visible."""
    tier = tier_for(device, settings)
    attached, why = tier.attach_layout(key, holder)
    if attached is None:
        _log_miss(key, tier.engine_keys(), logger or log, device, why)
    return attached


def engine_layouts(settings: Settings, checkpoint: str | None = None) -> list[EngineKey]:
    """The keys of the engine layouts resident on the host tier (of one checkpoint)."""
    found = []
    for engine in tier_for(HOST_DEVICE, settings).engine_keys():
        try:
            key = EngineKey.from_json(engine)
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
