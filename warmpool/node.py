"""``warmpool serve``: the node — its controller, GPU workers, relays and metrics, wired
and supervised. It sits above :mod:`warmpool.controller` and :mod:`warmpool.relay`, which
know nothing of each other's processes.

Order of things: settings → Redis (configured, or embedded and announced as such) →
metrics endpoint → relays (the config's ``relays:``) → GPU workers (where there are
GPUs) → controller. SIGTERM or SIGINT stops taking work, lets in-flight work finish for
a grace period and abandons the rest (streams are cancelled, partial segments
discarded, unacknowledged stream entries left for the next controller), then exits 0.
A second signal skips the grace period.

Logs are JSON lines on stderr (:mod:`warmpool.logs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from warmpool.config import ControllerOptions, Settings
from warmpool.contract.redis_client import connect
from warmpool.controller.embedded_redis import EmbeddedRedis
from warmpool.controller.loop import Controller
from warmpool.controller.metrics import Metrics
from warmpool.errors import ConfigError
from warmpool.relay.metrics import RelayMetrics
from warmpool.relay.spec import RelaySpec, parse_specs, start_relays

log = logging.getLogger("warmpool.node")


async def serve(settings: Settings, *, options: ControllerOptions | None = None) -> int:
    """Run the node's controller until SIGTERM/SIGINT; the exit code."""
    options = options or ControllerOptions.load(settings.controller)
    relay_specs = parse_specs(settings.relays)  # a bad relay setting stops us before anything runs
    embedded = None
    url = settings.redis_url
    if not url:
        embedded = EmbeddedRedis(settings.runtime_dir)
        url = await asyncio.to_thread(embedded.start)  # waits up to seconds for the server
    redis = connect(url, name=f"warmpool-{settings.node}")
    metrics = Metrics()
    controller = Controller(settings, redis, options=options, metrics=metrics)
    workers = _start_workers(settings, controller)
    _on_signals(controller)
    relays: list[asyncio.Task[None]] = []
    try:
        _serve_metrics(metrics, settings.metrics_port)
        relays = _start_relays(relay_specs, redis, controller, metrics)
        if workers is not None:
            await _workers_ready(workers[0])
        await controller.run()
    finally:
        controller.stopping.set()
        await asyncio.gather(*relays, return_exceptions=True)
        if workers is not None:
            workers[0].stop()
            await asyncio.gather(workers[1], return_exceptions=True)
        metrics.close()
        await redis.aclose()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
    return 0


def _serve_metrics(metrics: Metrics, port: int) -> None:
    try:
        metrics.serve(port)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on port {port}: {exc.strerror}; choose "
                          "another with --metrics-port (0: any free port, -1: off)") from None


def _start_relays(specs: list[RelaySpec], redis: Any, controller: Controller,
                  metrics: Metrics) -> list[asyncio.Task[None]]:
    """The config file's relays, writing into this controller's Redis and reporting on its
    metrics endpoint; they stop when the controller does."""
    if not specs:
        return []
    return start_relays(specs, redis, controller.keys, RelayMetrics(metrics.registry),
                        controller.node, controller.watch, controller.stopping)


def _on_signals(controller: Controller) -> None:
    loop = asyncio.get_running_loop()
    seen: list[int] = []

    def handle(sig: signal.Signals) -> None:
        seen.append(sig)
        grace = 0.0 if len(seen) > 1 else None
        log.info("%s: stopping%s", sig.name, " now" if grace == 0 else "",
                 extra={"event": "signal", "signal": sig.name})
        controller.stop(grace_s=grace)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle, sig)


def _start_workers(settings: Settings, controller: Controller) -> Any:
    """Supervise one GPU worker per device: ``WARMPOOL_WORKERS`` = ``auto`` (every visible
    GPU; none on a host without one — the host tier needs no worker), ``none``, or a
    list such as ``cuda:0,cuda:1``."""
    wanted = os.environ.get("WARMPOOL_WORKERS", "auto").strip()
    if wanted == "none":
        return None
    try:
        from warmpool.workers.devices import visible_cuda_devices
        from warmpool.workers.supervisor import Supervisor, WorkerSpec, parse_devices
    except ImportError:
        return None
    devices = visible_cuda_devices() if wanted == "auto" else parse_devices(wanted)
    if not devices:
        return None
    supervisor = Supervisor([WorkerSpec(d) for d in devices], settings.runtime_dir)
    task = asyncio.create_task(supervisor.run(), name="workers")
    task.add_done_callback(lambda t: _workers_ended(t, controller))
    log.info("supervising workers for %s", ", ".join(map(str, devices)),
             extra={"event": "workers", "devices": [str(d) for d in devices]})
    return supervisor, task


async def _workers_ready(supervisor: Any, timeout_s: float = 120.0) -> None:
    """GPU requests that arrive before the workers listen would fail: wait for them (a
    worker that does not come up is logged; the host tier serves regardless)."""
    try:
        await supervisor.wait_ready(timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - WorkerError, or the supervisor's own failure
        log.error("GPU workers not ready: %s; serving the host tier only until they are",
                  exc, extra={"event": "workers_not_ready"})


def _workers_ended(task: asyncio.Task[None], controller: Controller) -> None:
    if task.cancelled() or controller.stopping.is_set():
        return
    with contextlib.suppress(asyncio.InvalidStateError):
        exc = task.exception()
        if exc is not None:
            log.error("worker supervisor failed: %s", exc, extra={"event": "workers_failed"})
