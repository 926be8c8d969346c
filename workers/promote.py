"""Promotion: a model already warm on the host tier is copied to a device buffer, with
no storage read.

The worker maps the host segment read-only and, for a GPU, page-locks that mapping
(``cudaHostRegister`` with the read-only flag) so the upload runs at full PCIe speed
instead of through pageable staging (docs/findings.md has the figures). The registration is
the worker's, not each serving process's: that is the point of doing it here, and the
worker keeps it (:class:`PinnedSegments`) so only the first promotion pays for it.

Layouts need not match: a rank of a sharded group holds a subset, so slots are copied by
tensor name (one copy per tensor), and a layout identical to the host's is copied whole
in one transfer.
"""

from __future__ import annotations

import logging
import mmap
import threading
from dataclasses import dataclass

import torch

from warmpool.errors import StreamError
from warmpool.pool.host import SHM_DIR, HostResident, map_readonly, map_resident
from warmpool.pool.layout import Layout
from warmpool.pool.layout_index import LayoutIndex
from warmpool.workers.devices import pin_host_memory, unpin_host_memory

log = logging.getLogger(__name__)


@dataclass
class _Pinned:
    mapping: mmap.mmap
    source: torch.Tensor
    pinned: bool


class PinnedSegments:
    """The host segments this worker holds mapped and page-locked.

    Locking 16 GB costs over a second (``cudaHostRegister``); doing it once per segment
    and keeping it makes every later promotion of that model run at PCIe speed. A
    segment whose name is gone (evicted from the host tier) is released before the next
    promotion, so the worker never keeps an evicted model's memory alive for long.
    """

    def __init__(self) -> None:
        self._held: dict[str, _Pinned] = {}
        self._lock = threading.Lock()

    def get(self, host: HostResident, pin: bool) -> torch.Tensor:
        if host.arena is not None:
            # Its chunks are the next model's once it is evicted: mapped for this copy
            # only (the caller holds a lease), never kept. Page-locking the arena once,
            # whole, is the GPU path's next step (docs/findings.md).
            return map_resident(host)[1]
        with self._lock:
            self.release_stale()
            held = self._held.get(host.segment)
            if held is None:
                mapping, source = map_readonly(host.segment, host.layout.total_bytes)
                pinned = pin and pin_host_memory(source.data_ptr(), source.numel())
                held = self._held[host.segment] = _Pinned(mapping, source, pinned)
            return held.source

    def sync(self, residents: list[HostResident], pin: bool) -> None:
        """Hold every host-warm model (page-locked when ``pin``), release vanished ones.

        A GPU worker runs this in the background so that the first promotion of a model
        warmed on the host tier already finds it locked.
        """
        with self._lock:
            self.release_stale()
        for resident in residents:
            if resident.arena is None:
                self.get(resident, pin)

    def held(self) -> list[str]:
        return sorted(self._held)

    def is_pinned(self, segment: str) -> bool:
        held = self._held.get(segment)
        return bool(held and held.pinned)

    def release_stale(self) -> None:
        for name in [n for n in self._held if not (SHM_DIR / n).exists()]:
            self._release(name)

    def release_all(self) -> None:
        with self._lock:
            for name in list(self._held):
                self._release(name)

    def _release(self, name: str) -> None:
        held = self._held.pop(name)
        if held.pinned:
            unpin_host_memory(held.source.data_ptr())
        # the mapping itself goes when the last view of it does (never unmap under one)


PINNED = PinnedSegments()


def promote(host: HostResident, layout: Layout, target: torch.Tensor,
            segments: PinnedSegments = PINNED) -> None:
    """Copy ``host``'s segment into ``target`` (laid out by ``layout``); blocking."""
    source = segments.get(host, pin=target.is_cuda)
    pinned = segments.is_pinned(host.segment)
    copy_by_layout(source, host.layout, target, layout, non_blocking=pinned)
    if target.is_cuda:
        torch.cuda.synchronize(target.device)


def _signature(layout: Layout | LayoutIndex) -> list[tuple[object, ...]]:
    return [(s.name, s.dtype, s.shape, s.offset, s.nbytes) for s in layout.slots]


def copy_by_layout(source: torch.Tensor, src_layout: Layout | LayoutIndex, target: torch.Tensor,
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
