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
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import redis.exceptions as rexc

from warmpool.config import Settings
from warmpool.contract.keys import RedisKeys
from warmpool.contract.redis_client import CONNECTION_ERRORS, connect, redact
from warmpool.controller.embedded_redis import running_url
from warmpool.controller.failures import Failing, Failures
from warmpool.controller.fleet import ClusterModel
from warmpool.errors import ControllerError, NotWarmError
from warmpool.model.uri import parse_uri
from warmpool.pool.leases import Leases
from warmpool.pool.refs import ModelRef
from warmpool.pool.registry.base import PoolEntry
from warmpool.pool.registry.redis import RedisRegistry

DEFAULT_TIMEOUT_S = 3600.0
#: A Sentinel failover or a Redis restart takes seconds: a request already sent rides it
#: out for this long rather than report a failure for work the controller is still doing.
OUTAGE_S = 60.0
#: A controller whose heartbeat is missing this long has stopped (its heartbeat expires
#: after three beats; a Redis that restarted empty gets it back within one).
STOPPED_AFTER_S = 20.0


def controller_url(settings: Settings) -> str | None:
    """The Redis of a controller to talk to, or None to work in-process."""
    return settings.redis_url or running_url(settings.runtime_dir)


async def prefetch(url: str, uri: str, *, settings: Settings, device: str = "cpu", tp: int = 1,
                   sharding: str = "replicated", timeout_s: float | None = None,
                   keys: RedisKeys = RedisKeys()) -> dict[str, Any]:
    """Ask this node's controller to warm ``uri``; its reply (``state`` is ``warm``)."""
    async def doc(redis: Any) -> dict[str, Any]:
        return {"action": "deploy", "uri": str(parse_uri(uri)), "device": device, "tp": tp,
                "sharding": sharding}

    reply = await _ask(url, doc, settings=settings, keys=keys,
                       timeout_s=timeout_s or DEFAULT_TIMEOUT_S)
    if reply.get("state") != "warm":
        raise ControllerError(f"the controller on {settings.node} could not warm {uri}: "
                              f"{reply.get('error') or reply.get('state')}")
    return reply


async def evict(url: str, ref: str, *, settings: Settings, device: str = "cpu",
                force: bool = False, timeout_s: float = 300.0,
                keys: RedisKeys = RedisKeys()) -> dict[str, Any]:
    """Ask this node's controller to evict ``ref`` (a URI or a content hash) from
    ``device``; its reply. The controller also drops the model from the node's desired
    state, so it is not warmed again at the next reconciliation — an eviction done behind
    its back would be undone."""
    async def doc(redis: Any) -> dict[str, Any]:
        return {"action": "evict", "uri": await _uri_of(redis, keys, ref, settings.node, device),
                "device": device, "force": force}

    reply = await _ask(url, doc, settings=settings, keys=keys, timeout_s=timeout_s)
    if reply.get("content_hash") is None:
        raise NotWarmError(f"nothing to evict: {ref} is not in the pool on {device} "
                           f"of node {settings.node}")
    if reply.get("state") not in ("evicted", "retiring"):
        raise ControllerError(f"the controller on {settings.node} could not evict {ref}: "
                              f"{reply.get('error') or reply.get('state')}")
    return reply


async def _ask(url: str, doc: Callable[[Any], Awaitable[dict[str, Any]]], *,
               settings: Settings, keys: RedisKeys, timeout_s: float) -> dict[str, Any]:
    """Put the request ``doc(redis)`` returns on this node's stream, with a request id,
    and wait for the controller's reply. No controller, or no Redis, fails at once."""
    redis = connect(url, name="warmpool-cli")
    try:
        await _require_controller(redis, keys, settings.node, url)
        request_id = uuid.uuid4().hex
        payload = json.dumps({**await doc(redis), "node": settings.node,
                              "request_id": request_id})

        async def send() -> None:
            await redis.xadd(keys.node_stream(settings.node), {"payload": payload})

        await send()
        return await _wait_reply(redis, keys, request_id, settings.node, timeout_s,
                                 resend=send)
    except CONNECTION_ERRORS as exc:
        raise ControllerError(f"cannot reach Redis at {redact(url)}: {exc}") from None
    finally:
        await redis.aclose()


async def _uri_of(redis: Any, keys: RedisKeys, ref: str, node: str, device: str) -> str:
    """The model URI that ``ref`` names: itself, or the URI of this node's entry whose
    content hash starts with it (requests name models by URI)."""
    wanted = ModelRef.parse(ref)
    if not wanted.is_hash:
        return wanted.text
    uris = {e.uri for e in await RedisRegistry(redis, keys, node).list()
            if e.device == device and wanted.matches(e.uri, e.content_hash)}
    if len(uris) != 1:
        raise NotWarmError(f"{ref!r} names {'no' if not uris else 'more than one'} model on "
                           f"{device} of node {node}" + (f": {sorted(uris)}" if uris else ""))
    return uris.pop()


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


async def cluster(url: str, settings: Settings,
                  keys: RedisKeys | None = None) -> list[ClusterModel]:
    """Every model across the fleet: which nodes hold it in which state, and what the
    fleet wants of it."""
    from warmpool.controller.fleet import Fleet, cluster_models
    from warmpool.controller.nodes import Nodes

    keys = keys or RedisKeys()
    redis = connect(url, name="warmpool-cli")
    try:
        registry = RedisRegistry(redis, keys, settings.node)
        entries = await registry.list_cluster()
        nodes = Nodes(redis, keys, settings.node, ttl_s=1.0)
        records = await Fleet(redis, keys, settings.node, nodes, registry).records()
        live = {n.node for n in await nodes.live()}
    except CONNECTION_ERRORS as exc:
        raise ControllerError(f"cannot reach Redis at {redact(url)}: {exc}") from None
    finally:
        await redis.aclose()
    return cluster_models(entries, records, live)


async def failing(url: str, settings: Settings, keys: RedisKeys | None = None) -> list[Failing]:
    """Desired models of this node whose warm-ups keep failing (backing off, or given
    up until asked again): ``warmpool evict <uri>`` removes one."""
    redis = connect(url, name="warmpool-cli")
    try:
        records = await Failures(redis, keys or RedisKeys(), settings.node).all()
    except CONNECTION_ERRORS as exc:
        raise ControllerError(f"cannot reach Redis at {redact(url)}: {exc}") from None
    finally:
        await redis.aclose()
    return sorted(records.values(), key=lambda f: (f.uri, f.device))


async def _require_controller(redis: Any, keys: RedisKeys, node: str, url: str) -> None:
    """Fail at once when no controller serves ``node``. A heartbeat that is missing while
    the node's stream consumer was active lately is a Redis that paused or restarted
    (the heartbeat expired meanwhile): the controller beats again within seconds, so
    we wait for it rather than tell the user no controller runs."""
    if await redis.exists(keys.node(node)):
        return
    if await _consumer_active(redis, keys, node):
        deadline = time.monotonic() + STOPPED_AFTER_S
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if await redis.exists(keys.node(node)):
                return
    raise ControllerError(
        f"no warmpool controller is running for node {node!r} (no heartbeat in the Redis "
        f"at {redact(url)}); start `warmpool serve` there, or unset WARMPOOL_REDIS_URL to "
        "prefetch in this process")


async def _consumer_active(redis: Any, keys: RedisKeys, node: str) -> bool:
    """Is the node's controller connected (its client is named ``warmpool-<node>``), or
    did it read the node's stream within :data:`STOPPED_AFTER_S`? Either is a live
    controller; a Redis that refuses CLIENT LIST (ACLs) leaves the stream to tell."""
    try:
        if any(c.get("name") == f"warmpool-{node}" for c in await redis.client_list()):
            return True
    except rexc.ResponseError:
        pass
    try:
        consumers = await redis.xinfo_consumers(keys.node_stream(node), keys.consumer_group)
    except rexc.ResponseError:  # no stream or no group: no controller ever served it
        return False
    return any(int(c.get("idle", 1 << 62)) < STOPPED_AFTER_S * 1000 for c in consumers)


async def _wait_reply(redis: Any, keys: RedisKeys, request_id: str, node: str,
                      timeout_s: float, resend: Callable[[], Awaitable[None]]
                      ) -> dict[str, Any]:
    """The controller's answer to ``request_id``. Redis may fail over or restart while we
    wait: after a lost connection the request is sent again (a Redis that came back empty
    lost it; a repeat of a request done or in flight gets the same answer), and
    only an outage longer than :data:`OUTAGE_S` is an error."""
    deadline = time.monotonic() + timeout_s
    lost_since: float | None = None
    missing_since: float | None = None
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise ControllerError(
                f"no answer from the controller on {node} within {timeout_s:g} s; it may "
                "still be working on it: see `warmpool status`")
        try:
            if lost_since is not None:
                await resend()
                lost_since = None
            popped = await redis.blpop([keys.reply(request_id)],
                                       timeout=min(deadline - now, 2.0))
            if popped is not None:
                return dict(json.loads(popped[1]))
            if await redis.exists(keys.node(node)):
                missing_since = None
            else:
                missing_since = missing_since or time.monotonic()
                if time.monotonic() - missing_since > STOPPED_AFTER_S:
                    raise ControllerError(f"the controller on {node} stopped before answering")
        except CONNECTION_ERRORS as exc:
            lost_since = lost_since or now
            if now - lost_since > OUTAGE_S:
                raise ControllerError(f"lost Redis for over {OUTAGE_S:g} s while waiting for "
                                      f"the controller on {node}: {exc}") from None
            await asyncio.sleep(0.5)
