"""The controller harness of the tests: controllers in this process against a real Redis,
payloads sent the way producers send them, and polling with a deadline.

Shared by the controller, state, export, hostile and vLLM-export tests, so it lives beside
:mod:`tests.servers` rather than in a test module that others import.
"""


from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest
import torch

from tests.models import model_files, write_model
from tests.redis_server import RedisServer
from tests.servers import Backend
from warmpool.attachment import attach
from warmpool.config import ControllerOptions, Settings
from warmpool.contract.keys import RedisKeys
from warmpool.contract.redis_client import CONNECTION_ERRORS, connect
from warmpool.controller.loop import Controller
from warmpool.model.uri import ModelURI
from warmpool.pool.host import HostTier
from warmpool.pool.registry.base import PoolEntry, State
from warmpool.pool.registry.redis import RedisRegistry

KEYS = RedisKeys()
FAST = ControllerOptions(debounce_s=0.3, recheck_s=0.5, heartbeat_s=0.5, claim_idle_s=1.5,
                         lock_ttl_s=3.0, shutdown_grace_s=5.0)
DEADLINE_S = 30.0


# --- helpers ------------------------------------------------------------------------------


async def wait_until(check: Callable[[], Awaitable[Any]], what: str,
                     timeout: float = DEADLINE_S) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


def s3_event(bucket: str, key: str, data: bytes, name: str = "ObjectCreated:Put") -> bytes:
    record = {"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": name,
              "s3": {"bucket": {"name": bucket},
                     "object": {"key": quote_plus(key), "size": len(data),
                                "eTag": hashlib.md5(data).hexdigest()}}}
    return json.dumps({"Records": [record]}).encode()


def gcs_event(bucket: str, key: str, data: bytes, *, envelope: bool) -> bytes:
    resource = {"kind": "storage#object", "bucket": bucket, "name": key,
                "generation": str(time.time_ns()), "size": str(len(data))}
    if not envelope:
        return json.dumps(resource).encode()
    message = {"attributes": {"eventType": "OBJECT_FINALIZE", "bucketId": bucket,
                              "objectId": key},
               "data": base64.b64encode(json.dumps(resource).encode()).decode(),
               "messageId": "1"}
    return json.dumps({"message": message, "subscription": "projects/p/subscriptions/s"}).encode()


def ask(action: str, uri: object, **fields: Any) -> bytes:
    """A request payload, as a scheduler or ``warmpool prefetch`` sends it."""
    return json.dumps({"action": action, "uri": str(uri), **fields}).encode()


@dataclass
class Harness:
    """Controllers on one Redis, and the producer's side of the wire."""

    server: RedisServer
    settings: Settings
    tmp: Path
    redis: Any = None
    url: str | None = None  # how controllers reach Redis; default: the server's own URL
    running: list[tuple[Controller, asyncio.Task[None]]] = field(default_factory=list)

    async def start(self, *, node: str | None = None, runtime: str | None = None,
                    watch: tuple[str, ...] = (), options: ControllerOptions = FAST,
                    **settings: Any) -> Controller:
        overrides: dict[str, Any] = {"watch": watch, **settings}
        if node:
            overrides["node"] = node
        if runtime:
            overrides["runtime_dir"] = self.tmp / runtime
        controller = Controller(replace(self.settings, **overrides),
                                connect(self.url or self.server.url), options=options)
        task = asyncio.create_task(controller.run())
        self.running.append((controller, task))
        await wait_until(lambda: _ready(controller, task), "the controller to start")
        return controller

    async def crash(self, controller: Controller) -> None:
        """Cancel the controller's task: no graceful stop, entries stay unacknowledged."""
        for c, task in self.running:
            if c is controller:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await c.redis.aclose()
        self.running = [(c, t) for c, t in self.running if c is not controller]

    async def stop_all(self) -> None:
        for controller, _ in self.running:
            controller.stop(grace_s=1.0)
        for controller, task in self.running:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 20)
            await controller.redis.aclose()
        self.running = []

    async def publish(self, payload: bytes) -> None:
        """PUBLISH, retried until a controller hears it (pub/sub delivers at most once,
        and a controller re-subscribing after a Redis restart may not be listening yet)."""
        async def heard() -> int:
            with contextlib.suppress(*CONNECTION_ERRORS):
                return int(await self.redis.publish(KEYS.events_channel, payload))
            return 0

        await wait_until(heard, "a subscriber on the events channel")

    async def xadd(self, payload: bytes, node: str | None = None) -> None:
        """XADD, retried as a producer would while Redis fails over."""
        stream = KEYS.node_stream(node) if node else KEYS.requests_stream

        async def sent() -> bool:
            with contextlib.suppress(*CONNECTION_ERRORS):
                return bool(await self.redis.xadd(stream, {"payload": payload}))
            return False

        await wait_until(sent, f"XADD to {stream}")

    async def entries(self) -> list[PoolEntry]:
        return await RedisRegistry(self.redis, KEYS).list_cluster()

    async def wait_entry(self, uri: object, state: State = State.WARM, *,
                         device: str = "cpu", node: str | None = None,
                         content_hash: str | None = None) -> PoolEntry:
        async def found() -> PoolEntry | None:
            for e in await self.entries():
                if (e.uri == str(uri) and e.device == device and e.state == state
                        and (node is None or e.node == node)
                        and (content_hash is None or e.content_hash == content_hash)):
                    return e
            return None

        return await wait_until(found, f"{uri} to be {state.value} on {node or 'a node'}")

    async def reply(self, request_id: str) -> dict[str, Any]:
        popped = await self.redis.blpop([KEYS.reply(request_id)], timeout=DEADLINE_S)
        assert popped is not None, f"no reply to request {request_id}"
        return dict(json.loads(popped[1]))

    async def dead(self) -> list[dict[str, str]]:
        return [{k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()}
                for _, fields in await self.redis.xrange(KEYS.dead_stream)]


async def _ready(controller: Controller, task: asyncio.Task[None]) -> bool:
    if task.done():
        task.result()  # raise what killed it
    return (controller.ready.is_set() and controller.pubsub.subscribed.is_set()
            and controller.streams.ready.is_set())


def streamed(*controllers: Controller, device: str = "cpu") -> int:
    return int(sum(c.metrics.streamed.labels(device)._value.get() for c in controllers))


async def streams_counted(count: int, *controllers: Controller) -> int:
    """The controllers' stream count once it reached ``count`` (it is counted just after
    the entry turns warm in Redis, so a test that saw the entry may be a moment early)."""
    async def reached() -> bool:
        return streamed(*controllers) >= count

    await wait_until(reached, f"{count} stream(s) to be counted")
    return streamed(*controllers)


@pytest.fixture
async def harness(redis_server: RedisServer, settings: Settings,
                  tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(redis_server, settings, tmp_path)
    h.redis = connect(redis_server.url)
    try:
        yield h
    finally:
        await h.stop_all()
        for runtime in tmp_path.iterdir():
            if (runtime / "resident").is_dir():
                HostTier(runtime).remove_all()
        await h.redis.aclose()


@dataclass
class Model:
    """A checkpoint written locally, to upload object by object."""

    files: dict[str, bytes]
    tensors: dict[str, torch.Tensor]


def make_model(path: Path, *, shards: int = 2, seed: int = 0) -> Model:
    tensors = write_model(path, shards=shards, seed=seed)
    return Model(model_files(path), tensors)


async def upload(backend: Backend, prefix: str, model: Model, names: list[str],
                 send: Callable[[bytes], Awaitable[None]]) -> None:
    for name in names:
        backend.put(prefix + name, model.files[name])
        await send(s3_event(backend.bucket, prefix + name, model.files[name]))


def assert_bit_exact(uri: ModelURI, settings: Settings, expected: dict[str, torch.Tensor]) -> None:
    with attach(str(uri), settings=settings) as weights:
        assert sorted(weights) == sorted(expected)
        for name, tensor in expected.items():
            got = weights[name]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
            assert torch.equal(got.reshape(-1).view(torch.uint8),
                               tensor.reshape(-1).view(torch.uint8)), name
