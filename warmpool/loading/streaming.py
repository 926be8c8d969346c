"""Filling a resident buffer from a model's files: which loader, and the version check.

Every loader fills the same thing: a flat uint8 tensor (a host segment or a device
buffer) laid out by a :class:`~warmpool.pool.layout.Layout`. Local files go through
threads of ``preadv`` (:mod:`.pread`), object stores through runai-model-streamer
(:mod:`.runai`), and what it cannot stream through our own async clients
(:mod:`.native`). Here: the choice (:func:`choose_loader`), and the guarantee that the
bytes are those of the listing the layout was planned from (:func:`fill_buffer`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import torch

from warmpool.config import StreamerOptions
from warmpool.errors import ObjectChangedError, StreamError
from warmpool.loading.loaders import LOADERS_BY_NAME, Chosen, Loader
from warmpool.loading.native import stream_native
from warmpool.loading.pread import stream_pread
from warmpool.loading.runai import RUNAI_SCHEMES, opened_object_scheme, stream_runai
from warmpool.model.uri import ModelURI
from warmpool.pool.layout import Layout
from warmpool.storage import open_store
from warmpool.storage.base import ObjectInfo, Store
from warmpool.threads import to_thread_joined

Progress = Callable[[int], None]

log = logging.getLogger(__name__)


def choose_loader(uri: ModelURI, loader: Loader = "auto", *,
                  group: bool = False) -> Chosen:
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
    if loader != "auto" and LOADERS_BY_NAME[loader].local_only:
        if not uri.is_local:
            raise StreamError(f"{uri}: the {loader} loader reads local files only")
        return LOADERS_BY_NAME[loader].name
    bound = opened_object_scheme()
    conflict = uri.scheme != "file" and bound not in (None, uri.scheme)
    if uri.scheme in RUNAI_SCHEMES and not conflict:
        return "runai"
    why = (f"this process already streamed {bound}:// with "
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


@dataclass(frozen=True)
class Fill:
    """One fill of ``target`` from the model's files: what every loader is given."""

    uri: ModelURI
    layout: Layout
    target: torch.Tensor
    options: StreamerOptions
    files: list[str] | None
    progress: Progress
    store: Store | None


async def _fill_runai(job: Fill) -> None:
    # A thread cannot be cancelled from outside; the loaders check this flag between
    # pieces, so Ctrl-C or a controller shutdown stops them within one piece. The thread
    # is joined before a cancellation propagates: the caller frees the target next, and
    # a thread still copying into it would crash.
    stop = threading.Event()
    await to_thread_joined(stream_runai, job.uri, job.layout, job.target,
                           options=job.options, files=job.files, progress=job.progress,
                           stop=stop, on_cancel=stop.set)


async def _fill_pread(job: Fill) -> None:
    stop = threading.Event()  # as in _fill_runai
    await to_thread_joined(stream_pread, job.uri.path, job.layout, job.target,
                           files=job.files, progress=job.progress, stop=stop,
                           on_cancel=stop.set)


async def _fill_native(job: Fill) -> None:
    if job.store is not None:
        await stream_native(job.store, job.layout, job.target, files=job.files,
                            progress=job.progress)
        return
    async with open_store(job.uri) as opened:
        await stream_native(opened, job.layout, job.target, files=job.files,
                            progress=job.progress)


#: The loaders' fill functions, by the names of :data:`~warmpool.loading.loaders.LOADERS_BY_NAME`.
FILLS: dict[str, Callable[[Fill], Awaitable[None]]] = {
    "runai": _fill_runai, "native": _fill_native, "pread": _fill_pread,
}


async def _stream(uri: ModelURI, layout: Layout, target: torch.Tensor, *,
                  options: StreamerOptions, loader: Loader, files: list[str] | None,
                  progress: Progress | None, store: Store | None) -> str:
    chosen = choose_loader(uri, loader)
    await FILLS[chosen](Fill(uri, layout, target, options, files,
                             progress or (lambda n: None), store))
    return chosen
