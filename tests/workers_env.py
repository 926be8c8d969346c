"""Helpers for the worker tests (no tests here): models to load, workers to run.

Real worker processes are started through the real supervisor
(``python -m warmpool.workers.supervisor``) with ``cpu:N`` devices, so fd passing,
leases and supervision run for real on a machine without a GPU.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file

from tests.poll import poll
from warmpool.config import Settings
from warmpool.loading.streaming import fill_buffer
from warmpool.model.uri import parse_uri
from warmpool.pool.host import HostTier
from warmpool.workers.devices import parse_device
from warmpool.workers.discovery import read_records
from warmpool.workers.plan import ModelPlan, plan_model
from warmpool.workers.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().cpu(), b.detach().cpu()
    return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


class InProcessWorkers:
    """Workers serving in the test's own event loop (the in-process tests): started one
    by one, all stopped by :meth:`stop_all`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(self, device: str = "cpu:0", capacity: int | None = None) -> Worker:
        worker = Worker(parse_device(device), self.settings.runtime_dir,
                        settings=self.settings, capacity=capacity, headroom=0)
        task = asyncio.create_task(worker.serve())
        while worker.record is None:
            assert not task.done(), task
            await asyncio.sleep(0.01)
        self.running.append((worker, task))
        return worker

    async def stop_all(self) -> None:
        for worker, task in self.running:
            worker.stop()
            await asyncio.wait_for(task, 10)


def assert_bit_exact(tensors: object, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(tensors) == sorted(expected)  # type: ignore[call-overload]
    for name, tensor in expected.items():
        assert same_bits(tensors[name], tensor), name  # type: ignore[index]


def reference(model_dir: Path, files: list[str] | None = None) -> dict[str, torch.Tensor]:
    """What safetensors itself reads from the same files."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        if files is None or file.name in files:
            tensors.update(load_file(str(file)))
    return tensors


def write_even_model(directory: Path, *, files: int = 2, per_file: int = 8,
                     tensor_bytes: int = 64 << 10, seed: int = 0,
                     names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Equal-sized bf16 tensors: a byte-balanced split across ranks is then possible, so
    each rank's share of the reads can be checked against 1/N."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    expected: dict[str, torch.Tensor] = {}
    for f in range(files):
        tensors = {}
        for i in range(per_file):
            raw = torch.randint(0, 1 << 15, (tensor_bytes // 2,), generator=gen,
                                dtype=torch.int16)
            tensors[f"layers.{f}.w{i}"] = raw.view(torch.bfloat16).reshape(-1, 64)
        name = (names[f] if names else f"model-{f + 1:05d}-of-{files:05d}.safetensors")
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        expected.update(tensors)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return expected


def write_sharded_model(directory: Path, *, ranks: int = 2, parts: int = 2
                        ) -> list[dict[str, torch.Tensor]]:
    """vLLM's sharded-state names: ``model-rank-{rank}-part-{part}.safetensors``; tensor
    names repeat across ranks (each rank holds its own slice of the same weights)."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(7)
    per_rank: list[dict[str, torch.Tensor]] = []
    for rank in range(ranks):
        mine: dict[str, torch.Tensor] = {}
        for part in range(parts):
            tensors = {f"layers.{part}.w{i}": torch.randn(32 + rank, 16, generator=gen)
                       .to(torch.bfloat16) for i in range(3)}
            save_file(tensors, str(directory / f"model-rank-{rank}-part-{part}.safetensors"))
            mine.update(tensors)
        per_rank.append(mine)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return per_rank


async def publish_host_copy(settings: Settings, model_dir: Path,
                            arena_chunk: int | None = None) -> ModelPlan:
    """Put ``model_dir`` on the host tier (a published shared-memory segment, or chunks
    of the host arena) with the host tier's own API, independent of the prefetch
    pipeline."""
    plan = await plan_model(parse_uri(str(model_dir)), settings.cache_dir)
    host = HostTier(settings.runtime_dir, arena_chunk)
    layout = plan.layout()
    segment = host.create(plan.content_hash, layout.total_bytes)
    await fill_buffer(plan.uri, layout, segment.buffer, loader="native")
    segment.close()
    host.publish(segment, str(plan.uri), layout, time.time())
    return plan


def worker_env(runtime_dir: Path) -> dict[str, str]:
    env = {**os.environ, "WARMPOOL_RUNTIME_DIR": str(runtime_dir),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return env


def settings_for(base: Path) -> Settings:
    return Settings(runtime_dir=base / "rt", cache_dir=base / "cache")


@contextmanager
def supervised_workers(settings: Settings, devices: str, *, capacity: str | None = None,
                       timeout: float = 60.0) -> Iterator[subprocess.Popen[bytes]]:
    """A supervisor (and its workers) for ``devices``; stopped with SIGTERM afterwards."""
    cmd = [sys.executable, "-m", "warmpool.workers.supervisor", "--devices", devices,
           "--runtime-dir", str(settings.runtime_dir), "--log-level", "WARNING"]
    if capacity:
        cmd += ["--capacity", capacity]
    proc = subprocess.Popen(cmd, env=worker_env(settings.runtime_dir), cwd=ROOT)
    try:
        wanted = len(devices.split(","))
        poll(lambda: len(read_records(settings.runtime_dir)) >= wanted
                 if settings.runtime_dir.exists() else False,
                 timeout=timeout, what=f"{wanted} worker(s) to listen")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def direct_workers(settings: Settings, devices: list[str], *, capacity: str | None = None,
                   transport: str = "auto", timeout: float = 60.0
                   ) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Worker processes started directly (no supervisor): cheaper where supervision is
    not what a test is about."""
    procs = []
    for device in devices:
        cmd = [sys.executable, "-m", "warmpool.workers.worker", "--device", device,
               "--runtime-dir", str(settings.runtime_dir), "--log-level", "WARNING",
               "--transport", transport]
        if capacity:
            cmd += ["--capacity", capacity]
        procs.append(subprocess.Popen(cmd, env=worker_env(settings.runtime_dir), cwd=ROOT))
    try:
        poll(lambda: len(read_records(settings.runtime_dir)) >= len(devices),
                 timeout=timeout, what=f"{len(devices)} worker(s) to listen")
        yield procs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_client(code: str, runtime_dir: Path) -> subprocess.Popen[str]:
    """A separate serving process running ``code``; stdout is a pipe of text lines."""
    return subprocess.Popen([sys.executable, "-c", code], env=worker_env(runtime_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
