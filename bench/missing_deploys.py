"""Deploys of N distinct models that do not exist, against one controller with the
default options and a real redis-server: what stays in Redis (desired state, failure
records, entries, claims, dead letters) and in the process, and how many warm-ups one
convergence pass starts.

    PYTHONPATH=$PWD python bench/missing_deploys.py 10000
"""
from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())

from tests.redis_server import RedisServer, redis_executable
from warmpool.config import ControllerOptions, Settings
from warmpool.contract.keys import RedisKeys
from warmpool.contract.redis_client import connect
from warmpool.controller.loop import Controller

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000

async def main(tmp: Path, server: RedisServer) -> None:
    settings = Settings.load(runtime_dir=tmp / "rt", cache_dir=tmp / "cache", node="n1")
    ctl = Controller(settings, connect(server.url), options=ControllerOptions(heartbeat_s=1))
    task = asyncio.create_task(ctl.run())
    await ctl.ready.wait()
    r = connect(server.url)
    keys = RedisKeys()
    t0 = time.perf_counter()
    pipe = r.pipeline(transaction=False)
    for i in range(N):
        pipe.xadd(keys.requests_stream, {"payload": json.dumps(
            {"action": "deploy", "uri": f"file://{tmp}/missing-{i}/"})})
    await pipe.execute()
    while True:
        info = await r.xinfo_groups(keys.requests_stream)
        if info and info[0]["pending"] == 0 and info[0]["last-delivered-id"] != b"0-0" and \
                info[0].get("lag", 1) == 0:
            break
        await asyncio.sleep(0.5)
    took = time.perf_counter() - t0
    started = await ctl.converge()
    print(f"deploys={N} handled_in_s={took:.1f} desired={await r.hlen(keys.desired('n1'))} "
          f"failures={await r.hlen(keys.desired_failures('n1'))} "
          f"converge_started={started} entries={await r.scard(keys.entries_index)} "
          f"claims={len([k async for k in r.scan_iter(match=keys.claim('*'))])} "
          f"dead={await r.xlen(keys.dead_stream)} "
          f"maxrss_mb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} "
          f"redis_used_mb={(await r.info('memory'))['used_memory']/2**20:.1f}")
    ctl.stop(grace_s=1)
    await task
    await r.aclose()

with tempfile.TemporaryDirectory() as d:
    server = RedisServer(redis_executable(), Path(d))
    server.start()
    try:
        asyncio.run(main(Path(d), server))
    finally:
        server.stop()
