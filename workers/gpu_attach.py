"""The GPU tier, as a serving process sees it: attach to a worker's resident buffer.

``attach_gpu(ref, "cuda:0", settings)`` resolves ``cuda:0`` to its GPU UUID (this
process's ``CUDA_VISIBLE_DEVICES`` decides what ``cuda:0`` is), finds the worker serving
that GPU, and asks it over its Unix socket for the model. The reply is the layout and one
handle to the one buffer — a CUDA VMM file descriptor, a legacy CUDA IPC handle sent as
plain fields, or a sealed memfd for ``cpu:N`` workers — mapped once, read-only, then
viewed as tensors: the cost is one mapping plus one view per tensor, whatever the bytes.

The connection stays open and IS the lease: the worker will not free the buffer while it
is open, and the kernel closes it when this process exits or dies. A background thread
listens on it for the worker's ``detach`` request (an eviction asking holders to let go)
and for the worker going away.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from warmpool.config import Settings
from warmpool.errors import WarmpoolError
from warmpool.pool.layout import Layout
from warmpool.pool.refs import ModelRef
from warmpool.pool.views import tensor_views
from warmpool.workers.buffers import open_export
from warmpool.workers.devices import device_uuid, parse_device
from warmpool.workers.discovery import find_worker
from warmpool.workers.protocol import Channel

log = logging.getLogger(__name__)

#: Called (from a background thread) when the worker asks this holder to detach.
DetachCallback = Callable[["GpuAttachment"], None]
ATTACH_TIMEOUT = 60.0


class GpuAttachment:
    """Read-only zero-copy views of a worker's buffer, and the lease that keeps it."""

    def __init__(self, *, uri: str, content_hash: str, device: str, layout: Layout,
                 tensors: Mapping[str, torch.Tensor], transport: str, channel: Channel,
                 on_detach: DetachCallback | None = None,
                 engine: dict[str, Any] | None = None) -> None:
        self.uri = uri
        self.content_hash = content_hash
        self.device = device
        self.layout = layout
        self.tensors = tensors
        self.transport = transport
        self.on_detach = on_detach
        #: an engine-layout entry's key (EngineKey JSON); None for a checkpoint
        self.engine = engine
        self.detach_requested = threading.Event()
        self.worker_gone = threading.Event()
        self._channel: Channel | None = channel
        self._watcher = threading.Thread(target=self._watch, name=f"warmpool-lease-{device}",
                                         daemon=True)
        self._watcher.start()

    @property
    def closed(self) -> bool:
        return self._channel is None

    def close(self) -> None:
        """End the lease. Views already handed out stay valid until dropped: the mapping
        goes with the last of them (and, for cuda-vmm, the memory with the last mapping)."""
        channel, self._channel = self._channel, None
        if channel is None:
            return
        # Wake the watcher (blocked in recv on this socket) and wait for it: closing the
        # fd under a blocked recv neither wakes it reliably nor is safe, and a thread
        # still inside recv at interpreter exit has been seen to abort the process.
        with contextlib.suppress(OSError):
            channel.sock.shutdown(socket.SHUT_RDWR)
        if self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)
        channel.close()

    def _watch(self) -> None:
        channel = self._channel
        while channel is not None:
            try:
                got = channel.recv(timeout=None)
            except (OSError, WarmpoolError):
                got = None
            if got is None:
                if self._channel is not None:  # not our own close(): the worker went away
                    self.worker_gone.set()
                    log.warning("worker for %s on %s went away; the mapped weights stay "
                                "valid (%s) but the lease is gone", self.uri, self.device,
                                self.transport)
                return
            message, fds = got
            for fd in fds:
                os.close(fd)
            if message.get("notice") == "detach":
                self.detach_requested.set()
                if self.on_detach is not None:
                    self.on_detach(self)
                else:
                    log.warning("worker asks to detach %s from %s within %ss: call close()",
                                self.uri, self.device, message.get("deadline_s"))

    def __enter__(self) -> GpuAttachment:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GpuAttachment({self.uri!r}, device={self.device!r}, "
                f"tensors={len(self.tensors)}, transport={self.transport!r})")


def attach_gpu(ref: str, device: str, settings: Settings, *, holder: str = "",
               on_detach: DetachCallback | None = None) -> GpuAttachment:
    """Attach to ``ref`` (a URI or content hash) warm on ``device`` (``cuda:N``/``cpu:N``)."""
    spec = parse_device(device)
    uuid = device_uuid(spec)
    record = find_worker(settings.runtime_dir, uuid, str(spec))
    channel = Channel.connect(Path(record.socket))
    try:
        reply, fds = channel.request(
            {"op": "attach", "ref": ModelRef.parse(ref).text, "device_uuid": uuid,
             "holder": holder or f"pid {os.getpid()}"}, timeout=ATTACH_TIMEOUT)
        layout = Layout.from_json(reply["layout"])
        flat = open_export(str(reply["transport"]), dict(reply["handle"]), fds, uuid)
        tensors = tensor_views(flat, layout)
    except BaseException:
        channel.close()
        raise
    return GpuAttachment(uri=str(reply["uri"]), content_hash=str(reply["content_hash"]),
                         device=str(spec), layout=layout, tensors=tensors,
                         transport=str(reply["transport"]), channel=channel,
                         on_detach=on_detach, engine=_engine_key(reply.get("engine")))


def _engine_key(value: object) -> dict[str, Any] | None:
    return dict(value) if isinstance(value, dict) else None
