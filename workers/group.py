"""Streaming one rank of a worker group (tensor parallel, ``--tp N``).

A group is formed for one load and torn down after it: the coordinating worker hosts a
``TCPStore`` on 127.0.0.1 (port chosen by the kernel, so no race for a "free" port), the
participating workers join a ``torch.distributed`` group through it (gloo on CPU, NCCL
on GPUs), and runai-model-streamer's distributed mode splits the reads so each rank reads
about 1/N of the bytes from storage and broadcasts them, and every rank ends with every
tensor (layout ``replicated``). The ``sharded`` layout needs no group: each rank streams
only its own files (see :mod:`warmpool.workers.plan`).

A persistent group would need every rank to agree on every collective forever; one group
per load keeps a worker free to serve attaches between loads and lets any set of workers
form a group.

How many bytes each rank read is *counted*, not assumed: the streamer's low-level reader
(``FileStreamer.stream_files``) is wrapped on the instance of this run, and every byte
range submitted to storage — the rank's partition and its own header reads — is summed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch

from warmpool.config import StreamerOptions
from warmpool.loading.runai import stream_runai
from warmpool.model.uri import ModelURI
from warmpool.pool.layout import Layout
from warmpool.workers.devices import DeviceSpec

#: The distributed streamer's device staging buffers (two per rank) default to 1 GiB
#: each; broadcast rounds are cheap, so a smaller floor leaves that memory to models.
DIST_BUFFER_VAR = "RUNAI_STREAMER_DIST_BUFFER_MIN_BYTESIZE"
DIST_BUFFER_BYTES = 256 << 20
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class RankRun:
    """This rank's part in a group: who it is and where the group meets."""

    rank: int
    world: int
    port: int  # the coordinator's TCPStore; unused when world == 1
    backend: str  # "gloo" or "nccl"
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class RankResult:
    tensors: int
    read_bytes: int | None  # bytes this rank asked storage for; None if not observable
    seconds: float


def backend_for(device: DeviceSpec) -> str:
    return "nccl" if device.is_cuda else "gloo"


def staging_bytes(layout: Layout, device: DeviceSpec, world: int) -> int:
    """Device memory the distributed streamer takes besides the resident buffer."""
    if world <= 1 or not device.is_cuda:
        return 0
    largest = max((s.nbytes for s in layout.slots), default=0)
    return 2 * (max(DIST_BUFFER_BYTES, largest) + (1 << 20))


def master_store(world: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """The coordinator's rendezvous: a TCPStore on a port the kernel picks."""
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, world_size=world, is_master=True,
                         wait_for_workers=False, timeout=timedelta(seconds=timeout_s))


def stream_rank(uri: ModelURI, layout: Layout, target: torch.Tensor, *, device: DeviceSpec,
                run: RankRun, options: StreamerOptions,
                progress: Callable[[int], None] = lambda n: None) -> RankResult:
    """Fill ``target`` as rank ``run.rank`` of ``run.world`` (blocking; run it in a thread)."""
    if run.world <= 1:
        return stream_counted(uri, layout, target, options=options, distributed=False,
                              stream_device="cpu", progress=progress)
    import torch.distributed as dist

    if device.is_cuda:
        torch.cuda.set_device(device.index)
    timeout = timedelta(seconds=run.timeout_s)
    store = dist.TCPStore("127.0.0.1", run.port, world_size=run.world, is_master=False,
                          timeout=timeout)
    dist.init_process_group(run.backend, store=store, rank=run.rank, world_size=run.world,
                            timeout=timeout)
    try:
        # NCCL broadcasts between device buffers, gloo between host buffers.
        stream_device = str(device) if device.is_cuda else "cpu"
        return stream_counted(uri, layout, target, options=replace(options, distributed=True),
                              distributed=True, stream_device=stream_device,
                              progress=progress)
    finally:
        dist.destroy_process_group()
        if device.is_cuda:
            torch.cuda.empty_cache()  # the streamer's staging buffers


def stream_counted(uri: ModelURI, layout: Layout, target: torch.Tensor, *,
                   options: StreamerOptions, distributed: bool, stream_device: str,
                   progress: Callable[[int], None]) -> RankResult:
    """runai-model-streamer into ``target``, counting the bytes read from storage."""
    started = time.perf_counter()
    counters: list[ReadCounter] = []
    filled = stream_runai(uri, layout, target, options=options, progress=progress,
                          distributed=distributed, stream_device=stream_device,
                          extra_env={DIST_BUFFER_VAR: os.environ.get(DIST_BUFFER_VAR,
                                                                     str(DIST_BUFFER_BYTES))},
                          on_open=lambda streamer: counters.append(ReadCounter.install(streamer)))
    return RankResult(filled, counters[0].bytes, time.perf_counter() - started)


class ReadCounter:
    """Sums the byte ranges a streamer submits to storage, on one streamer instance.

    ``SafetensorsStreamer.file_streamer`` (a DistributedStreamer) reads through its own
    ``file_streamer`` (a FileStreamer) in both modes; in distributed mode it passes only
    this rank's partition. If a future release moves that attribute, counting turns off
    (``bytes`` is None) rather than failing the load.
    """

    def __init__(self) -> None:
        self.bytes: int | None = 0

    @classmethod
    def install(cls, streamer: Any) -> ReadCounter:
        counter = cls()
        reader = getattr(getattr(streamer, "file_streamer", None), "file_streamer", None)
        original = getattr(reader, "stream_files", None)
        if reader is None or original is None:
            counter.bytes = None
            return counter

        def counting(requests: Any, *args: Any, **kwargs: Any) -> Any:
            if counter.bytes is not None:
                counter.bytes += sum(sum(fc.sizes) for fc in requests)
            return original(requests, *args, **kwargs)

        reader.stream_files = counting
        return counter
