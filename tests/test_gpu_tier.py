"""The GPU tier on a real GPU: CUDA VMM and legacy IPC buffers shared with a second
process, attach on ``cuda:0``, promotion from the host tier, capacity, UUID mapping.

Skipped without CUDA; run on the lent GPU: ``pytest -m cuda tests/test_gpu_tier.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import pytest
import torch

from tests.models import write_model
from tests.workers_env import (
    ROOT,
    assert_bit_exact,
    direct_workers,
    publish_host_copy,
    reference,
    settings_for,
    write_even_model,
)
from warmpool.errors import CapacityError
from warmpool.pool.host import HostTier
from warmpool.workers.client import prefetch_via_workers
from warmpool.workers.devices import DeviceSpec, device_uuid
from warmpool.workers.gpu_attach import attach_gpu

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MiB = 1 << 20


def vmm_available() -> bool:
    from warmpool.workers import cuda_vmm

    return cuda_vmm.available(0)


def pattern(n: int) -> torch.Tensor:
    return (torch.arange(n, device="cuda:0") % 251).to(torch.uint8)


def run_child(code: str, *, pass_fds: tuple[int, ...] = (), env: dict[str, str] | None = None
              ) -> str:
    base = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          env={**base, **(env or {})}, pass_fds=pass_fds,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_vmm_buffer_is_shared_read_only_with_a_second_process(tmp_path: Path) -> None:
    if not vmm_available():
        pytest.skip("cuda-python missing or no VMM/POSIX-fd support on this GPU")
    from warmpool.workers.cuda_vmm import VmmBuffer

    n = 3 * MiB + 123
    buffer = VmmBuffer(0, n)
    assert buffer.tensor is not None
    buffer.tensor.copy_(pattern(n))
    buffer.seal()
    export = buffer.export()
    (fd,) = export.fds
    uuid = device_uuid(DeviceSpec("cuda", 0))
    out = run_child(f"""
        import torch
        from warmpool.workers.cuda_vmm import open_vmm
        from warmpool.workers.devices import local_index
        flat = open_vmm({json.dumps(export.handle)}, [{fd}], local_index({uuid!r}))
        expected = (torch.arange({n}, device="cuda:0") % 251).to(torch.uint8)
        print("equal", bool(torch.equal(flat, expected)), flat.data_ptr() != 0, flush=True)
        try:
            flat[:16].fill_(7)
            torch.cuda.synchronize()
            print("write allowed", flush=True)
        except RuntimeError:
            print("write refused", flush=True)
        """, pass_fds=(fd,))
    export.close()
    assert "equal True True" in out
    assert "write refused" in out
    buffer.free()


def test_vmm_memory_outlives_the_exporter(tmp_path: Path) -> None:
    """The driver counts references: an importer keeps the bytes after the exporter frees."""
    if not vmm_available():
        pytest.skip("cuda-python missing or no VMM/POSIX-fd support on this GPU")
    from warmpool.workers.cuda_vmm import VmmBuffer, open_vmm

    n = 2 * MiB
    buffer = VmmBuffer(0, n)
    buffer.tensor.copy_(pattern(n))  # type: ignore[union-attr]
    buffer.seal()
    export = buffer.export()
    imported = open_vmm(export.handle, export.fds, 0)
    buffer.free()
    torch.cuda.synchronize()
    assert torch.equal(imported, pattern(n))


def test_ipc_buffer_is_shared_with_a_second_process_from_plain_fields(tmp_path: Path) -> None:
    from warmpool.workers.cuda_ipc import IpcBuffer

    n = 5 * MiB + 7
    buffer = IpcBuffer(0, n)
    buffer.tensor.copy_(pattern(n))  # type: ignore[union-attr]
    buffer.seal()
    export = buffer.export()
    assert export.fds == [] and all(isinstance(v, (bytes, int, bool))
                                    for v in export.handle.values())
    handle_file = tmp_path / "handle.msgpack"
    handle_file.write_bytes(msgpack.packb(export.handle, use_bin_type=True))
    uuid = device_uuid(DeviceSpec("cuda", 0))
    out = run_child(f"""
        import msgpack, torch
        from pathlib import Path
        from warmpool.workers.cuda_ipc import open_ipc
        from warmpool.workers.devices import local_index
        handle = msgpack.unpackb(Path({str(handle_file)!r}).read_bytes(), raw=False)
        flat = open_ipc(handle, local_index({uuid!r}))
        expected = (torch.arange({n}, device="cuda:0") % 251).to(torch.uint8)
        print("equal", bool(torch.equal(flat, expected)), flush=True)
        """)
    assert "equal True" in out
    buffer.free()


@pytest.mark.parametrize("transport", ["cuda-vmm", "cuda-ipc"])
def test_attach_on_cuda_is_bit_exact_and_fast(tmp_path: Path, transport: str) -> None:
    if transport == "cuda-vmm" and not vmm_available():
        pytest.skip("cuda-python missing or no VMM/POSIX-fd support on this GPU")
    settings = settings_for(tmp_path)
    model = tmp_path / "m"
    expected = write_model(model, shards=3)
    with direct_workers(settings, ["cuda:0"], transport=transport):
        result = prefetch_via_workers(str(model), device="cuda:0", settings=settings)
        assert result["transport"] == transport
        started = time.perf_counter()
        with attach_gpu(str(model), "cuda:0", settings) as attached:
            elapsed = time.perf_counter() - started
            assert attached.transport == transport
            assert all(t.device == torch.device("cuda", 0) for t in attached.tensors.values())
            assert_bit_exact(attached.tensors, expected)
        print(f"{transport} attach: {elapsed * 1e3:.2f} ms")
        # A second serving process attaches too (and sees the same bytes).
        out = run_child(f"""
            from pathlib import Path
            from tests.workers_env import assert_bit_exact, reference
            from warmpool.config import Settings
            from warmpool.workers.gpu_attach import attach_gpu
            with attach_gpu({str(model)!r}, "cuda:0", Settings.load()) as attached:
                assert_bit_exact(attached.tensors, reference(Path({str(model)!r})))
                print("verified", attached.transport)
            """, env={"WARMPOOL_RUNTIME_DIR": str(settings.runtime_dir)})
        assert f"verified {transport}" in out


@pytest.mark.parametrize("loader", ["pread", "native"])
def test_other_loaders_fill_a_device_buffer_bit_exactly(tmp_path: Path, loader: str) -> None:
    """pread (pinned staging, async copies on per-thread streams) and native ranged reads
    land the same bytes as safetensors reads, whatever the chunking."""
    settings = settings_for(tmp_path)
    model = tmp_path / "m"
    expected = write_model(model, shards=3)
    with direct_workers(settings, ["cuda:0"]):
        result = prefetch_via_workers(str(model), device="cuda:0", settings=settings,
                                      loader=loader)
        assert result["loader"] == loader
        with attach_gpu(str(model), "cuda:0", settings) as attached:
            assert_bit_exact(attached.tensors, expected)


def test_promotion_from_the_host_tier_uploads_without_reading_storage(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    model = tmp_path / "m"
    expected = write_even_model(model, files=2, per_file=4, tensor_bytes=1 * MiB)
    plan = asyncio.run(publish_host_copy(settings, model))
    try:
        for weights in model.glob("*.safetensors"):
            weights.unlink()
        with direct_workers(settings, ["cuda:0"]):
            result = prefetch_via_workers(str(model), device="cuda:0", settings=settings,
                                          plan=plan)
            assert result["loader"] == "host"
            with attach_gpu(plan.content_hash, "cuda:0", settings) as attached:
                assert_bit_exact(attached.tensors, expected)
    finally:
        HostTier(settings.runtime_dir).remove(plan.content_hash)


def test_a_model_that_does_not_fit_is_refused_with_numbers(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    model = tmp_path / "m"
    write_even_model(model, files=2, per_file=4, tensor_bytes=1 * MiB)
    with direct_workers(settings, ["cuda:0"], capacity="4MiB"):
        with pytest.raises(CapacityError) as caught:
            prefetch_via_workers(str(model), device="cuda:0", settings=settings)
    assert caught.value.needed >= 8 * MiB and caught.value.free <= 4 * MiB


def test_a_device_is_found_by_uuid_whatever_cuda_visible_devices_says(tmp_path: Path) -> None:
    index = torch.cuda.device_count() - 1
    uuid = device_uuid(DeviceSpec("cuda", index))
    out = run_child("""
        from warmpool.workers.devices import DeviceSpec, device_uuid
        print(device_uuid(DeviceSpec("cuda", 0)))
        """, env={"CUDA_VISIBLE_DEVICES": f"GPU-{uuid}"})
    assert out.strip() == uuid


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_replicated_nccl_group_splits_the_reads(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    model = tmp_path / "m"
    expected = write_even_model(model, files=2, per_file=8, tensor_bytes=4 * MiB)
    total = sum(t.numel() * t.element_size() for t in expected.values())
    with direct_workers(settings, ["cuda:0", "cuda:1"]):
        result = prefetch_via_workers(str(model), device="cuda:0", tp=2, settings=settings)
        assert result["loader"] == "runai-distributed"
        for rank in result["ranks"]:
            assert 0.3 * total <= int(rank["read_bytes"]) <= 0.7 * total + MiB
        for device in ("cuda:0", "cuda:1"):
            with attach_gpu(str(model), device, settings) as attached:
                assert_bit_exact(attached.tensors, reference(model))
