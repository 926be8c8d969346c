"""Blocking work stays off the event loop: a slow disk must not freeze a worker's or a
controller's loop (it also answers attach requests and heartbeats)."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from warmpool.errors import SafetensorsError
from warmpool.model.cache import MetadataCache
from warmpool.model.uri import parse_uri
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


async def test_a_failed_build_is_cleaned_up_off_the_loop(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The user gets: a metadata build that fails (here: a corrupt shard) raises its
    error and leaves no temporary directory, and deleting that directory (``rmtree``,
    retried while a download thread finishes) never freezes the loop."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    header = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    (model / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\0" * 4)  # 4 bytes short
    released_by_loop = threading.Event()
    in_rmtree = threading.Event()
    real_rmtree = shutil.rmtree
    waits: list[bool] = []

    def slow_rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        if ".tmp-" in str(path) and not in_rmtree.is_set():
            in_rmtree.set()
            waits.append(released_by_loop.wait(STALL_BOUND_S))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", slow_rmtree)
    cache = MetadataCache(tmp_path / "cache")
    fetch = asyncio.create_task(cache.fetch(parse_uri(str(model))))
    await asyncio.to_thread(in_rmtree.wait, STALL_BOUND_S)
    released_by_loop.set()
    with pytest.raises(SafetensorsError):
        await fetch
    monkeypatch.undo()
    assert waits == [True]
    assert not list((tmp_path / "cache").glob(".tmp-*"))
