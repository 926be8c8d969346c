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
    loading. The worker here accepts the load and never answers; the controller's tier
    talks to it on its own event loop, so cancelling the load closes the connection and
    nothing is left to wait for at exit."""
    code = textwrap.dedent("""
        import asyncio, os, socket, tempfile, threading
        import warmpool.workers.client as client
        from warmpool.config import Settings
        from warmpool.model.uri import parse_uri
        from warmpool.tiers.workers import WorkerTierOps
        from warmpool.workers.discovery import WorkerRecord

        path = os.path.join(tempfile.mkdtemp(), "stuck.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(1)
        accepted = threading.Event()
        held = []
        def accept():  # a worker that takes the request and never answers
            held.append(server.accept()[0])
            accepted.set()
        threading.Thread(target=accept, daemon=True).start()
        record = WorkerRecord("cuda0", "cuda:0", "0", os.getpid(), path, "auto")
        client.group_devices = lambda device, tp: [device]
        client.worker_for = lambda settings, device: record
        client.plan_model = None  # a plan is handed in below: nothing is listed

        class Plan:
            uri, content_hash = parse_uri("s3://b/m/"), "0" * 64
            def rank_layouts(self, *args):
                from warmpool.pool.layout import Layout
                return [Layout(self.content_hash, 4096, (), 4096)]

        async def main():
            tier = WorkerTierOps("cuda:0", Settings.load())
            load = client.load_on_workers
            client.load_on_workers = lambda uri, **kw: load(uri, plan=Plan(), **kw)
            task = asyncio.create_task(tier.load(parse_uri("s3://b/m/"), content_hash="0" * 64))
            await asyncio.to_thread(accepted.wait, 60)
            assert accepted.is_set()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert held[0].recv(1 << 20)  # the request had arrived
            assert held[0].recv(1) == b""  # and the tier closed the connection

        asyncio.run(main())
        print("exited")
    """)
    result = run_python(code, timeout=180)  # torch's import, on a loaded machine
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "exited"
