"""Blocking work stays off the event loop: a slow disk must not freeze a worker's or a
controller's loop (it also answers attach requests and heartbeats)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from warmpool.pool.registry.base import PoolEntry
from warmpool.pool.registry.files import FileRegistry

STALL_BOUND_S = 30.0  # how long the fake slow disk waits before giving up


async def test_a_slow_fsync_does_not_stall_the_loop(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The user gets: while the file registry waits for a slow ``fsync``, the loop keeps
    serving (here: the loop itself is what lets the disk finish)."""
    released_by_loop = threading.Event()
    in_fsync = threading.Event()
    real_fsync = os.fsync
    waits: list[bool] = []

    def slow_fsync(fd: int) -> None:
        in_fsync.set()
        waits.append(released_by_loop.wait(STALL_BOUND_S))  # False: it gave up
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    registry = FileRegistry(tmp_path)
    entry = PoolEntry(uri="file:///m/", content_hash="a" * 64)
    put = asyncio.create_task(registry.put(entry))
    await asyncio.to_thread(in_fsync.wait, STALL_BOUND_S)
    released_by_loop.set()  # runs only if the loop is free while fsync waits
    await put
    monkeypatch.undo()
    assert waits == [True]
    assert await registry.get(entry.key) == entry
