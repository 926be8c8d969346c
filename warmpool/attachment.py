"""What serving processes call: ``attach(uri_or_hash, device)`` → zero-copy tensors.

The tier of ``device`` does the work (:func:`warmpool.tiers.base.tier_for`): on the host
tier, views of a shared-memory segment (:mod:`warmpool.tiers.host` says how it stays
cheap); on a worker's device, CUDA IPC, VMM or shared-memory views from the worker. A
lease is held from the call until ``close()`` or the process's death, and keeps the
entry from being evicted.
"""

from __future__ import annotations

from warmpool.config import Settings
from warmpool.pool.attached import AttachedModel
from warmpool.pool.entries import HOST_DEVICE
from warmpool.tiers.base import tier_for

__all__ = ["AttachedModel", "attach"]


def attach(ref: str, device: str = HOST_DEVICE, *, settings: Settings | None = None,
           holder: str = "") -> AttachedModel:
    """Attach to the warm model ``ref`` (a URI or a content hash) on ``device``."""
    return tier_for(device, settings or Settings.load()).attach(ref, holder)
