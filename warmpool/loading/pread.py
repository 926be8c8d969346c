"""The ``pread`` loader: many threads of plain ``preadv`` for local files.

runai-model-streamer reads local files from the page cache several times slower than
8-16 threads of plain ``preadv`` (its default O_DIRECT strategy even re-reads from disk;
docs/findings.md has the measurements). This loader does exactly that and nothing else:

* into a host target (a shared-memory segment) each read scatters straight into the
  tensors' slots with one ``preadv`` of several buffers: no staging copy at all;
* into a CUDA target each thread reads into its own page-locked staging buffer and
  uploads it with a non-blocking copy on its own stream, so disk, memory and PCIe
  overlap. Staging buffers are allocated once per process and reused (page-locking
  them is slow).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from warmpool.errors import StreamError
from warmpool.pool.layout import Layout
from warmpool.pool.views import byte_view
from warmpool.storage.local import open_regular

Progress = Callable[[int], None]
CHUNK = 32 << 20
#: The most buffers one ``preadv`` takes; more is EINVAL (Linux: 1,024). Checkpoints of
#: many small tensors (MoE: ~90,000) put one buffer per tensor into a read.
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
THREADS = min(16, max(4, (os.cpu_count() or 4)))


@dataclass(frozen=True)
class Piece:
    dst: int  # offset in the target buffer
    src: int  # offset in the file
    nbytes: int


@dataclass(frozen=True)
class Job:
    file: str
    start: int  # first file offset read
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


def plan_jobs(layout: Layout, files: list[str] | None = None, chunk: int = CHUNK,
              max_pieces: int = IOV_MAX) -> list[Job]:
    """Cut every file's tensors into reads of at most ``chunk`` contiguous file bytes
    and at most ``max_pieces`` buffers (what one ``preadv`` accepts)."""
    jobs: list[Job] = []
    for file in layout.files:
        if files is not None and file not in files:
            continue
        pieces: list[Piece] = []
        size = 0
        for slot in sorted(layout.slots_of(file), key=lambda s: s.file_offset):
            done = 0
            while done < slot.nbytes:
                src = slot.file_offset + done
                contiguous = pieces and pieces[-1].src + pieces[-1].nbytes == src
                if pieces and (size >= chunk or not contiguous or len(pieces) >= max_pieces):
                    jobs.append(Job(file, pieces[0].src, tuple(pieces)))
                    pieces, size = [], 0
                n = min(slot.nbytes - done, chunk - size)
                pieces.append(Piece(slot.offset + done, src, n))
                size += n
                done += n
        if pieces:
            jobs.append(Job(file, pieces[0].src, tuple(pieces)))
    return jobs


class _Staging:
    """Page-locked buffers (one per thread) and a CUDA stream each, kept per device."""

    _cache: dict[tuple[int, int, int], "_Staging"] = {}
    _lock = threading.Lock()

    def __init__(self, device: torch.device, count: int, size: int) -> None:
        self.free: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
        self.streams = [torch.cuda.Stream(device) for _ in range(count)]
        for i in range(count):
            self.free.put(i)

    @classmethod
    def get(cls, device: torch.device, count: int, size: int) -> _Staging:
        key = (device.index or 0, count, size)
        with cls._lock:
            if key not in cls._cache:
                cls._cache[key] = cls(device, count, size)
            return cls._cache[key]


def _read_exact(fd: int, views: list[memoryview], offset: int, path: Path) -> None:
    total = sum(len(v) for v in views)
    done = 0
    while done < total:
        n = os.preadv(fd, views, offset + done)
        if n == 0:
            raise StreamError(f"{path}: file ended at {offset + done}, {total - done} bytes "
                              "short (truncated or changed since its header was read)")
        done += n
        if done < total:  # rare: advance the buffer list past what arrived
            views = _advance(views, n)


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out


def stream_pread(root: Path, layout: Layout, target: torch.Tensor, *,
                 files: list[str] | None = None, progress: Progress,
                 stop: threading.Event | None = None, threads: int = THREADS) -> None:
    """Fill ``target`` from the local files under ``root`` (blocking)."""
    jobs = plan_jobs(layout, files)
    fds: dict[str, int] = {}
    try:
        for file in {j.file for j in jobs}:
            fds[file] = open_regular(root / file, file)  # a FIFO would block for ever
        if target.is_cuda:
            staging = _Staging.get(target.device, threads, CHUNK)
            run = lambda job: _to_device(job, fds, root, target, staging)  # noqa: E731
        else:
            view = byte_view(target)
            run = lambda job: _to_host(job, fds, root, view)  # noqa: E731

        reporting = threading.Lock()  # callers' progress callbacks need not be thread-safe

        def guarded(job: Job) -> None:
            if stop is not None and stop.is_set():
                raise StreamError(f"{root}: streaming cancelled")
            run(job)
            with reporting:
                progress(job.nbytes)

        with ThreadPoolExecutor(threads, thread_name_prefix="warmpool-pread") as pool:
            for future in [pool.submit(guarded, j) for j in jobs]:
                future.result()
    except FileNotFoundError as exc:
        raise StreamError(f"{exc.filename}: file vanished while streaming") from None
    finally:
        for fd in fds.values():
            os.close(fd)


def _to_host(job: Job, fds: dict[str, int], root: Path, view: memoryview) -> None:
    _read_exact(fds[job.file], [view[p.dst : p.dst + p.nbytes] for p in job.pieces],
                job.start, root / job.file)


def _to_device(job: Job, fds: dict[str, int], root: Path, target: torch.Tensor,
               staging: _Staging) -> None:
    k = staging.free.get()
    try:
        buf = staging.buffers[k]
        stream = staging.streams[k]
        stream.synchronize()  # the previous upload from this buffer is done
        _read_exact(fds[job.file], [byte_view(buf)[: job.nbytes]], job.start,
                    root / job.file)
        with torch.cuda.stream(stream):
            at = 0
            for p in job.pieces:
                target[p.dst : p.dst + p.nbytes].copy_(buf[at : at + p.nbytes], non_blocking=True)
                at += p.nbytes
        stream.synchronize()
    finally:
        staging.free.put(k)
