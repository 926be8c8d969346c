"""A stream that fails or is cancelled has stopped writing before it returns.

The caller frees the target next (a worker unmaps the buffer, a prefetch discards the
segment): a copy thread that outlived the stream would write into unmapped memory and
crash the process. This once did, in CI, when a truncated file failed one read while a
sibling read was still copying.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.models import write_model
from warmpool.errors import StorageError
from warmpool.loading import native, pread, streaming
from warmpool.model.uri import parse_uri
from warmpool.storage import open_store
from warmpool.threads import to_thread_joined
from warmpool.workers.plan import plan_model


async def test_a_cancelled_thread_is_stopped_and_joined_before_the_cancellation_propagates(
        ) -> None:
    stop = threading.Event()
    finished = threading.Event()

    def work() -> None:
        stop.wait(5)
        time.sleep(0.2)  # still busy after being told to stop
        finished.set()

    task = asyncio.ensure_future(to_thread_joined(work, on_cancel=stop.set))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stop.is_set() and finished.is_set()


async def test_a_cancellation_repeated_while_joining_still_waits_for_the_thread() -> None:
    release = threading.Event()
    finished = threading.Event()

    def work() -> None:
        release.wait(5)
        finished.set()

    task = asyncio.ensure_future(to_thread_joined(work))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.05)
    task.cancel()  # a second cancel (a shutdown after a timeout) must not cut the wait
    await asyncio.sleep(0.05)
    assert not task.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished.is_set()


async def test_a_short_read_fails_the_stream_only_after_every_copy_has_finished(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_model(tmp_path / "m", shards=2)
    plan = await plan_model(parse_uri(str(tmp_path / "m")), tmp_path / "cache")
    layout = plan.layout()
    victim = sorted((tmp_path / "m").glob("*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[:-8])  # its last range now comes back short

    copying: list[str] = []
    started = threading.Event()
    original = native._scatter

    def slow_scatter(target: torch.Tensor, job: pread.Job, source: torch.Tensor) -> None:
        copying.append("start")
        started.set()
        time.sleep(0.3)  # a large range still copying when the short one fails
        original(target, job, source)
        copying.append("end")

    monkeypatch.setattr(native, "_scatter", slow_scatter)
    # The threaded copies are a device buffer's: a host buffer is written on the loop,
    # straight from each read (no copy can outlive the stream there).
    monkeypatch.setattr(native, "_direct_view", lambda target: None)
    target = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    async with open_store(parse_uri(str(tmp_path / "m"))) as store:
        read_range = store.read_range

        async def short_read_last(key: str, start: int, length: int) -> bytes:
            if key == victim.name:  # fails only once another range is being copied
                assert await asyncio.to_thread(started.wait, 5)
            return await read_range(key, start, length)

        monkeypatch.setattr(store, "read_range", short_read_last)
        with pytest.raises(StorageError, match="bytes short"):
            await native.stream_native(store, layout, target, progress=lambda n: None)
    assert copying, "no copy ran: the test no longer exercises the race"
    assert copying.count("start") == copying.count("end"), copying


async def test_a_cancelled_local_stream_has_stopped_its_readers_when_it_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_model(tmp_path / "m", shards=2)
    plan = await plan_model(parse_uri(str(tmp_path / "m")), tmp_path / "cache")
    layout = plan.layout()
    running = threading.Event()
    active: list[int] = []
    original = pread._to_host

    def slow_to_host(*args: object) -> None:
        active.append(1)
        running.set()
        time.sleep(0.2)
        original(*args)  # type: ignore[arg-type]
        active.pop()

    monkeypatch.setattr(pread, "_to_host", slow_to_host)
    target = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    task = asyncio.ensure_future(streaming.fill_buffer(
        parse_uri(str(tmp_path / "m")), layout, target, loader="pread"))
    assert await asyncio.to_thread(running.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert active == []  # nobody writes into target any more: the caller may free it
