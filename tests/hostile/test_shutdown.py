"""Stopping: a second signal stops at once, and nothing blocks the exit for ever."""

from __future__ import annotations

import asyncio
import logging
import textwrap
from dataclasses import replace

import pytest

from tests.controller_harness import FAST, Harness, wait_until
from tests.pool_env import run_python

STOP_BOUND_S = 30.0  # a hang bound far below the grace period, not a speed assertion


async def test_a_second_stop_cuts_the_grace_period_short(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """The user gets: a second SIGTERM (``stop(grace_s=0)``, what the signal handler
    calls) ends a drain that the first one started with an hour's grace, at once; the
    stuck work is cancelled."""
    ctl = await harness.start(options=replace(FAST, shutdown_grace_s=3600.0))
    stuck = asyncio.Event()

    async def never_ends() -> None:
        stuck.set()
        await asyncio.sleep(3600)

    ctl._spawn(never_ends(), "stuck warm-up")
    await stuck.wait()
    task = next(t for c, t in harness.running if c is ctl)
    caplog.set_level(logging.INFO, logger="warmpool.controller.loop")
    ctl.stop()  # first signal: drain with the grace period

    async def draining() -> bool:
        return any(getattr(r, "event", None) == "draining" for r in caplog.records)

    await wait_until(draining, "the drain to start")
    assert not task.done()
    ctl.stop(grace_s=0)  # second signal
    await asyncio.wait_for(asyncio.shield(task), STOP_BOUND_S)
    assert not ctl._tasks


def test_a_gpu_load_stuck_in_its_thread_does_not_block_exit(settings: object) -> None:
    """The user gets: ``warmpool serve`` exits after a stop even while a worker is still
    loading (its blocking call runs in a thread the exit does not wait for)."""
    code = textwrap.dedent("""
        import asyncio, threading, time
        import warmpool.workers.client as client
        from warmpool.config import Settings
        from warmpool.controller.worker_bridge import WorkerBridge

        started = threading.Event()
        def stuck_load(*args, **kwargs):
            started.set()
            time.sleep(3600)  # a worker that never answers
        client.group_devices = lambda device, tp: [device]
        client.worker_for = lambda settings, device: None
        client.prefetch_via_workers = stuck_load

        async def main():
            bridge = WorkerBridge(Settings.load(), registry=None)
            task = asyncio.create_task(bridge.load("s3://b/m/", "0" * 64, device="cuda:0",
                                                   tp=1, sharding="replicated", loader="auto"))
            await asyncio.to_thread(started.wait, 60)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        asyncio.run(main())
        print("exited")
    """)
    result = run_python(code, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "exited"
