"""Desired state: which models should be warm on this node, kept in Redis.

It is what a controller that restarts reconciles from — the pool registry says what *is*
warm, this says what *should be*. A deploy or a pin is kept as the
:class:`~warmpool.contract.requests.Request` itself (a pin that is still in force wins over
a later deploy), an evict removes it, an unpin turns it back into a deploy. Requests are
keyed by model URI and device, not by content hash: after a re-upload the same request
warms the new version.

Like the registry, it remembers its own writes so that a Redis that came back empty
gets them again (:meth:`DesiredState.resync`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import Any

from redis.asyncio import Redis

from warmpool.contract.keys import RedisKeys
from warmpool.contract.requests import Request, parse_request
from warmpool.errors import DesiredStateFull

log = logging.getLogger(__name__)

def want_field(uri: str, device: str) -> str:
    # Devices never hold '|' (contract/requests.py checks them); URIs may, so the device goes first.
    return f"{device}|{uri}"


def _field(req: Request) -> str:
    return want_field(str(req.uri), req.device)


def _to_json(req: Request, source: str, since: float) -> str:
    """The request's own payload (:meth:`Request.to_doc`), less what concerns one
    delivery (node, request id), plus where it came from and since when."""
    doc = replace(req, node=None, request_id=None, force=False).to_doc()
    return json.dumps({**doc, "source": source, "since": since}, separators=(",", ":"))


def _from_json(raw: bytes | str) -> tuple[Request, str, float]:
    """Read back what :func:`_to_json` wrote, checked like any request payload.

    Fields of the older form (``pinned`` instead of the action, ``layout``) are read too,
    so a controller upgraded in place keeps its node's desired models.
    """
    doc: dict[str, Any] = json.loads(raw)
    if not isinstance(doc, dict):
        raise TypeError("not a JSON object")
    source, since = str(doc.pop("source", "request")), float(doc.pop("since", 0.0))
    if "action" not in doc:
        doc["action"] = "pin" if doc.get("pinned") else "deploy"
    doc.pop("pinned", None)
    return parse_request(doc), source, since


class DesiredState:
    def __init__(self, redis: Redis, keys: RedisKeys, node: str, *,
                 max_wants: int = 1024) -> None:
        self.redis = redis
        self.key = keys.desired(node)
        self.max_wants = max_wants  # every desired model costs a look on each pass
        self._mirror: dict[str, str] = {}  # field -> the JSON written there

    async def get(self, uri: str, device: str) -> Request | None:
        raw = await self.redis.hget(self.key, want_field(uri, device))
        return None if raw is None else _from_json(raw)[0]

    async def add(self, req: Request, source: str = "request") -> Request:
        """Record a deploy or pin; returns what is now desired (an existing pin survives
        a plain deploy, and a request's own source survives an upload's).

        ``source`` is ``request`` (a deploy or pin) or ``watch`` (an upload under the
        watch list)."""
        since = time.time()
        # The mirror answers when Redis lost the request (restarted empty): a pin survives.
        raw = await self.redis.hget(self.key, _field(req)) or self._mirror.get(_field(req))
        if raw is not None:
            current, current_source, since = _from_json(raw)
            if current.pinned:
                req = replace(req, action="pin")
            if source == "watch":  # an upload's deploy keeps what was asked of the model
                source = current_source
                if req.engine_layout is None:
                    req = replace(req, engine_layout=current.engine_layout)
        elif await self.redis.hlen(self.key) >= self.max_wants:
            raise self._full(req)
        else:
            written = await self._write(req, source, since)
            # Concurrent deploys may all have seen room: check again, after writing.
            if await self.redis.hlen(self.key) > self.max_wants:
                await self.remove(str(req.uri), req.device)
                raise self._full(req)
            return written
        return await self._write(req, source, since)

    def _full(self, req: Request) -> DesiredStateFull:
        return DesiredStateFull(f"node already wants {self.max_wants} models (max_desired); "
                                f"evict some before deploying {req.uri}")

    async def set_pinned(self, uri: str, device: str, pinned: bool) -> Request | None:
        raw = await self.redis.hget(self.key, want_field(uri, device))
        if raw is None:
            return None
        current, source, since = _from_json(raw)
        return await self._write(replace(current, action="pin" if pinned else "deploy"),
                                 source, since)

    async def remove(self, uri: str, device: str) -> bool:
        name = want_field(uri, device)
        self._mirror.pop(name, None)
        return bool(await self.redis.hdel(self.key, name))

    async def all(self) -> list[Request]:
        """Every desired model, the longest-desired first."""
        found: list[tuple[float, Request]] = []
        mirror: dict[str, str] = {}
        for name, raw in (await self.redis.hgetall(self.key)).items():
            try:
                req, _, since = _from_json(raw)
            except (ValueError, TypeError) as exc:  # BadEvent too: written by hand, or newer
                log.warning("ignoring unreadable desired-state field %r: %s", name, exc,
                            extra={"event": "desired_unreadable"})
                continue
            found.append((since, req))
            mirror[_field(req)] = raw.decode() if isinstance(raw, bytes) else raw
        # Learn what Redis holds, never forget from it: a Redis that restarted empty
        # must not erase what this node was asked for (resync writes it back).
        self._mirror.update(mirror)
        return [req for _, req in sorted(found, key=lambda pair: pair[0])]

    async def resync(self) -> int:
        """Write back requests Redis lost; returns how many."""
        present = {n.decode() if isinstance(n, bytes) else n
                   for n in await self.redis.hkeys(self.key)}
        lost = {name: raw for name, raw in self._mirror.items() if name not in present}
        for name, raw in lost.items():
            await self.redis.hset(self.key, name, raw)
        return len(lost)

    async def _write(self, req: Request, source: str, since: float) -> Request:
        raw = _to_json(req, source, since)
        await self.redis.hset(self.key, _field(req), raw)
        self._mirror[_field(req)] = raw
        return replace(req, node=None, request_id=None, force=False)
