"""The fleet: models wanted on several nodes (``"replicas": N``, ``"nodes": "all"``,
``"node_selector": {...}`` on a deploy or pin).

The controller that takes such a request writes the fleet's record of the model into
Redis (``p:fleet``, one field per model and device: the request and, for replicas, the
nodes holding them) and sends a plain deploy (or pin) naming each chosen node onto that
node's stream, where it becomes that node's desired state like any deploy. Every
controller then keeps the record true at each maintenance pass (:meth:`Fleet.mine`):

- ``nodes: all``: every live node whose labels match wants the model, so a node that
  joins later gets it at its first pass;
- ``replicas: N``: the record names the holders; one whose heartbeat expired (or whose
  labels stopped matching) is dropped and the roomiest matching live node (one that
  already holds the model first) replaces it. The change is one optimistic transaction
  (``WATCH``), so two controllers cannot both add a replica for the same gap.

An evict that names no node ends the record (and, as before, reaches every node); one
that names a node leaves the record, so the node is given the model again (nodes: all)
or replaced (replicas). New versions replace old ones on each node as any deploy does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import WatchError

from warmpool.contract.keys import RedisKeys
from warmpool.contract.requests import Request, parse_request
from warmpool.controller.nodes import NodeInfo, Nodes
from warmpool.errors import BadEvent
from warmpool.pool.registry.base import PoolEntry, State
from warmpool.pool.registry.redis import RedisRegistry

log = logging.getLogger(__name__)
#: Transactions retried when another controller changed the record meanwhile.
RETRIES = 8


def fleet_field(uri: str, device: str) -> str:
    return f"{device} {uri}"


@dataclass(frozen=True)
class FleetRecord:
    request: Request  # its spread says where; node and request id are not kept
    holders: tuple[str, ...] = ()  # replicas: the nodes chosen

    def to_json(self) -> str:
        return json.dumps({"request": self.request.to_doc(), "holders": list(self.holders)})

    @classmethod
    def from_json(cls, raw: bytes | str) -> FleetRecord:
        data = json.loads(raw)
        return cls(parse_request(data["request"]), tuple(str(n) for n in data["holders"]))


class Fleet:
    def __init__(self, redis: Redis, keys: RedisKeys, node: str, nodes: Nodes,
                 registry: RedisRegistry) -> None:
        self.redis = redis
        self.keys = keys
        self.node = node
        self.nodes = nodes
        self.registry = registry

    async def place(self, req: Request) -> list[str]:
        """Record ``req`` (a deploy or pin with a spread) as the fleet's, and return the
        nodes that should hold it now."""
        assert req.spread is not None
        bare = replace(req, node=None, request_id=None)
        live = await self.nodes.live()
        entries = await self._entries([req])
        return await self._update(fleet_field(str(req.uri), req.device),
                                  lambda old: self._targets(bare, old, live, entries))

    async def forget(self, uri: str, device: str) -> bool:
        """An evict for every node: the fleet stops wanting the model."""
        return bool(await self.redis.hdel(self.keys.fleet, fleet_field(uri, device)))

    async def records(self) -> list[FleetRecord]:
        raw = await self.redis.hgetall(self.keys.fleet)
        found = []
        for name, value in raw.items():
            try:
                found.append(FleetRecord.from_json(value))
            except (ValueError, KeyError, TypeError, BadEvent) as exc:
                log.warning("unreadable fleet record %r dropped: %s", name, exc)
                await self.redis.hdel(self.keys.fleet, name)
        return found

    async def mine(self) -> list[Request]:
        """The fleet's models this node should want now (re-placing the replicas of
        nodes that left), as plain deploys or pins naming this node. Every node runs it
        at every maintenance pass: with no fleet record it reads one key, nothing more."""
        records = await self.records()
        if not records:
            return []
        live = await self.nodes.live()
        entries = await self._entries([r.request for r in records])
        wanted = []
        for record in records:
            req = record.request
            field = fleet_field(str(req.uri), req.device)
            holders = await self._update(
                field, lambda old, req=req: self._targets(req, old, live, entries),
                only_if_present=True)
            if self.node in holders:
                wanted.append(replace(req, node=self.node, spread=None))
        return wanted

    async def _entries(self, requests: list[Request]) -> list[PoolEntry]:
        """The cluster's entries, which only choosing replicas reads (a node already
        holding the model first); ``nodes: all`` needs none."""
        if all(r.spread is None or r.spread.all_nodes for r in requests):
            return []
        return await self.registry.list_cluster()

    def _targets(self, req: Request, old: FleetRecord | None, live: list[NodeInfo],
                 entries: list[PoolEntry]) -> tuple[FleetRecord, list[str]]:
        spread = req.spread
        assert spread is not None
        matching = [n for n in live if spread.matches(n.labels)]
        if spread.all_nodes:
            return FleetRecord(req), sorted(n.node for n in matching)
        names = {n.node for n in matching}
        kept = [h for h in (old.holders if old else ()) if h in names]
        want = spread.replicas or 1
        if len(kept) > want:
            kept = kept[:want]  # a deploy asking for fewer: the first chosen stay
        holding = {e.node for e in entries if str(req.uri) in e.uris and e.device == req.device
                   and (e.state == State.WARM or e.state.active)}
        spare = sorted((n for n in matching if n.node not in kept),
                       key=lambda n: (n.node not in holding, -n.free(req.device), n.node))
        holders = kept + [n.node for n in spare[: want - len(kept)]]
        if old is not None and tuple(holders) != old.holders:
            gone = sorted(set(old.holders) - set(holders))
            if gone:
                log.info("%s on %s: replica(s) on %s placed again on %s", req.uri,
                         req.device, ", ".join(gone),
                         ", ".join(sorted(set(holders) - set(old.holders))) or "none",
                         extra={"event": "replica_replaced", "uri": str(req.uri)})
        return FleetRecord(req, tuple(holders)), holders

    async def _update(self, field: str, change: Any, only_if_present: bool = False) -> list[str]:
        """Read the record, compute it anew, write it back unless another controller
        wrote it meanwhile (then again)."""
        for _ in range(RETRIES):
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(self.keys.fleet)
                    raw = await pipe.hget(self.keys.fleet, field)
                    if raw is None and only_if_present:
                        return []
                    old = FleetRecord.from_json(raw) if raw is not None else None
                    record, targets = change(old)
                    if record == old:
                        await pipe.reset()  # unchanged: no write, no conflict for others
                        return list(targets)
                    pipe.multi()
                    pipe.hset(self.keys.fleet, field, record.to_json())
                    await pipe.execute()
                    return list(targets)
                except WatchError:
                    continue
        raise RuntimeError(f"the fleet record {field} kept changing; try again")


@dataclass(frozen=True)
class ClusterModel:
    """One model on one device across the fleet: ``warmpool status --cluster``."""

    uri: str
    device: str
    wanted: str | None  # the fleet's spread ("every node", "2 node(s) labelled ..."), if any
    nodes: dict[str, str]  # node -> state of its newest entry ("warm", "streaming", ...)
    bytes: int  # the model's size
    #: Bytes the warm nodes read from the model's store, and from each other (NIXL).
    store_bytes: int
    peer_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "device": self.device, "wanted": self.wanted,
                "nodes": self.nodes, "bytes": self.bytes, "store_bytes": self.store_bytes,
                "peer_bytes": self.peer_bytes}


def cluster_models(entries: list[PoolEntry], records: list[FleetRecord],
                   live: set[str]) -> list[ClusterModel]:
    """Group every node's entries by model and device, newest entry per node first; a
    node whose heartbeat expired shows its last state as ``<state> (node down)``."""
    by_model: dict[tuple[str, str], dict[str, PoolEntry]] = {}
    for e in sorted(entries, key=lambda e: e.updated_at):
        if e.engine is not None:
            continue  # engine layouts are listed by `warmpool status`
        for uri in e.uris:
            by_model.setdefault((uri, e.device), {})[e.node] = e
    wanted = {(str(r.request.uri), r.request.device): r for r in records}
    found = []
    for (uri, device), per_node in sorted(by_model.items()):
        record = wanted.pop((uri, device), None)
        states = {node: e.state.value + ("" if node in live else " (node down)")
                  for node, e in sorted(per_node.items())}
        size = max((e.bytes for e in per_node.values()), default=0)
        warm = [e for e in per_node.values() if e.state == State.WARM]
        peer = sum(min(e.peer_bytes, e.bytes) for e in warm)
        found.append(ClusterModel(uri, device, _wanted(record), states, size,
                                  sum(e.bytes for e in warm) - peer, peer))
    for (uri, device), record in sorted(wanted.items()):  # wanted, nowhere yet
        found.append(ClusterModel(uri, device, _wanted(record), {}, 0, 0))
    return found


def _wanted(record: FleetRecord | None) -> str | None:
    if record is None or record.request.spread is None:
        return None
    return record.request.spread.describe()
