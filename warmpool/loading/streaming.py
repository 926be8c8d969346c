"""Streaming weights into a resident buffer: runai-model-streamer, or our own clients.

Both loaders fill the same thing: a flat uint8 tensor (a host segment or a device
buffer) laid out by a :class:`~warmpool.pool.layout.Layout`. runai-model-streamer reads local
files, ``s3://`` and ``gs://``; ``az://`` has no streamer support against Azurite in
0.17 (docs/findings.md), so it — and anything forced with ``loader="native"`` — comes through
our async backend with concurrent ranged reads straight into the buffer.

Memory stays bounded: the streamer runs with ``owned=False`` and a ``memory_limit``, and
each tensor is copied into place before the iteration moves on (the streamer reuses
that memory afterwards — a retained view would silently read the next tensor's bytes).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch

from warmpool.config import StreamerOptions
from warmpool.errors import ObjectChangedError, StorageError, StreamError, WarmpoolError
from warmpool.loading.environ import STREAMER_ENVIRONMENT
from warmpool.pool.layout import Layout, Slot
from warmpool.loading.pread import Job, plan_jobs, stream_pread
from warmpool.storage import open_store
from warmpool.storage.base import ObjectInfo, Store
from warmpool.storage.local import open_regular
from warmpool.threads import to_thread_joined
from warmpool.model.uri import ModelURI
from warmpool.pool.views import TORCH_DTYPES

Progress = Callable[[int], None]
Loader = Literal["auto", "runai", "native", "pread"]
LOADERS: tuple[str, ...] = get_args(Loader)

#: Schemes runai-model-streamer 0.17 streams for us.
RUNAI_SCHEMES = ("file", "s3", "gs")
#: Native ranged reads: file ranges of at most this many bytes, this many in flight. From
#: a sweep of ranged GETs (bench/s3_rate.py, docs/performance.md): parts of 16 MiB beat 4
#: and 64 MiB at every concurrency, and 8 in flight was best, with 4-32 close behind.
NATIVE_PIECE = 16 << 20
NATIVE_CONCURRENCY = 8

log = logging.getLogger(__name__)

#: runai-model-streamer 0.17 opens ONE object-storage backend per process and keeps it
#: until exit ("Object storage backend will be closed on process exit"): after an
#: s3:// stream, a gs:// request goes to the S3 client and fails with "File access
#: error" (and the reverse). We remember which one this process opened.
_runai_object_scheme: str | None = None


def choose_loader(uri: ModelURI, loader: Loader = "auto", *,
                  group: bool = False) -> Literal["runai", "native", "pread"]:
    """The loader for ``uri``. ``auto``: threads of ``preadv`` for local files, which
    were faster than runai-model-streamer on every machine we measured (H100, 16 GB:
    17 GB/s against 5 into a GPU, 4.0 s against 4.6 s into shared memory; the 2-core VM,
    2 GB into shared memory: 1.0-1.8 s against 1.3-2.0 s); runai-model-streamer for
    object stores, and for a distributed ``group``, where it splits the reads between
    ranks; our own async client where runai cannot stream."""
    if loader == "native":
        return "native"
    if loader == "auto" and uri.is_local and not group:
        return "pread"
    if loader == "pread":
        if not uri.is_local:
            raise StreamError(f"{uri}: the pread loader reads local files only")
        return "pread"
    conflict = (uri.scheme != "file" and _runai_object_scheme not in (None, uri.scheme))
    if uri.scheme in RUNAI_SCHEMES and not conflict:
        return "runai"
    why = (f"this process already streamed {_runai_object_scheme}:// with "
           "runai-model-streamer, which keeps one object-storage backend per process"
           if conflict else f"runai-model-streamer cannot stream {uri.scheme}:// here")
    if loader == "runai":
        raise StreamError(f"{uri}: {why}; use loader 'native' (or 'auto')")
    log.info("%s: streaming with our own client: %s", uri, why)
    return "native"


async def fill_buffer(uri: ModelURI, layout: Layout, target: torch.Tensor, *,
                      options: StreamerOptions = StreamerOptions(), loader: Loader = "auto",
                      files: list[str] | None = None, progress: Progress | None = None,
                      store: Store | None = None,
                      pins: Sequence[ObjectInfo] | None = None) -> str:
    """Stream every slot of ``layout`` (or of ``files``) into ``target``; return the loader used.

    ``pins`` is the listing the layout was planned from. With it, the bytes are those of
    that version or the fill fails with :class:`ObjectChangedError`: our own S3 reads
    carry ``If-Match``, and after any loader the files are listed again and compared
    (size, etag or generation, and for local files inode and mtime), so a file replaced
    or rewritten mid-stream is never published under the old content hash.
    """
    if pins is None:
        return await _stream(uri, layout, target, options=options, loader=loader,
                             files=files, progress=progress, store=store)
    if store is None:
        async with open_store(uri) as opened:
            return await fill_buffer(uri, layout, target, options=options, loader=loader,
                                     files=files, progress=progress, store=opened, pins=pins)
    store.pin(pins)
    try:
        used = await _stream(uri, layout, target, options=options, loader=loader,
                             files=files, progress=progress, store=store)
    except StreamError:
        # A loader's error may not say which file (runai's C++ errors name none): a file
        # that vanished or changed is the better answer.
        await _check_unchanged(uri, layout, pins, files, store)
        raise
    await _check_unchanged(uri, layout, pins, files, store)
    return used


async def _check_unchanged(uri: ModelURI, layout: Layout, pins: Sequence[ObjectInfo],
                           files: list[str] | None, store: Store) -> None:
    """Fail if a file the layout reads differs now from its pinned listing."""
    now = {o.key: o for o in await store.list()}
    listed = {o.key: o for o in pins}
    for key in layout.files:
        if files is not None and key not in files:
            continue
        before, after = listed.get(key), now.get(key)
        if before is None or after is None or (before.size, before.etag) != (after.size,
                                                                             after.etag):
            raise ObjectChangedError(
                f"{uri.child(key)} changed while it was being streamed (listed "
                f"{before.etag if before else 'absent'!r}, now "
                f"{after.etag if after else 'absent'!r}); nothing was published", key=key)


async def _stream(uri: ModelURI, layout: Layout, target: torch.Tensor, *,
                  options: StreamerOptions, loader: Loader, files: list[str] | None,
                  progress: Progress | None, store: Store | None) -> str:
    chosen = choose_loader(uri, loader)
    report = progress or (lambda n: None)
    if chosen in ("runai", "pread"):
        # A thread cannot be cancelled from outside; the loaders check this flag
        # between pieces, so Ctrl-C or a controller shutdown stops them within one
        # piece instead of after the whole model.
        # The thread is joined before a cancellation propagates: the caller frees the
        # target next, and a thread still copying into it would crash the process.
        stop = threading.Event()
        if chosen == "runai":
            await to_thread_joined(stream_runai, uri, layout, target, options=options,
                                   files=files, progress=report, stop=stop,
                                   on_cancel=stop.set)
        else:
            await to_thread_joined(stream_pread, uri.path, layout, target, files=files,
                                   progress=report, stop=stop, on_cancel=stop.set)
    elif store is not None:
        await stream_native(store, layout, target, files=files, progress=report)
    else:
        async with open_store(uri) as opened:
            await stream_native(opened, layout, target, files=files, progress=report)
    return chosen


def _runai_path(uri: ModelURI, key: str) -> str:
    return str(uri.path / key) if uri.is_local else uri.child(key)


def streamer_environment(options: StreamerOptions, largest_tensor: int = 0,
                         base: dict[str, str] | None = None) -> dict[str, str]:
    """The variables a streamer run needs, including what test servers need."""
    env = options.environment(base, largest_tensor=largest_tensor)
    if env.get("AWS_ENDPOINT_URL"):
        # S3-compatible servers answer path-style only.
        env.setdefault("RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "0")
        env.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    emulator = env.get("STORAGE_EMULATOR_HOST")
    if emulator and "CLOUD_STORAGE_EMULATOR_ENDPOINT" not in env:
        env["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = (
            emulator if emulator.startswith("http") else f"http://{emulator}")
    return env


def stream_runai(uri: ModelURI, layout: Layout, target: torch.Tensor, *,
                 options: StreamerOptions, files: list[str] | None = None,
                 progress: Progress, distributed: bool = False,
                 stop: threading.Event | None = None, stream_device: str = "cpu",
                 extra_env: dict[str, str] | None = None,
                 on_open: Callable[[Any], None] | None = None) -> int:
    """Fill ``target`` with runai-model-streamer (blocking; run it in a thread).

    ``stream_device`` is where the streamer lands tensors (a group streaming with NCCL
    broadcasts between device buffers); ``on_open`` sees the streamer before it starts
    (the worker group counts its storage reads there). Returns the tensors copied.
    """
    from runai_model_streamer import SafetensorsStreamer

    global _runai_object_scheme
    if uri.scheme != "file":
        _runai_object_scheme = _runai_object_scheme or uri.scheme
    slots = {s.name: s for s in layout.slots if files is None or s.file in files}
    paths = [_runai_path(uri, f) for f in sorted({s.file for s in slots.values()})]
    largest = max((s.nbytes for s in slots.values()), default=0)
    env = {**streamer_environment(options, largest, STREAMER_ENVIRONMENT.base()),
           **(extra_env or {})}
    if uri.is_local:  # the streamer's own open of a FIFO would block for ever
        for f in sorted({s.file for s in slots.values()}):
            os.close(open_regular(uri.path / f, f))
    filled = 0
    try:
        # Held for the whole run: the native library reads some variables (endpoints,
        # timeouts) when a request starts, not only when the streamer opens.
        with STREAMER_ENVIRONMENT.holding(env), SafetensorsStreamer() as streamer:
            if on_open is not None:
                on_open(streamer)
            streamer.stream_files(paths, device=stream_device, is_distributed=distributed,
                                  owned=False)
            for name, tensor in streamer.get_tensors():
                if stop is not None and stop.is_set():
                    raise StreamError(f"{uri}: streaming cancelled")
                slot = slots.get(name)
                if slot is None:
                    raise StreamError(f"{uri}: streamer yielded unexpected tensor {name!r}")
                copy_slot(target, slot, tensor, uri)
                filled += 1
                progress(slot.nbytes)
    except WarmpoolError:
        raise
    except Exception as exc:  # the streamer raises plain exceptions from C++
        raise StreamError(f"{uri}: runai-model-streamer failed reading "
                          f"{_suspects(uri, paths)}: {exc}") from exc
    if filled != len(slots):
        raise StreamError(f"{uri}: streamed {filled} of {len(slots)} tensors")
    return filled


def _suspects(uri: ModelURI, paths: list[str]) -> str:
    """The files a failed streamer run may have failed on: its C++ errors name none. A
    local file that is gone now is the culprit; otherwise every file of the run."""
    if uri.is_local:
        gone = [p for p in paths if not os.path.exists(p)]
        if gone:
            return ", ".join(gone) + " (no longer there)"
    shown = ", ".join(paths[:5])
    return shown + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def copy_slot(target: torch.Tensor, slot: Slot, tensor: torch.Tensor, uri: ModelURI) -> None:
    """Copy one streamed tensor's bytes into its slot, after checking it is the tensor the
    header promised (a file rewritten since its header was read is refused)."""
    if tensor.dtype != TORCH_DTYPES[slot.dtype] or tuple(tensor.shape) != slot.shape:
        raise StreamError(
            f"{uri.child(slot.file)}: tensor {slot.name!r} arrived as {tensor.dtype} "
            f"{tuple(tensor.shape)}, header said {slot.dtype} {slot.shape} (file changed?)")
    if slot.nbytes:
        flat = tensor.reshape(-1).view(torch.uint8)
        target[slot.offset : slot.offset + slot.nbytes].copy_(flat)


async def stream_native(store: Store, layout: Layout, target: torch.Tensor, *,
                        files: list[str] | None = None, progress: Progress,
                        concurrency: int | None = None, piece_bytes: int | None = None) -> None:
    """Fill ``target`` with concurrent ranged reads through our own async client.

    Reads are contiguous file ranges of up to ``piece_bytes`` that may span several
    tensors (a model's many small tensors — norms, biases — would otherwise cost one
    request each); each range is scattered into its slots with one copy.
    """
    gate = asyncio.Semaphore(concurrency or NATIVE_CONCURRENCY)

    async def read(job: Job) -> None:
        async with gate:
            data = await store.read_range(job.file, job.start, job.nbytes)
        if len(data) != job.nbytes:  # the object is shorter than its header said
            raise StorageError(f"{store.uri.child(job.file)}: object ended at "
                               f"{job.start + len(data)}, {job.nbytes - len(data)} bytes short",
                               key=job.file)
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


def _scatter(target: torch.Tensor, job: Job, source: torch.Tensor) -> None:
    """Copy one downloaded file range into the slots it covers."""
    at = 0
    for p in job.pieces:
        target[p.dst:p.dst + p.nbytes].copy_(source[at:at + p.nbytes])
        at += p.nbytes
