"""Exporting an engine layout into a worker's buffer, from the engine's side.

:func:`export_to_worker` plans one buffer for the engine's processed parameters, asks
the device's worker for room (``export_begin``), maps the writable handle it gets back,
copies every tensor into its slot — on CUDA ``copy_`` from the engine's parameters is a
device-to-device copy, no byte passes through the host — waits for the copies, drops
the mapping, and commits on the same connection. Whatever goes wrong before the commit,
the worker frees the buffer and records why (see :mod:`~warmpool.workers.export`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from warmpool.config import Settings
from warmpool.errors import WarmpoolError
from warmpool.pool.engine_key import (
    EngineKey,
    ExportResult,
    layout_uri,
    plan_engine_layout,
    write_engine_layout,
)
from warmpool.pool.layout import Layout
from warmpool.pool.registry.base import PoolEntry
from warmpool.workers.buffers import open_writable
from warmpool.workers.client import worker_for
from warmpool.workers.protocol import Channel, Message

if TYPE_CHECKING:
    import torch

#: Room is made before the reply (evictions may wait for holders to detach).
BEGIN_TIMEOUT = 120.0
COMMIT_TIMEOUT = 60.0


def export_to_worker(key: EngineKey, tensors: Iterable[tuple[str, torch.Tensor]], *,
                     checkpoint_uri: str, device: str, settings: Settings) -> ExportResult:
    """Write ``tensors`` as the engine-layout entry for ``key`` into the buffer of
    ``device``'s worker (``cuda:N`` or ``cpu:N``); return at once if it is already warm
    there. Raises :class:`CapacityError` (nothing written) when it cannot fit."""
    started = time.perf_counter()
    items = list(tensors)
    layout = plan_engine_layout(key, items)
    record = worker_for(settings, device)
    channel = Channel.connect(Path(record.socket))
    try:
        reply, fds = channel.request(
            {"op": "export_begin", "uri": layout_uri(checkpoint_uri, key),
             "content_hash": key.content_hash, "layout": layout.to_json(),
             "engine": key.to_json()}, timeout=BEGIN_TIMEOUT)
        if reply.get("already_warm"):
            _close(fds)
            return _result(reply, started, already_warm=True)
        try:
            _write(reply, fds, layout, items)
        except BaseException as exc:
            _abort(channel, key, exc)
            raise
        reply, fds = channel.request({"op": "export_commit", "content_hash": key.content_hash},
                                     timeout=COMMIT_TIMEOUT)
        _close(fds)
        return _result(reply, started, already_warm=False)
    finally:
        channel.close()


def _write(reply: Message, fds: list[int], layout: Layout,
           items: list[tuple[str, torch.Tensor]]) -> None:
    writable = open_writable(str(reply["transport"]), dict(reply["handle"]), fds,
                             str(reply["uuid"]))
    assert writable.tensor is not None
    try:  # every view goes before the mapping: the worker cannot seal under one
        write_engine_layout(writable.tensor, layout, items)
    except BaseException:
        with contextlib.suppress(WarmpoolError):  # the copy's own error is the one to see
            writable.release()
        raise
    writable.release()


def _abort(channel: Channel, key: EngineKey, exc: BaseException) -> None:
    """Tell the worker why (it records the reason); closing the connection would free
    the buffer anyway, so a failure to say so is not an error of its own."""
    reason = f"{type(exc).__name__}: {exc}"
    with contextlib.suppress(WarmpoolError, OSError):
        _, fds = channel.request({"op": "export_abort", "content_hash": key.content_hash,
                                  "reason": reason}, timeout=COMMIT_TIMEOUT)
        _close(fds)


def _result(reply: Message, started: float, *, already_warm: bool) -> ExportResult:
    return ExportResult(PoolEntry.from_json(dict(reply["entry"])),
                        time.perf_counter() - started, already_warm)


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
