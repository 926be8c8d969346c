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
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from warmpool.errors import StreamError
from warmpool.pool.arena import Arena, ArenaPlace, open_arena
from warmpool.pool.host import SHM_DIR, HostResident, map_readonly
from warmpool.pool.layout import Layout
from warmpool.pool.layout_index import LayoutIndex
from warmpool.pool.leases import Lease
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


class PinnedArena:
    """The host arena, mapped whole and read-only, page-locked once.

    Models in the arena come and go in chunks that stay where they are, so the worker
    locks the arena's pages once (``cudaHostRegister`` of the whole file) and every later
    promotion, of any model, copies from locked memory: no per-model locking in the
    timed path. It is mapped again (and locked again) only when the arena has grown past
    what is held. What a model's chunks hold is read under the promotion's lease only.
    """

    def __init__(self) -> None:
        self._held: tuple[str, int, mmap.mmap, torch.Tensor, bool] | None = None
        self._lock = threading.Lock()
        self._marker: Lease | None = None

    def get(self, place: ArenaPlace, pin: bool,
            runtime_dir: Path | None = None) -> tuple[torch.Tensor, bool]:
        """The whole arena as a flat uint8 tensor, and whether it is page-locked. A lock
        taken is announced under ``runtime_dir`` (``warmpool status`` shows it), for as
        long as this process holds it."""
        need = (max(place.chunks) + 1) * place.chunk_bytes
        with self._lock:
            held = self._held
            if held is None or held[0] != place.file or held[1] < need:
                self._release()
                fd = open_arena(place)
                try:
                    size = os.fstat(fd).st_size
                    mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
                finally:
                    os.close(fd)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # read-only: intended
                    whole = torch.frombuffer(mapping, dtype=torch.uint8)
                pinned = pin and pin_host_memory(whole.data_ptr(), size)
                held = self._held = (place.file, size, mapping, whole, pinned)
                if pinned and runtime_dir is not None:
                    self._marker = Arena.announce_locked(runtime_dir, size)
            return held[3], held[4]

    def release(self) -> None:
        with self._lock:
            self._release()

    def _release(self) -> None:
        if self._held is not None and self._held[4]:
            unpin_host_memory(self._held[3].data_ptr())
        if self._marker is not None:
            self._marker.release()
            self._marker = None
        self._held = None  # the mapping goes with the last view of it


PINNED = PinnedSegments()
ARENA = PinnedArena()


def promote(host: HostResident, layout: Layout, target: torch.Tensor,
            segments: PinnedSegments = PINNED, runtime_dir: Path | None = None) -> None:
    """Copy ``host``'s segment into ``target`` (laid out by ``layout``); blocking. A
    model in the host arena is read from the arena's locked mapping, run of chunks by run
    of chunks (the caller holds a lease on it for the copy)."""
    if host.arena is not None:
        source, locked = ARENA.get(host.arena, pin=target.is_cuda, runtime_dir=runtime_dir)
    else:
        source = segments.get(host, pin=target.is_cuda)
        locked = segments.is_pinned(host.segment)
    copy_by_layout(source, host.layout, target, layout, non_blocking=locked,
                   place=host.arena)
    if target.is_cuda:
        torch.cuda.synchronize(target.device)


def _signature(layout: Layout | LayoutIndex) -> list[tuple[object, ...]]:
    return [(s.name, s.dtype, s.shape, s.offset, s.nbytes) for s in layout.slots]


def copy_by_layout(source: torch.Tensor, src_layout: Layout | LayoutIndex, target: torch.Tensor,
                   dst_layout: Layout, *, non_blocking: bool = False,
                   place: ArenaPlace | None = None) -> None:
    """Copy the model in ``source`` into ``target``: whole when the layouts match, else
    tensor by tensor by name. With ``place``, ``source`` is the whole arena and the
    model's buffer is ``place``'s chunks of it: one copy per run of consecutive chunks."""
    def copy(dst: int, src: int, nbytes: int) -> None:
        for at, rel, n in _ranges(place, src, nbytes):
            target[dst + rel:dst + rel + n].copy_(source[at:at + n], non_blocking=non_blocking)

    if _signature(src_layout) == _signature(dst_layout):
        copy(0, 0, dst_layout.total_bytes)
        return
    by_name = {s.name: s for s in src_layout.slots}
    for slot in dst_layout.slots:
        src = by_name.get(slot.name)
        if src is None or (src.dtype, src.shape, src.nbytes) != (slot.dtype, slot.shape,
                                                                    slot.nbytes):
            raise StreamError(f"host copy of {src_layout.content_hash[:12]} lacks tensor "
                              f"{slot.name!r} as {slot.dtype} {slot.shape}")
        copy(slot.offset, src.offset, src.nbytes)


def _ranges(place: ArenaPlace | None, offset: int, nbytes: int) -> list[tuple[int, int, int]]:
    """(offset in the source, offset within the range, length) covering ``nbytes`` of
    the model's buffer from ``offset``: the range itself in a segment of its own, one
    piece per run of consecutive chunks in the arena."""
    if place is None:
        return [(offset, 0, nbytes)]
    c, chunks, out, done = place.chunk_bytes, place.chunks, [], 0
    while done < nbytes:
        index, within = divmod(offset + done, c)
        last = index
        while last + 1 < len(chunks) and chunks[last + 1] == chunks[last] + 1:
            last += 1
        n = min((last - index + 1) * c - within, nbytes - done)
        out.append((chunks[index] * c + within, done, n))
        done += n
    return out
