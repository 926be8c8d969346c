"""Routing requests: which node acts on a request, and what acting on it means here.

- A request that names another node goes onto that node's stream (from pub/sub it is
  ignored: that node hears the broadcast itself).
- A deploy or pin that names no node is *placed* (:func:`warmpool.controller.nodes.place`) and goes
  to that node's stream, or is done here.
- Every controller hears a pub/sub broadcast: the first to claim it (a short ``SET NX``
  on its digest) acts, so it is placed once and answered once.
- An evict or unpin that names no node concerns every node that may hold the model: it is
  done here and copied onto every other live node's stream.

Acting on a request updates desired state first (so a crash half-way still converges),
then the pool, then answers on ``p:reply:<request_id>`` when the sender asked for one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace

from redis.asyncio import Redis

from warmpool.controller.desired import DesiredState
from warmpool.controller.dispatch import Dispatcher, Outcome
from warmpool.controller.events import Request
from warmpool.controller.keys import RedisKeys
from warmpool.controller.nodes import Nodes, place
from warmpool.pool.registry.redis import RedisRegistry
from warmpool.model.uri import ModelURI

log = logging.getLogger(__name__)
REPLY_TTL_S = 600
STREAM_MAXLEN = 100_000


class Router:
    def __init__(self, *, redis: Redis, keys: RedisKeys, node: str, nodes: Nodes,
                 registry: RedisRegistry, desired: DesiredState, dispatcher: Dispatcher,
                 claim_ttl_ms: int = 30_000) -> None:
        self.redis = redis
        self.keys = keys
        self.node = node
        self.nodes = nodes
        self.registry = registry
        self.desired = desired
        self.dispatcher = dispatcher
        self.claim_ttl_ms = claim_ttl_ms

    async def request(self, req: Request, source: str) -> None:
        """Route one request heard on ``source`` (``pubsub``, ``shared`` or ``node``)."""
        if req.node is not None and req.node != self.node:
            if source != "pubsub":
                await self.forward(req, req.node)
            return
        if source == "pubsub" and not await self._claim(req):
            return  # every controller hears a broadcast: another one took this
        if req.node is None:
            if req.action in ("deploy", "pin"):
                target = await self.placement(str(req.uri), req.device)
                if target != self.node:
                    await self.forward(req, target)
                    return
            else:
                for other in await self._other_live_nodes():
                    await self.forward(replace(req, request_id=None), other)
        await self.reply(req, await self.apply(req))

    async def apply(self, req: Request, source: str = "request") -> Outcome:
        """Do ``req`` on this node."""
        uri, device = str(req.uri), req.device
        if req.action in ("deploy", "pin"):
            return await self.dispatcher.warm(await self.desired.add(req, source))
        if req.action == "unpin":
            await self.desired.set_pinned(uri, device, False)
            changed = await self.dispatcher.set_pin(uri, device, False)
            entry = changed[-1] if changed else None
            return Outcome(uri, device, entry.state.value if entry else "absent", entry)
        await self.desired.remove(uri, device)
        return await self.dispatcher.evict(uri, device, force=req.force)

    async def upload_ready(self, model: ModelURI) -> None:
        """A watched upload completed: warm it on the host tier of the placed node."""
        req = Request("deploy", model)
        target = await self.placement(str(model), req.device)
        if target != self.node:
            await self.forward(req, target)
            return
        await self.apply(req, source="watch")

    async def placement(self, uri: str, device: str) -> str:
        live = await self.nodes.live()
        entries = await self.registry.list_cluster() if live else []
        return place(uri, device, live, entries, self.node)

    async def forward(self, req: Request, node: str) -> None:
        doc = replace(req, node=node).to_doc()
        await self.redis.xadd(self.keys.node_stream(node),
                              {"payload": json.dumps(doc), "from": self.node},
                              maxlen=STREAM_MAXLEN, approximate=True)
        log.info("%s %s on %s: sent to node %s", req.action, req.uri, req.device, node,
                 extra={"event": "forwarded", "action": req.action, "uri": str(req.uri),
                        "to": node})

    async def reply(self, req: Request, outcome: Outcome) -> None:
        if not req.request_id:
            return
        key = self.keys.reply(req.request_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(key, json.dumps({**outcome.to_json(), "node": self.node,
                                    "request_id": req.request_id}))
        pipe.expire(key, REPLY_TTL_S)
        await pipe.execute()

    async def _claim(self, req: Request) -> bool:
        digest = hashlib.sha256(json.dumps(req.to_doc(), sort_keys=True).encode()).hexdigest()
        return bool(await self.redis.set(self.keys.claim(digest[:32]), self.node, nx=True,
                                         px=self.claim_ttl_ms))

    async def _other_live_nodes(self) -> list[str]:
        return [n.node for n in await self.nodes.live() if n.node != self.node]
