"""``warmpool prefetch`` and ``warmpool status`` through a running controller.

When a Redis is configured (``--redis``, ``WARMPOOL_REDIS_URL``, ``redis_url`` in the
config), or ``warmpool serve`` runs here with its embedded Redis, the CLI does not warm
anything itself: it puts a deploy request with a request id on this node's stream and
waits for the controller's reply, so that one process — the controller — owns the pool.
Without one, the CLI keeps working in-process.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace
from typing import Any

from warmpool.config import Settings
from warmpool.embedded_redis import running_url
from warmpool.redis_client import redact
from warmpool.errors import WarmpoolError
from warmpool.keys import RedisKeys
from warmpool.leases import Leases
from warmpool.redis_client import CONNECTION_ERRORS, connect
from warmpool.registry.base import PoolEntry
from warmpool.registry.redis import RedisRegistry
from warmpool.uri import parse_uri

DEFAULT_TIMEOUT_S = 3600.0


class ControllerError(WarmpoolError):
    """No controller answered, or it answered with a failure."""


def controller_url(settings: Settings) -> str | None:
    """The Redis of a controller to talk to, or None to work in-process."""
    return settings.redis_url or running_url(settings.runtime_dir)


async def prefetch(url: str, uri: str, *, settings: Settings, device: str = "cpu", tp: int = 1,
                   layout: str = "replicated", timeout_s: float | None = None,
                   keys: RedisKeys = RedisKeys()) -> dict[str, Any]:
    """Ask this node's controller to warm ``uri``; its reply (``state`` is ``warm``)."""
    redis = connect(url, name="warmpool-cli")
    try:
        await _require_controller(redis, keys, settings.node, url)
        request_id = uuid.uuid4().hex
        doc = {"action": "deploy", "uri": str(parse_uri(uri)), "device": device, "tp": tp,
               "layout": layout, "node": settings.node, "request_id": request_id}
        await redis.xadd(keys.node_stream(settings.node), {"payload": json.dumps(doc)})
        reply = await _wait_reply(redis, keys, request_id, settings.node,
                                  timeout_s or DEFAULT_TIMEOUT_S)
    except CONNECTION_ERRORS as exc:
        raise ControllerError(f"cannot reach Redis at {redact(url)}: {exc}") from None
    finally:
        await redis.aclose()
    if reply.get("state") != "warm":
        raise ControllerError(f"the controller on {settings.node} could not warm {uri}: "
                              f"{reply.get('error') or reply.get('state')}")
    return reply


async def status(url: str, settings: Settings, keys: RedisKeys = RedisKeys()) -> list[PoolEntry]:
    """Every node's entries; lease counts filled in for this node's host tier."""
    redis = connect(url, name="warmpool-cli")
    try:
        entries = await RedisRegistry(redis, keys, settings.node).list_cluster()
    except CONNECTION_ERRORS as exc:
        raise ControllerError(f"cannot reach Redis at {redact(url)}: {exc}") from None
    finally:
        await redis.aclose()
    leases = Leases(settings.runtime_dir)
    return [replace(e, leases=leases.count(e.key)) if e.node == settings.node else e
            for e in entries]


async def _require_controller(redis: Any, keys: RedisKeys, node: str, url: str) -> None:
    if not await redis.exists(keys.node(node)):
        raise ControllerError(
            f"no warmpool controller is running for node {node!r} (no heartbeat in the Redis "
            f"at {redact(url)}); start `warmpool serve` there, or unset WARMPOOL_REDIS_URL to "
            "prefetch in this process")


async def _wait_reply(redis: Any, keys: RedisKeys, request_id: str, node: str,
                      timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ControllerError(
                f"no answer from the controller on {node} within {timeout_s:g} s; it may "
                "still be working on it: see `warmpool status`")
        popped = await redis.blpop([keys.reply(request_id)], timeout=min(left, 2.0))
        if popped is not None:
            return dict(json.loads(popped[1]))
        if not await redis.exists(keys.node(node)):
            raise ControllerError(f"the controller on {node} stopped before answering")
        await asyncio.sleep(0)
