"""Promotion: a model already warm on the host tier is copied to a device buffer, with
no storage read.

The worker maps the host segment read-only and, for a GPU, page-locks that mapping
(``cudaHostRegister`` with the read-only flag) so the upload runs at PCIe speed — about
55 GB/s on an H100 against 8 GB/s from pageable memory (FACTS.md). The registration is
the worker's, not each serving process's: that is the point of doing it here.

Layouts need not match: a rank of a sharded group holds a subset, so slots are copied by
tensor name (one copy per tensor), and a layout identical to the host's is copied whole
in one transfer.
"""

from __future__ import annotations

import logging

import torch

from warmpool.errors import StreamError
from warmpool.layout import Layout
from warmpool.tiers.host import Resident, map_readonly
from warmpool.workers.devices import pin_host_memory, unpin_host_memory

log = logging.getLogger(__name__)


def promote(host: Resident, layout: Layout, target: torch.Tensor) -> None:
    """Copy ``host``'s segment into ``target`` (laid out by ``layout``); blocking."""
    mapping, source = map_readonly(host.segment, host.layout.total_bytes)
    pinned = False
    try:
        if target.is_cuda:
            pinned = pin_host_memory(source.data_ptr(), source.numel())
        copy_by_layout(source, host.layout, target, layout, non_blocking=pinned)
        if target.is_cuda:
            torch.cuda.synchronize(target.device)
    finally:
        if pinned:
            unpin_host_memory(source.data_ptr())
        del source
        try:
            mapping.close()
        except BufferError:
            pass  # a view survives somewhere; the mapping goes with it


def _signature(layout: Layout) -> list[tuple[object, ...]]:
    return [(s.name, s.dtype, s.shape, s.offset, s.nbytes) for s in layout.slots]


def copy_by_layout(source: torch.Tensor, src_layout: Layout, target: torch.Tensor,
                   dst_layout: Layout, *, non_blocking: bool = False) -> None:
    if _signature(src_layout) == _signature(dst_layout):
        n = dst_layout.total_bytes
        target[:n].copy_(source[:n], non_blocking=non_blocking)
        return
    by_name = {s.name: s for s in src_layout.slots}
    for slot in dst_layout.slots:
        src = by_name.get(slot.name)
        if src is None or (src.dtype, src.shape, src.nbytes) != (slot.dtype, slot.shape,
                                                                    slot.nbytes):
            raise StreamError(f"host copy of {src_layout.content_hash[:12]} lacks tensor "
                              f"{slot.name!r} as {slot.dtype} {slot.shape}")
        target[slot.offset : slot.offset + slot.nbytes].copy_(
            source[src.offset : src.offset + src.nbytes], non_blocking=non_blocking)
