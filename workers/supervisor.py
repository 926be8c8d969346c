"""Starts one worker per device, notices when one dies, records the loss, restarts it.

A worker that dies (SIGKILL, an OOM kill, a driver fault) takes its buffers with it —
except what serving processes still map (cuda-vmm, shm-fd keep memory alive for them).
Its registry entries would otherwise claim ``warm`` forever, so the supervisor marks them
``lost`` as soon as it reaps the process, then restarts the worker after a backoff that
doubles on each quick death (a worker that crashes at start-up must not spin) and resets
once a worker has stayed up for a while.

``python -m warmpool.workers.supervisor --devices cuda:0,cuda:1`` (or ``warmpool workers
start``); without ``--devices`` it serves every visible GPU, or ``cpu:0`` where there is
none.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from warmpool.config import Settings, parse_bytes
from warmpool.errors import WorkerError
from warmpool.locks import try_lock
from warmpool.pool.registry.base import Registry, State
from warmpool.pool.registry.files import FileRegistry
from warmpool.workers.devices import DeviceSpec, device_uuid, parse_device, visible_cuda_devices
from warmpool.workers.discovery import read_records
from warmpool.workers.process import fast_exit
from warmpool.workers.protocol import socket_dir

log = logging.getLogger("warmpool.supervisor")

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
#: A worker that ran this long before dying restarts at once (backoff reset).
STABLE_AFTER_S = 60.0
STOP_GRACE_S = 10.0


@dataclass
class WorkerSpec:
    device: DeviceSpec
    capacity: int | None = None
    transport: str = "auto"
    headroom: int | None = None
    log_level: str = "INFO"

    def command(self, runtime_dir: Path) -> list[str]:
        cmd = [sys.executable, "-m", "warmpool.workers.worker", "--device", str(self.device),
               "--runtime-dir", str(runtime_dir), "--transport", self.transport,
               "--log-level", self.log_level, "--parent-pid", str(os.getpid())]
        if self.capacity is not None:
            cmd += ["--capacity", str(self.capacity)]
        if self.headroom is not None:
            cmd += ["--headroom", str(self.headroom)]
        return cmd


@dataclass
class Supervised:
    spec: WorkerSpec
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    backoff: float = BACKOFF_START_S
    restarts: int = 0
    deaths: list[tuple[float, int]] = field(default_factory=list)  # (when, returncode)


def default_devices() -> list[DeviceSpec]:
    return visible_cuda_devices() or [DeviceSpec("cpu", 0)]


def check_devices(devices: list[DeviceSpec]) -> None:
    """Raise :class:`WorkerError` for a CUDA device this machine cannot serve."""
    for device in devices:
        device_uuid(device)


class Supervisor:
    def __init__(self, specs: list[WorkerSpec], runtime_dir: Path, *,
                 registry: Registry | None = None) -> None:
        if len({s.device for s in specs}) != len(specs):
            raise WorkerError("each device may have only one worker")
        self.runtime_dir = runtime_dir
        self.dir = socket_dir(runtime_dir)
        self.registry = registry or FileRegistry(runtime_dir)
        self.workers = [Supervised(spec) for spec in specs]
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        # A device that cannot work fails here, once, rather than as a worker that dies
        # at start-up and is restarted forever.
        check_devices([w.spec.device for w in self.workers])
        lock_fd = try_lock(self.dir / "supervisor.lock")
        if lock_fd is None:
            raise WorkerError(f"a supervisor is already running for {self.runtime_dir}")
        try:
            loops = [asyncio.ensure_future(self._keep_alive(w)) for w in self.workers]
            await self._stop.wait()
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await asyncio.gather(*(self._terminate(w) for w in self.workers))
        finally:
            os.close(lock_fd)

    async def _keep_alive(self, worker: Supervised) -> None:
        while True:
            await self._start(worker)
            assert worker.process is not None
            code = await worker.process.wait()
            if self._stop.is_set():
                return
            ran = time.monotonic() - worker.started_at
            worker.deaths.append((time.time(), code))
            log.warning("worker for %s (pid %d) exited with %s after %.1f s", worker.spec.device,
                        worker.process.pid, _describe(code), ran)
            await self.mark_lost(worker.spec.device, f"worker died ({_describe(code)})")
            worker.backoff = BACKOFF_START_S if ran >= STABLE_AFTER_S else worker.backoff
            await asyncio.sleep(worker.backoff)
            worker.backoff = min(worker.backoff * 2, BACKOFF_MAX_S)
            worker.restarts += 1

    async def _start(self, worker: Supervised) -> None:
        # A session of its own: a terminal's Ctrl-C reaches the supervisor alone, which
        # then stops the workers in order (they die with it otherwise: --parent-pid).
        worker.process = await asyncio.create_subprocess_exec(
            *worker.spec.command(self.runtime_dir), stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True)
        worker.started_at = time.monotonic()
        log.info("started worker for %s: pid %d", worker.spec.device, worker.process.pid)

    async def mark_lost(self, device: DeviceSpec, why: str) -> int:
        """Every entry that claimed memory on ``device`` is gone with its worker."""
        marked = 0
        for entry in await self.registry.list():
            if entry.device == str(device) and (entry.state.active or entry.state == State.WARM):
                await self.registry.transition(entry, State.LOST, error=why, leases=0)
                marked += 1
        return marked

    async def _terminate(self, worker: Supervised) -> None:
        process = worker.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_S)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every worker has published its record (it is then listening)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = {w.process.pid for w in self.workers if w.process is not None}
            live = {r.pid for r in read_records(self.runtime_dir)}
            if len(pids) == len(self.workers) and pids <= live:
                return
            await asyncio.sleep(0.05)
        raise WorkerError(f"workers did not start within {timeout:g} s")


def _describe(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def parse_devices(text: str | None) -> list[DeviceSpec]:
    if not text:
        return default_devices()
    return [parse_device(part) for part in text.split(",") if part.strip()]


def describe_choice(devices: list[DeviceSpec], asked: str | None) -> str:
    """The devices a start serves and, when none were named, why those."""
    names = ", ".join(map(str, devices))
    if asked:
        return names
    if any(d.is_cuda for d in devices):
        return f"{names} (every visible GPU; --devices to choose)"
    return f"{names} (no CUDA GPU visible, so a CPU worker; --devices to choose)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m warmpool.workers.supervisor")
    parser.add_argument("--devices", default=None, help="e.g. cuda:0,cuda:1 or cpu:0")
    parser.add_argument("--runtime-dir", default=None)
    parser.add_argument("--capacity", default=None, help="Per-worker byte limit, e.g. 60GiB.")
    parser.add_argument("--transport", default="auto")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def supervise(devices: list[DeviceSpec], settings: Settings, *,
                    capacity: int | None = None, transport: str = "auto",
                    log_level: str = "INFO") -> None:
    """Run a supervisor in the foreground until SIGTERM or SIGINT."""
    specs = [WorkerSpec(d, capacity, transport, log_level=log_level) for d in devices]
    supervisor = Supervisor(specs, settings.runtime_dir)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, supervisor.stop)
    await supervisor.run()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.load(runtime_dir=args.runtime_dir)
    devices = parse_devices(args.devices)
    log.info("workers for %s", describe_choice(devices, args.devices))
    asyncio.run(supervise(devices, settings,
                          capacity=parse_bytes(args.capacity), transport=args.transport,
                          log_level=args.log_level.upper()))
    fast_exit(0)


if __name__ == "__main__":
    main()
