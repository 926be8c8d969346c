"""Desired state: which models should be warm on this node, kept in Redis.

It is what a controller that restarts reconciles from — the pool registry says what *is*
warm, this says what *should be*. A deploy or a pin adds a :class:`Want`, an evict removes
it, an unpin clears its pin. Wants are keyed by model URI and device, not by content
hash: after a re-upload the same want warms the new version.

Like the registry, it remembers its own writes so that a Redis that came back empty
gets them again (:meth:`DesiredState.resync`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace

from redis.asyncio import Redis

from warmpool.controller.keys import RedisKeys
from warmpool.errors import WarmpoolError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Want:
    """One model that should be warm on one device of this node."""

    uri: str
    device: str = "cpu"
    tp: int = 1
    layout: str = "replicated"
    pinned: bool = False
    source: str = "request"  # "request" (deploy/pin) or "watch" (an upload under the watch list)
    since: float = field(default_factory=time.time)

    @property
    def field(self) -> str:
        return want_field(self.uri, self.device)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Want:
        data = json.loads(raw)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


class DesiredStateFull(WarmpoolError):
    """The node already wants as many models as it may; evict some first."""


def want_field(uri: str, device: str) -> str:
    # Devices never hold '|' (events.py checks them); URIs may, so the device goes first.
    return f"{device}|{uri}"


class DesiredState:
    def __init__(self, redis: Redis, keys: RedisKeys, node: str, *,
                 max_wants: int = 1024) -> None:
        self.redis = redis
        self.key = keys.desired(node)
        self.max_wants = max_wants  # every want costs a look on each convergence pass
        self._mirror: dict[str, Want] = {}

    async def get(self, uri: str, device: str) -> Want | None:
        raw = await self.redis.hget(self.key, want_field(uri, device))
        return None if raw is None else Want.from_json(raw)

    async def add(self, want: Want) -> Want:
        """Record ``want``; an existing pin survives a plain deploy."""
        # The mirror answers when Redis lost the want (restarted empty): a pin survives.
        current = await self.get(want.uri, want.device) or self._mirror.get(want.field)
        if current is not None:
            want = replace(want, pinned=want.pinned or current.pinned, since=current.since,
                           source=current.source if want.source == "watch" else want.source)
        elif await self.redis.hlen(self.key) >= self.max_wants:
            raise DesiredStateFull(
                f"node already wants {self.max_wants} models (max_desired); evict some "
                f"before deploying {want.uri}")
        return await self._write(want)

    async def set_pinned(self, uri: str, device: str, pinned: bool) -> Want | None:
        current = await self.get(uri, device)
        if current is None:
            return None
        return await self._write(replace(current, pinned=pinned))

    async def remove(self, uri: str, device: str) -> bool:
        name = want_field(uri, device)
        self._mirror.pop(name, None)
        return bool(await self.redis.hdel(self.key, name))

    async def all(self) -> list[Want]:
        wants = []
        for name, raw in (await self.redis.hgetall(self.key)).items():
            try:
                wants.append(Want.from_json(raw))
            except (ValueError, TypeError) as exc:  # written by hand, or by a newer version
                log.warning("ignoring unreadable desired-state field %r: %s", name, exc,
                            extra={"event": "desired_unreadable"})
        # Learn what Redis holds, never forget from it: a Redis that restarted empty
        # must not erase what this node was asked for (resync writes it back).
        self._mirror.update((want.field, want) for want in wants)
        return sorted(wants, key=lambda w: w.since)

    async def resync(self) -> int:
        """Write back wants Redis lost; returns how many."""
        present = {n.decode() if isinstance(n, bytes) else n
                   for n in await self.redis.hkeys(self.key)}
        lost = [w for name, w in self._mirror.items() if name not in present]
        for want in lost:
            await self.redis.hset(self.key, want.field, want.to_json())
        return len(lost)

    async def _write(self, want: Want) -> Want:
        await self.redis.hset(self.key, want.field, want.to_json())
        self._mirror[want.field] = want
        return want
