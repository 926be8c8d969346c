"""Engine-layout entries in a worker's buffer (device ``cpu:0``, shm-fd, in the test's
event loop): export into the worker's own allocation, attach by content hash with the key
checked, and the entry behaving as any other (capacity first, eviction, status), and an
exporter that goes away or keeps writing leaving nothing served.

Clients run in threads (they block), as an engine would call them. The CUDA variant
(device to device) runs on a GPU machine: ``pytest -m cuda``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.models import random_tensor
from tests.workers_env import ROOT, InProcessWorkers, same_bits, settings_for, worker_env
from warmpool.attachment import AttachedModel
from warmpool.config import Settings
from warmpool.engine_layouts import attach_engine_layout, export, export_sync
from warmpool.errors import CapacityError, WorkerError
from warmpool.pool.engine_key import EngineKey, ExportResult, layout_uri, plan_engine_layout
from warmpool.pool.registry.base import PoolEntry, State
from warmpool.pool.registry.files import FileRegistry
from warmpool.pool.views import tensor_views
from warmpool.workers import export_client
from warmpool.workers.buffers import Writable, open_writable
from warmpool.workers.client import evict_via_workers
from warmpool.workers.protocol import Channel
from warmpool.workers.worker import Worker

KEY = EngineKey(checkpoint="ab" * 32, engine="vllm", engine_version="0.32.0/cuda",
                dtype="bfloat16", quantization="none", tp_size=2, rank=1)
URI = "file:///models/tiny/"
DEVICE = "cpu:0"
StartWorker = Callable[..., Awaitable[tuple[Worker, Settings]]]


def processed_params() -> dict[str, torch.Tensor]:
    """Mixed dtypes and shapes: a 0-d scalar, an empty tensor, a non-contiguous one."""
    gen = torch.Generator().manual_seed(11)
    return {
        "model.layers.0.self_attn.qkv_proj.weight": random_tensor((48, 16), torch.bfloat16, gen),
        "model.norm.weight": random_tensor((16,), torch.float32, gen),
        "lm_head.qweight": random_tensor((5, 7), torch.int8, gen),
        "scale": random_tensor((), torch.float32, gen),
        "empty": random_tensor((0, 3), torch.bfloat16, gen),
        "transposed": random_tensor((9, 4), torch.float32, gen).t(),
    }


@pytest.fixture
async def start_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                       ) -> AsyncIterator[StartWorker]:
    workers = InProcessWorkers(settings_for(tmp_path))
    monkeypatch.setenv("WARMPOOL_RUNTIME_DIR", str(workers.settings.runtime_dir))  # CLI children
    monkeypatch.setenv("WARMPOOL_CACHE_DIR", str(workers.settings.cache_dir))

    async def start(capacity: int | None = None, device: str = DEVICE
                    ) -> tuple[Worker, Settings]:
        return await workers.start(device, capacity), workers.settings

    yield start
    await workers.stop_all()


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def entry_of(settings: Settings, key: EngineKey = KEY,
                   device: str = DEVICE) -> PoolEntry:
    entry = await FileRegistry(settings.runtime_dir).get(f"{key.content_hash}@{device}")
    assert entry is not None
    return entry


async def export_to(settings: Settings, key: EngineKey = KEY,
                    params: dict[str, torch.Tensor] | None = None) -> ExportResult:
    params = processed_params() if params is None else params
    return await export(key, params.items(), checkpoint_uri=URI, settings=settings,
                        device=DEVICE)


async def attach_layout(settings: Settings, key: EngineKey = KEY,
                        device: str = DEVICE) -> AttachedModel | None:
    return await asyncio.to_thread(attach_engine_layout, key, settings, "test",
                                   device=device)


def begin_raw(settings: Settings, key: EngineKey = KEY
              ) -> tuple[Channel, Writable | None, dict[str, Any]]:
    """``export_begin`` by hand, as a client that may then misbehave."""
    from warmpool.workers.client import worker_for

    layout = plan_engine_layout(key, processed_params().items())
    channel = Channel.connect(Path(worker_for(settings, DEVICE).socket))
    reply, fds = channel.request({"op": "export_begin", "uri": layout_uri(URI, key),
                                  "content_hash": key.content_hash,
                                  "layout": layout.to_json(), "engine": key.to_json()},
                                 timeout=30)
    if reply.get("already_warm"):
        return channel, None, reply
    return channel, open_writable(reply["transport"], reply["handle"], fds, reply["uuid"]), reply


def fill(writable: Writable, key: EngineKey = KEY) -> None:
    params = processed_params()
    assert writable.tensor is not None
    views = tensor_views(writable.tensor, plan_engine_layout(key, params.items()))
    for name, tensor in params.items():
        views[name].copy_(tensor)
    del views


# --- the round trip ----------------------------------------------------------------


async def test_an_export_attaches_bit_exact_as_views_of_one_buffer(
        start_worker: StartWorker) -> None:
    worker, settings = await start_worker()
    result = await export_to(settings)
    assert not result.already_warm and result.entry.state == State.WARM
    model = await attach_layout(settings)
    assert model is not None
    with model:
        params = processed_params()
        assert sorted(model) == sorted(params)
        for name, tensor in params.items():
            assert same_bits(model[name], tensor), name
        # Every view lies inside the one attached buffer, which is the entry's size.
        storages = {model[n].untyped_storage().data_ptr() for n in model}
        assert len(storages) == 1
        [start] = storages
        size = model[next(iter(model))].untyped_storage().nbytes()
        assert size == model.layout.total_bytes == worker.residents[KEY.content_hash].nbytes
        for name in model:
            view = model[name]
            if view.numel() == 0:
                continue  # torch gives an empty tensor no address (data_ptr() == 0)
            assert start <= view.data_ptr()
            assert view.data_ptr() + view.numel() * view.element_size() <= start + size, name
        assert model.device == DEVICE and model.content_hash == KEY.content_hash
    entry = await entry_of(settings)
    assert entry.state == State.WARM and entry.engine == KEY.to_json()
    assert entry.loader == "export:vllm" and entry.tensors == len(processed_params())
    assert entry.uri == layout_uri(URI, KEY) and entry.transport == "shm-fd"
    assert result.entry.engine == KEY.to_json()


async def test_export_sync_takes_the_worker_path_too(start_worker: StartWorker) -> None:
    worker, settings = await start_worker()
    result = await asyncio.to_thread(export_sync, KEY, processed_params().items(),
                                     checkpoint_uri=URI, settings=settings, device=DEVICE)
    assert result.entry.device == DEVICE and list(worker.residents) == [KEY.content_hash]


async def test_exporting_the_same_key_again_is_already_warm_with_no_second_buffer(
        start_worker: StartWorker) -> None:
    worker, settings = await start_worker()
    await export_to(settings)
    buffer = worker.residents[KEY.content_hash].buffer
    again = await export_to(settings)
    assert again.already_warm and again.entry.state == State.WARM
    assert list(worker.residents) == [KEY.content_hash]
    assert worker.residents[KEY.content_hash].buffer is buffer


async def test_a_second_exporter_of_an_entry_being_written_gets_the_first_ones_bytes(
        start_worker: StartWorker) -> None:
    worker, settings = await start_worker()
    channel, writable, _ = await asyncio.to_thread(begin_raw, settings)
    assert writable is not None
    second = asyncio.ensure_future(export_to(settings))
    try:
        await asyncio.to_thread(fill, writable)
        writable.release()
        await asyncio.to_thread(channel.request,
                                {"op": "export_commit", "content_hash": KEY.content_hash}, 30)
    finally:
        channel.close()
    result = await second
    assert result.already_warm and len(worker.residents) == 1


# --- misses --------------------------------------------------------------------------


async def test_a_different_key_misses_and_the_miss_is_logged_with_the_difference(
        start_worker: StartWorker, caplog: pytest.LogCaptureFixture) -> None:
    worker, settings = await start_worker()
    await export_to(settings)
    with caplog.at_level(logging.INFO, logger="warmpool.engine_layouts"):
        assert await attach_layout(settings, replace(KEY, dtype="float16")) is None
    [message] = [r.getMessage() for r in caplog.records if "no engine layout" in r.message]
    assert "dtype 'float16' != 'bfloat16'" in message and DEVICE in message
    assert not worker.residents[KEY.content_hash].leases


async def test_an_entry_whose_key_differs_from_the_asked_one_is_not_used(
        start_worker: StartWorker, caplog: pytest.LogCaptureFixture) -> None:
    worker, settings = await start_worker()
    await export_to(settings)
    resident = worker.residents[KEY.content_hash]
    # A registry record that disagrees with the hash (as a buggy or foreign writer might
    # leave): the attach sees the key the worker holds and refuses it.
    resident.entry = replace(resident.entry, engine={**KEY.to_json(), "dtype": "float16"})
    with caplog.at_level(logging.INFO, logger="warmpool.engine_layouts"):
        assert await attach_layout(settings) is None
    assert any("has key" in r.getMessage() for r in caplog.records)
    await until(lambda: not resident.leases)  # the lease it took was given back


async def test_no_worker_on_the_device_is_a_logged_miss(
        start_worker: StartWorker, caplog: pytest.LogCaptureFixture) -> None:
    _, settings = await start_worker()
    with caplog.at_level(logging.INFO, logger="warmpool.engine_layouts"):
        assert await attach_layout(settings, device="cpu:1") is None
    assert any("no engine layout" in r.getMessage() and "cpu:1" in r.getMessage()
               for r in caplog.records)


# --- exporters that go away or misbehave ---------------------------------------------

CRASHING_EXPORTER = """
import sys
from pathlib import Path
from tests.test_engine_layout_worker import begin_raw, fill
from warmpool.config import Settings
channel, writable, _ = begin_raw(Settings.load())
fill(writable)
print("begun", flush=True)
sys.stdin.read()  # killed here: mapped, written, never committed
"""


async def test_an_exporter_that_dies_before_commit_leaves_nothing_and_a_failed_entry(
        start_worker: StartWorker) -> None:
    worker, settings = await start_worker()
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_EXPORTER], cwd=ROOT,
                            env=worker_env(settings.runtime_dir), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        assert line.strip() == "begun"
        assert (await entry_of(settings)).state == State.STREAMING
        assert not worker.residents[KEY.content_hash].warm
        proc.send_signal(signal.SIGKILL)
    finally:
        await asyncio.to_thread(proc.wait)
    for _ in range(1000):  # until the worker has seen the connection end and said so
        entry = await entry_of(settings)
        if entry.state != State.STREAMING:
            break
        await asyncio.sleep(0.01)
    assert KEY.content_hash not in worker.residents
    assert entry.state == State.FAILED and "export abandoned" in (entry.error or "")
    assert "closed its connection before export_commit" in (entry.error or "")
    assert await attach_layout(settings) is None
    # The worker keeps serving: the next exporter writes the entry whole.
    assert not (await export_to(settings)).already_warm
    model = await attach_layout(settings)
    assert model is not None
    with model:
        assert all(same_bits(model[n], t) for n, t in processed_params().items())


async def test_an_abort_frees_the_buffer_and_records_the_exporters_reason(
        start_worker: StartWorker) -> None:
    worker, settings = await start_worker()
    channel, writable, _ = await asyncio.to_thread(begin_raw, settings)
    try:
        assert writable is not None and KEY.content_hash in worker.residents
        writable.release()
        await asyncio.to_thread(channel.request, {"op": "export_abort", "reason": "OOM here",
                                                  "content_hash": KEY.content_hash}, 30)
    finally:
        channel.close()
    assert worker.residents == {}
    entry = await entry_of(settings)
    assert entry.state == State.FAILED
    assert entry.error == "export abandoned by the exporter: OOM here"


class Shrinking(torch.Tensor):
    """Planned at its own size, copied from a tensor of another: the copy fails after
    export_begin, as an engine's might."""

    def detach(self) -> torch.Tensor:
        return torch.zeros(5)


async def test_a_copy_that_fails_aborts_the_export_with_its_error(
        start_worker: StartWorker) -> None:
    worker, settings = await start_worker()
    params = processed_params()
    params["model.norm.weight"] = params["model.norm.weight"].as_subclass(Shrinking)
    with pytest.raises(RuntimeError):
        await export_to(settings, params=params)
    assert worker.residents == {}
    entry = await entry_of(settings)
    assert entry.state == State.FAILED
    assert (entry.error or "").startswith("export abandoned by the exporter: RuntimeError")


async def test_a_commit_while_the_buffer_is_still_mapped_writable_is_refused(
        start_worker: StartWorker) -> None:
    worker, settings = await start_worker()
    channel, writable, _ = await asyncio.to_thread(begin_raw, settings)
    try:
        assert writable is not None
        await asyncio.to_thread(fill, writable)  # and keeps its writable mapping
        with pytest.raises(WorkerError, match="still mapped writable"):
            await asyncio.to_thread(channel.request, {"op": "export_commit",
                                                      "content_hash": KEY.content_hash}, 30)
    finally:
        channel.close()
        writable.release()  # type: ignore[union-attr]
    assert worker.residents == {}
    entry = await entry_of(settings)
    assert entry.state == State.FAILED and "still mapped writable" in (entry.error or "")


# --- an entry like any other ----------------------------------------------------------


async def test_an_export_larger_than_the_worker_is_refused_before_any_byte_is_written(
        start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch) -> None:
    worker, settings = await start_worker(capacity=4096)
    opened: list[str] = []
    real = export_client.open_writable

    def spy(transport: str, *rest: Any) -> Writable:
        opened.append(transport)
        return real(transport, *rest)

    monkeypatch.setattr(export_client, "open_writable", spy)
    big = {"w": torch.zeros(64 << 10, dtype=torch.uint8)}
    with pytest.raises(CapacityError) as caught:
        await export_to(settings, params=big)
    assert caught.value.needed >= 64 << 10 and caught.value.free <= 4096
    assert opened == [] and worker.residents == {}
    entry = await entry_of(settings)
    assert entry.state == State.FAILED and entry.engine == KEY.to_json()


async def test_an_engine_layout_is_evicted_by_content_hash_like_any_entry(
        start_worker: StartWorker) -> None:
    worker, settings = await start_worker()
    await export_to(settings)
    evicted = await asyncio.to_thread(evict_via_workers, KEY.content_hash, device=DEVICE,
                                      settings=settings, grace_s=1)
    assert evicted["state"] == "evicted" and evicted["engine"] == KEY.to_json()
    assert worker.residents == {} and await attach_layout(settings) is None


async def test_an_unleased_engine_layout_makes_room_for_a_new_one(
        start_worker: StartWorker) -> None:
    worker, settings = await start_worker(capacity=6 << 10)
    other = replace(KEY, rank=0)
    big = {"w": torch.ones(4 << 10, dtype=torch.uint8)}
    await export_to(settings, params=big)
    await export_to(settings, other, params={"w": torch.full((4 << 10,), 7, dtype=torch.uint8)})
    assert list(worker.residents) == [other.content_hash]
    assert (await entry_of(settings)).state == State.EVICTED


async def test_status_lists_a_worker_engine_layout_with_its_key(
        start_worker: StartWorker) -> None:
    _, settings = await start_worker()
    await export_to(settings)
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "warmpool.cli", "status", "--json"],
        capture_output=True, text=True, cwd=ROOT, env=worker_env(settings.runtime_dir),
        timeout=120)
    assert proc.returncode == 0, proc.stderr
    [entry] = [e for e in json.loads(proc.stdout) if e["device"] == DEVICE]
    assert entry["engine"] == KEY.to_json() and entry["state"] == "warm"
    assert entry["content_hash"] == KEY.content_hash and entry["loader"] == "export:vllm"


# --- CUDA: device to device ------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
async def test_on_cuda_the_export_copies_device_to_device_and_attaches_as_views(
        start_worker: StartWorker) -> None:
    worker, settings = await start_worker(device="cuda:0")
    params = {n: t.to("cuda:0") for n, t in processed_params().items()}
    result = await export(KEY, params.items(), checkpoint_uri=URI, settings=settings,
                          device="cuda:0")
    assert result.entry.state == State.WARM and result.entry.engine == KEY.to_json()
    model = await attach_layout(settings, device="cuda:0")
    assert model is not None
    with model:
        first = model.layout.slots[0]
        start = model[first.name].data_ptr() - first.offset
        for name, tensor in params.items():
            view = model[name]
            assert view.device.type == "cuda" and same_bits(view, tensor), name
            assert start <= view.data_ptr() <= start + model.layout.total_bytes, name
