"""Faults at awkward moments: SIGKILL of a prefetching process, the S3 server killed in
the middle of a stream, Redis killed under a running controller.

Every case: nothing half-loaded is ever attachable, nothing is left that the next run
does not clean up, and the next attempt ends warm and bit-exact.
"""

from __future__ import annotations

import json
import signal
import textwrap
from pathlib import Path

import pytest
import torch

from tests.controller_harness import Harness, ask
from tests.hostile.conftest import kill_server
from tests.models import model_files, write_model
from tests.pool_env import run_python, segments_of
from tests.redis_server import RedisServer
from tests.servers import Server, _boto3_client, unique_name
from warmpool.attachment import attach
from warmpool.config import Settings
from warmpool.errors import WarmpoolError
from warmpool.pool.entries import Pool
from warmpool.pool.registry.base import State
from warmpool.tiers.prefetch import prefetch

#: Where the prefetching process is killed: when its room is reserved (segment created,
#: no byte in it), after its second streamed piece, or after a delay from its start.
KILL_POINTS = ["reserved", "mid-stream", "after:0", "after:0.05", "after:0.15", "after:0.3"]

CHILD = textwrap.dedent("""
    import asyncio, os, signal, sys, threading
    from warmpool.config import Settings
    from warmpool.tiers.prefetch import prefetch

    path, point = sys.argv[1], sys.argv[2]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)

    def progress(total):
        if point == "reserved":
            die()
        pieces = []
        def on_piece(n):
            pieces.append(n)
            if point == "mid-stream" and len(pieces) == 2:
                die()
        return on_piece

    if point.startswith("after:"):
        threading.Timer(float(point[6:]), die).start()
    asyncio.run(prefetch(path, settings=Settings.load(), progress=progress))
    print("finished before the kill")
""")


def assert_bit_exact(ref: str, settings: Settings, expected: dict[str, torch.Tensor]) -> None:
    with attach(ref, settings=settings) as weights:
        assert sorted(weights) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(weights[name].reshape(-1).view(torch.uint8),
                               tensor.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("point", KILL_POINTS)
async def test_sigkill_of_a_prefetch_at_any_point(tmp_path: Path, settings: Settings,
                                                  point: str) -> None:
    """The user gets: after a prefetching process is SIGKILLed wherever it was, the
    model is not attachable half-loaded; the next prefetch reclaims what the dead one
    left, ends warm and bit-exact, and one segment holds it."""
    model = tmp_path / "m"
    expected = write_model(model, shards=3)
    result = run_python(CHILD.replace("sys.argv[1], sys.argv[2]", f"{str(model)!r}, {point!r}"),
                        timeout=120)
    if "finished before the kill" not in result.stdout:
        assert result.returncode == -signal.SIGKILL, result.stderr
        for entry in await Pool(settings).entries():
            assert entry.state != State.WARM or len(segments_of(settings)) == 1
    done = await prefetch(str(model), settings=settings)
    assert done.entry.state == State.WARM
    assert_bit_exact(str(model), settings, expected)
    assert len(segments_of(settings)) == 1
    states = {e.state for e in await Pool(settings).entries()}
    assert states == {State.WARM}, states


async def test_s3_server_killed_mid_stream(tmp_path: Path, settings: Settings,
                                          doomed_s3: Server) -> None:
    """The user gets: a prefetch from an S3 server that dies in the middle of the stream
    fails with a warmpool error naming the model, the entry is ``failed`` with that
    reason, no segment is left, and the pool goes on working."""
    client = _boto3_client(doomed_s3.endpoint)
    bucket = unique_name()
    client.create_bucket(Bucket=bucket)
    write_model(tmp_path / "src", shards=3)
    for name, data in model_files(tmp_path / "src").items():
        client.put_object(Bucket=bucket, Key=f"m/{name}", Body=data)
    uri = f"s3://{bucket}/m/"

    def progress(total: int):  # type: ignore[no-untyped-def]
        def on_piece(n: int) -> None:
            kill_server(doomed_s3)
        return on_piece

    with pytest.raises(WarmpoolError) as caught:
        await prefetch(uri, settings=settings, loader="native", progress=progress)
    assert bucket in str(caught.value)
    assert segments_of(settings) == []
    entries = await Pool(settings).entries()
    assert [e.state for e in entries] == [State.FAILED] and entries[0].error
    with pytest.raises(WarmpoolError):  # never a half-filled model to attach
        attach(uri, settings=settings).close()
    expected = write_model(tmp_path / "local", shards=1)
    await prefetch(str(tmp_path / "local"), settings=settings)
    assert_bit_exact(str(tmp_path / "local"), settings, expected)


async def test_redis_killed_under_a_running_controller(harness: Harness,
                                                       redis_server: RedisServer,
                                                       tmp_path: Path) -> None:
    """The user gets: a controller whose Redis is SIGKILLed and restarted (empty) keeps
    serving: a request sent after the restart is answered ``warm``, and a model warmed
    before it is still attachable, bit-exact."""
    first, second = tmp_path / "first", tmp_path / "second"
    first_tensors = write_model(first, shards=1, seed=1)
    write_model(second, shards=1, seed=2)
    ctl = await harness.start()
    await harness.xadd(ask("deploy", f"file://{first}", request_id="before"))
    assert (await harness.reply("before"))["state"] == "warm"
    redis_server.kill()
    redis_server.restart()
    await harness.xadd(ask("deploy", f"file://{second}", request_id="after"))
    reply = await harness.reply("after")
    assert reply["state"] == "warm", json.dumps(reply)
    assert_bit_exact(str(first), ctl.settings, first_tensors)
