"""A worker running in the test's own event loop (device ``cpu:0``, shm-fd buffers):
capacity and eviction policy, detach notices, host-tier promotion, failed loads.

Clients run in threads (they block), exactly as a serving process would call them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.models import write_model
from tests.workers_env import (
    InProcessWorkers,
    assert_bit_exact,
    publish_host_copy,
    settings_for,
    write_even_model,
)
from warmpool.config import Settings
from warmpool.errors import CapacityError, LeaseHeldError, NotWarmError, StorageError, WorkerError
from warmpool.model.uri import parse_uri
from warmpool.pool.host import HostTier
from warmpool.pool.layout import Layout, plan_layout
from warmpool.pool.registry.base import PoolEntry, State
from warmpool.pool.registry.files import FileRegistry
from warmpool.workers import protocol
from warmpool.workers.buffers import ShmFdBuffer
from warmpool.workers.client import evict_via_workers, prefetch_via_workers, workers_status
from warmpool.workers.devices import parse_device
from warmpool.workers.gpu_attach import attach_gpu
from warmpool.workers.plan import plan_model
from warmpool.workers.promote import copy_by_layout
from warmpool.workers.residents import DeviceResident, choose_victims
from warmpool.workers.worker import Worker

MiB = 1 << 20
StartWorker = Callable[..., Awaitable[tuple[Worker, Settings]]]


@pytest.fixture
async def start_worker(tmp_path: Path) -> AsyncIterator[StartWorker]:
    workers = InProcessWorkers(settings_for(tmp_path))

    async def start(capacity: int | None = None) -> tuple[Worker, Settings]:
        return await workers.start(capacity=capacity), workers.settings

    yield start
    await workers.stop_all()


async def prefetch(uri: Path | str, settings: Settings, **kw: Any) -> dict[str, Any]:
    return await asyncio.to_thread(prefetch_via_workers, str(uri), device="cpu:0",
                                   settings=settings, **kw)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def entry_state(settings: Settings, content_hash: str) -> State:
    entry = await FileRegistry(settings.runtime_dir).get(f"{content_hash}@cpu:0")
    assert entry is not None
    return entry.state


async def test_load_is_refused_for_lack_of_room_naming_needed_and_free_bytes(
        tmp_path: Path, start_worker: StartWorker) -> None:
    worker, settings = await start_worker(capacity=int(1.5 * MiB))
    write_even_model(tmp_path / "a", seed=1)
    write_even_model(tmp_path / "b", seed=2)
    a = await prefetch(tmp_path / "a", settings)
    held = await asyncio.to_thread(attach_gpu, str(tmp_path / "a"), "cpu:0", settings)
    try:
        with pytest.raises(CapacityError) as caught:
            await prefetch(tmp_path / "b", settings)
        assert caught.value.needed >= MiB and caught.value.free < caught.value.needed
        assert str(caught.value.needed) in str(caught.value)
        assert list(worker.residents) == [a["content_hash"]]
    finally:
        held.close()
    # Once the lease is gone the least recently attached model makes way.
    await until(lambda: not worker.residents[a["content_hash"]].leases)
    b = await prefetch(tmp_path / "b", settings)
    assert list(worker.residents) == [b["content_hash"]]
    assert await entry_state(settings, a["content_hash"]) == State.EVICTED
    assert await entry_state(settings, b["content_hash"]) == State.WARM


async def test_a_model_larger_than_the_device_is_refused_before_any_byte_is_read(
        tmp_path: Path, start_worker: StartWorker) -> None:
    worker, settings = await start_worker(capacity=MiB // 2)
    write_even_model(tmp_path / "big")
    with pytest.raises(CapacityError):
        await prefetch(tmp_path / "big", settings)
    assert worker.residents == {}
    entries = await FileRegistry(settings.runtime_dir).list()
    assert [e.state for e in entries] == [State.FAILED]
    assert "needs" in (entries[0].error or "")


async def test_eviction_asks_holders_to_detach_and_frees_when_they_do(
        tmp_path: Path, start_worker: StartWorker) -> None:
    worker, settings = await start_worker()
    expected = write_model(tmp_path / "m")
    await prefetch(tmp_path / "m", settings)
    held = await asyncio.to_thread(attach_gpu, str(tmp_path / "m"), "cpu:0", settings,
                                   on_detach=lambda a: a.close())
    assert_bit_exact(held.tensors, expected)
    entry = await asyncio.to_thread(evict_via_workers, str(tmp_path / "m"), device="cpu:0",
                                    settings=settings, grace_s=5)
    assert held.detach_requested.is_set() and held.closed
    assert entry["state"] == "evicted" and worker.residents == {}
    assert_bit_exact(held.tensors, expected)  # views outlive the lease and the worker's copy


async def test_eviction_is_refused_while_a_holder_keeps_its_lease_unless_forced(
        tmp_path: Path, start_worker: StartWorker) -> None:
    worker, settings = await start_worker()
    expected = write_model(tmp_path / "m")
    await prefetch(tmp_path / "m", settings)
    held = await asyncio.to_thread(attach_gpu, str(tmp_path / "m"), "cpu:0", settings)
    with pytest.raises(LeaseHeldError, match="1 live lease"):
        await asyncio.to_thread(evict_via_workers, str(tmp_path / "m"), device="cpu:0",
                                settings=settings, grace_s=0.2)
    assert held.detach_requested.is_set() and not held.closed
    assert len(worker.residents) == 1
    await asyncio.to_thread(evict_via_workers, str(tmp_path / "m"), device="cpu:0",
                            settings=settings, grace_s=0.1, force=True)
    assert worker.residents == {}
    assert_bit_exact(held.tensors, expected)  # forced: the holder keeps its own mapping
    held.close()
    with pytest.raises(NotWarmError):
        await asyncio.to_thread(attach_gpu, str(tmp_path / "m"), "cpu:0", settings)


@pytest.mark.parametrize("arena_chunk", [None, 4096], ids=["segment", "arena"])
async def test_a_model_warm_on_the_host_tier_is_promoted_without_reading_storage(
        tmp_path: Path, start_worker: StartWorker, arena_chunk: int | None) -> None:
    """From a segment of its own, or from chunks of the host arena (4 KiB chunks: the
    model spans several, and a copy crosses their edges)."""
    worker, settings = await start_worker()
    expected = (write_model(tmp_path / "m", shards=3) if arena_chunk is None
                else write_even_model(tmp_path / "m", tensor_bytes=6144))
    plan = await publish_host_copy(settings, tmp_path / "m", arena_chunk)
    host = HostTier(settings.runtime_dir).resident(plan.content_hash)
    assert host is not None and (host.arena is not None) == (arena_chunk is not None)
    if host.arena is not None:
        assert len(host.arena.chunks) > 3
    try:
        for weights in (tmp_path / "m").glob("*.safetensors"):
            weights.unlink()  # any storage read would now fail
        result = await prefetch(tmp_path / "m", settings, plan=plan)
        assert result["loader"] == "host"
        with await asyncio.to_thread(attach_gpu, plan.content_hash[:16], "cpu:0",
                                     settings) as attached:
            assert_bit_exact(attached.tensors, expected)
    finally:
        HostTier(settings.runtime_dir).remove_all()  # the arena's file too


@pytest.mark.parametrize("subset", [False, True], ids=["whole", "by-name"])
def test_promotion_from_scattered_arena_chunks_is_bit_exact(tmp_path: Path,
                                                             subset: bool) -> None:
    """A model whose chunks lie out of order in the arena copies as if it were one
    buffer: whole (one copy per run of chunks) and by tensor name (a rank's subset, each
    tensor split where its chunks are not adjacent)."""
    import asyncio as aio

    from warmpool.pool.arena import ArenaPlace

    write_even_model(tmp_path / "m", files=2, per_file=3, tensor_bytes=6144)
    plan = aio.run(plan_model(parse_uri(str(tmp_path / "m")), tmp_path / "cache"))
    full = plan.layout()
    part = plan.layout([sorted(plan.headers)[1]]) if subset else full
    chunk = 4096
    n = -(-full.total_bytes // chunk)
    place = ArenaPlace("arena", chunk, tuple([2 * n - 1, 0, 1, *range(n + 2, 2 * n - 1)][:n]))
    assert len(set(place.chunks)) == n
    flat = torch.randint(0, 255, (n * chunk,), dtype=torch.uint8)  # the model's buffer
    arena = torch.zeros(2 * n * chunk, dtype=torch.uint8)
    for position, c in enumerate(place.chunks):
        arena[c * chunk:(c + 1) * chunk] = flat[position * chunk:(position + 1) * chunk]
    target = torch.zeros(part.total_bytes, dtype=torch.uint8)
    copy_by_layout(arena, full, target, part, place=place)
    by_name = {s.name: s for s in full.slots}
    for slot in part.slots:
        src = by_name[slot.name]
        assert torch.equal(target[slot.offset : slot.offset + slot.nbytes],
                           flat[src.offset : src.offset + src.nbytes])


def test_promotion_copies_a_subset_layout_by_tensor_name(tmp_path: Path) -> None:
    import asyncio as aio

    write_even_model(tmp_path / "m", files=2, per_file=3, tensor_bytes=4096)
    plan = aio.run(plan_model(parse_uri(str(tmp_path / "m")), tmp_path / "cache"))
    full, part = plan.layout(), plan.layout([sorted(plan.headers)[1]])
    source = torch.randint(0, 255, (full.total_bytes,), dtype=torch.uint8)
    target = torch.zeros(part.total_bytes, dtype=torch.uint8)
    copy_by_layout(source, full, target, part)
    by_name = {s.name: s for s in full.slots}
    for slot in part.slots:
        src = by_name[slot.name]
        assert torch.equal(target[slot.offset : slot.offset + slot.nbytes],
                           source[src.offset : src.offset + src.nbytes])


async def test_a_failed_stream_leaves_nothing_resident_and_records_the_error(
        tmp_path: Path, start_worker: StartWorker) -> None:
    worker, settings = await start_worker()
    write_model(tmp_path / "m")
    plan = await plan_model(parse_uri(str(tmp_path / "m")), tmp_path / "cache")
    victim = sorted((tmp_path / "m").glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-8])  # truncated after the headers were read
    with pytest.raises(StorageError, match="bytes short"):
        await prefetch(tmp_path / "m", settings, plan=plan, loader="native")
    assert worker.residents == {}
    assert await entry_state(settings, plan.content_hash) == State.FAILED
    status = await asyncio.to_thread(workers_status, settings)
    assert status[0]["residents"] == []


async def test_concurrent_loads_of_one_model_stream_it_once(
        tmp_path: Path, start_worker: StartWorker) -> None:
    worker, settings = await start_worker()
    write_even_model(tmp_path / "m")
    results = await asyncio.gather(*(prefetch(tmp_path / "m", settings) for _ in range(3)))
    assert sorted(bool(r["already_warm"]) for r in results) == [False, True, True]
    assert len(worker.residents) == 1


def test_layout_of_a_plan_matches_plan_layout(tmp_path: Path) -> None:
    import asyncio as aio

    write_model(tmp_path / "m")
    plan = aio.run(plan_model(parse_uri(str(tmp_path / "m")), tmp_path / "cache"))
    assert plan.layout() == plan_layout(plan.content_hash, plan.headers.items())


async def test_the_worker_refuses_a_peer_of_another_uid(
        tmp_path: Path, start_worker: StartWorker,
        monkeypatch: pytest.MonkeyPatch) -> None:
    worker, settings = await start_worker()
    real = os.getuid()
    # Worker and client share this process: the worker now believes it runs as another
    # user, so our (real) uid is foreign to it. The raw client skips its own check.
    monkeypatch.setattr(protocol.os, "getuid", lambda: real + 4242)
    reply = await asyncio.to_thread(raw_exchange, worker.socket_path, b"")
    assert reply["ok"] is False and "not ours" in reply["error"]["message"]
    assert worker.conns == {}


async def test_an_oversized_request_is_refused_and_the_connection_closed(
        tmp_path: Path, start_worker: StartWorker) -> None:
    worker, settings = await start_worker()
    frame = struct.pack(">I", protocol.MAX_MESSAGE + 1) + b"x" * 1024
    reply = await asyncio.to_thread(raw_exchange, worker.socket_path, frame)
    assert reply["error"]["type"] == "ProtocolError" and "bound" in reply["error"]["message"]
    await until(lambda: not worker.conns)
    assert (await asyncio.to_thread(workers_status, settings))[0]["ok"]  # still serving


def raw_exchange(path: Path, data: bytes) -> dict[str, object]:
    """Send raw bytes (if any), read one reply, expect the worker to close the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        if data:
            sock.sendall(data)
        channel = protocol.Channel(sock)
        got = channel.recv(timeout=10)
        assert got is not None
        assert channel.recv(timeout=10) is None  # closed by the worker
        return got[0]


async def test_a_second_worker_for_the_same_device_is_refused(
        tmp_path: Path, start_worker: StartWorker) -> None:
    worker, settings = await start_worker()
    twin = Worker(parse_device("cpu:0"), settings.runtime_dir, settings=settings)
    with pytest.raises(WorkerError, match="already serves"):
        await twin.serve()
    assert (await asyncio.to_thread(workers_status, settings))[0]["pid"] == os.getpid()


def test_eviction_policy_takes_least_recently_attached_and_spares_leased_and_pinned() -> None:
    def resident(name: str, last: float, *, leased: bool = False,
                 pinned: bool = False) -> DeviceResident:
        layout = Layout(name, MiB, ())
        r = DeviceResident(name, name, layout, ShmFdBuffer(4096), PoolEntry(name, name), warm=True,
                     pinned=pinned, last_attached=last)
        if leased:
            r.leases.add(1)
        return r

    old, older, leased, pinned = (resident("old", 20), resident("older", 10),
                                  resident("leased", 1, leased=True),
                                  resident("pinned", 2, pinned=True))
    everyone = [old, older, leased, pinned]
    try:
        assert choose_victims(everyone, MiB, MiB, who="x", device="cpu:0") == []
        assert choose_victims(everyone, MiB, 0, who="x", device="cpu:0") == [older]
        assert choose_victims(everyone, 2 * MiB, 0, who="x", device="cpu:0") == [older, old]
        with pytest.raises(CapacityError) as caught:
            choose_victims(everyone, 3 * MiB, 0, who="x", device="cpu:0")
        assert (caught.value.needed, caught.value.free) == (3 * MiB, 2 * MiB)
    finally:
        for r in everyone:
            r.buffer.free()


async def test_host_segments_are_held_and_released_when_evicted(tmp_path: Path) -> None:
    """The GPU worker's background locker: it holds every host-warm segment and lets go
    of one as soon as the host tier evicts it (so it never pins an evicted model)."""
    from warmpool.pool.host import HostTier
    from warmpool.workers.promote import PinnedSegments

    settings = settings_for(tmp_path)
    write_model(tmp_path / "m", shards=2)
    plan = await publish_host_copy(settings, tmp_path / "m")
    host = HostTier(settings.runtime_dir)
    segments = PinnedSegments()
    segments.sync(host.residents(), pin=False)  # no GPU here: mapped, not page-locked
    resident = host.resident(plan.content_hash)
    assert resident is not None and segments.held() == [resident.segment]
    host.remove(plan.content_hash)
    segments.sync(host.residents(), pin=False)
    assert segments.held() == []
