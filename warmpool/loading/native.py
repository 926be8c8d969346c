"""Our own async clients as a loader: concurrent ranged reads into the buffer.

For what runai-model-streamer cannot stream (``az://``, which it does not support
against Azurite in 0.17) and for anything forced with ``loader="native"``.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable

import torch

from warmpool.errors import StorageError
from warmpool.loading.pread import Job, plan_jobs
from warmpool.pool.layout import Layout
from warmpool.pool.views import byte_view
from warmpool.storage.base import Store
from warmpool.threads import to_thread_joined

Progress = Callable[[int], None]

#: Native ranged reads: file ranges of at most this many bytes, this many in flight. From
#: a sweep of ranged GETs (bench/s3_rate.py, docs/performance.md): parts of 16 MiB beat 4
#: and 64 MiB at every concurrency, and 8 in flight was best, with 4-32 close behind.
NATIVE_PIECE = 16 << 20
NATIVE_CONCURRENCY = 8


async def stream_native(store: Store, layout: Layout, target: torch.Tensor, *,
                        files: list[str] | None = None, progress: Progress,
                        concurrency: int | None = None, piece_bytes: int | None = None) -> None:
    """Fill ``target`` with concurrent ranged reads through our own async client.

    Reads are contiguous file ranges of up to ``piece_bytes`` that may span several
    tensors (a model's many small tensors — norms, biases — would otherwise cost one
    request each); each range is scattered into its slots with one copy.
    """
    gate = asyncio.Semaphore(concurrency or NATIVE_CONCURRENCY)
    direct = _direct_view(target)

    async def read(job: Job) -> None:
        if direct is not None:
            async with gate:
                got = await store.read_scattered(
                    job.file, job.start, job.nbytes, [(p.dst, p.nbytes) for p in job.pieces],
                    direct)
            if got != job.nbytes:
                raise _short(store, job, got)
            progress(job.nbytes)
            return
        async with gate:
            data = await store.read_range(job.file, job.start, job.nbytes)
        if len(data) != job.nbytes:
            raise _short(store, job, len(data))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only bytes: only read
            source = torch.frombuffer(data, dtype=torch.uint8) if data else None
        if source is not None:
            # In a thread: the first write to a fresh segment page-faults every page, and
            # torch's copy releases the GIL, so the faults overlap the event loop's reads
            # instead of stalling them.
            # Joined even when cancelled: a failed sibling read cancels this one, and the
            # caller then frees ``target``.
            await to_thread_joined(_scatter, target, job, source)
        progress(job.nbytes)

    jobs = plan_jobs(layout, files, chunk=piece_bytes or NATIVE_PIECE)
    tasks = [asyncio.ensure_future(read(j)) for j in jobs]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _short(store: Store, job: Job, got: int) -> StorageError:
    """The object is shorter than its header said."""
    return StorageError(f"{store.uri.child(job.file)}: object ended at {job.start + got}, "
                        f"{job.nbytes - got} bytes short", key=job.file)


def _direct_view(target: torch.Tensor) -> memoryview | None:
    """A host buffer's bytes, which a read fills straight from the socket's chunks (one
    copy, on the event loop: nothing writes into the buffer once the stream's tasks are
    done); None for a device buffer, which takes a host bytes object and one copy to the
    device in a thread."""
    return byte_view(target) if target.device.type == "cpu" and target.numel() else None


def _scatter(target: torch.Tensor, job: Job, source: torch.Tensor) -> None:
    """Copy one downloaded file range into the slots it covers."""
    at = 0
    for p in job.pieces:
        target[p.dst:p.dst + p.nbytes].copy_(source[at:at + p.nbytes])
        at += p.nbytes
