"""Nodes: each controller's heartbeat, and placement of work that names no node.

A heartbeat is a small JSON document at ``p:node:<node>`` that expires unless renewed,
so a node whose controller died drops out of placement by itself. It carries each
device's capacity and use, which is all placement needs: a model goes to a live node
that already has it (warm or on its way), else to the one with the most free room on the
device asked for. Ties go to the asking controller, which saves a hop through a stream.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

from redis.asyncio import Redis

from warmpool.contract.keys import RedisKeys
from warmpool.pool.registry.base import PoolEntry, State


@dataclass(frozen=True)
class DeviceRoom:
    capacity: int
    used: int

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.used)


@dataclass(frozen=True)
class NodeInfo:
    node: str
    devices: dict[str, DeviceRoom] = field(default_factory=dict)
    pid: int = field(default_factory=os.getpid)
    at: float = field(default_factory=time.time)
    labels: dict[str, str] = field(default_factory=dict)  # the node's ``labels:`` setting

    def free(self, device: str) -> int:
        room = self.devices.get(device)
        return room.free if room else 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> NodeInfo:
        data = json.loads(raw)
        devices = {name: DeviceRoom(int(d["capacity"]), int(d["used"]))
                   for name, d in data.get("devices", {}).items()}
        labels = data.get("labels") or {}
        return cls(str(data["node"]), devices, int(data.get("pid", 0)),
                   float(data.get("at", 0.0)),
                   {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict)
                   else {})


class Nodes:
    def __init__(self, redis: Redis, keys: RedisKeys, node: str, ttl_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.node = node
        self.ttl_ms = max(1, int(ttl_s * 1000))

    async def beat(self, info: NodeInfo) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.node(self.node), info.to_json(), px=self.ttl_ms)
        pipe.sadd(self.keys.nodes, self.node)
        await pipe.execute()

    async def leave(self) -> None:
        """Drop the heartbeat at a clean shutdown, so placement stops at once."""
        await self.redis.delete(self.keys.node(self.node))

    async def live(self) -> list[NodeInfo]:
        names = sorted(n.decode() if isinstance(n, bytes) else n
                       for n in await self.redis.smembers(self.keys.nodes))
        if not names:
            return []
        raws = await self.redis.mget([self.keys.node(n) for n in names])
        return [NodeInfo.from_json(raw) for raw in raws if raw is not None]

    async def is_live(self, node: str) -> bool:
        return bool(await self.redis.exists(self.keys.node(node)))


def place(uri: str, device: str, live: list[NodeInfo], entries: list[PoolEntry],
          me: str) -> str:
    """The node that should hold ``uri`` on ``device`` (see the module docstring)."""
    names = {n.node for n in live}
    if not names:
        return me
    holding = {e.node for e in entries
               if uri in e.uris and e.device == device and e.node in names
               and (e.state == State.WARM or e.state.active)}
    if holding:
        return me if me in holding else min(holding)
    best = max(n.free(device) for n in live)
    roomiest = sorted(n.node for n in live if n.free(device) == best)
    return me if me in roomiest else roomiest[0]
