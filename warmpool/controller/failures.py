"""Desired models that keep failing: back off, then give up until asked again.

A deploy of a model that does not exist (or cannot fit, or is corrupt) stays desired —
the request was the operator's, not ours to drop — but it must stop costing work. Each
failed warm-up of a wanted model is counted here, per (model, device) of this node, and
the next attempt waits ``base_s · 2^(n-1)`` (up to ``cap_s``). After ``give_up_after``
failures the model is *given up*: convergence and reconciliation skip it, and
``warmpool status`` lists it with its reason, until a new deploy or pin asks again (the
count restarts) or an evict removes it. A warm-up that succeeds clears the record.

Kept in Redis beside the desired state (``p:desired-failures:<node>``), so a restarted
controller does not retry a given-up model at once; the hash has at most one field per
desired model.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from redis.asyncio import Redis

from warmpool.contract.keys import RedisKeys
from warmpool.controller.desired import want_field


@dataclass(frozen=True)
class Failing:
    """What went wrong with one wanted model, and when to try it again."""

    uri: str
    device: str
    failures: int
    error: str
    retry_at: float
    given_up: bool

    def due(self, now: float) -> bool:
        return not self.given_up and now >= self.retry_at

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RetrySchedule:
    """When a desired model that failed is tried again, and when it is given up: doubling
    delays without jitter (a person reads them in ``warmpool status``), unlike
    :class:`warmpool.retry.Backoff`, which spreads retries of one storage call."""

    base_s: float = 30.0
    cap_s: float = 3600.0
    give_up_after: int = 5

    def delay(self, failures: int) -> float:
        return min(self.cap_s, self.base_s * 2 ** max(0, failures - 1))


class Failures:
    def __init__(self, redis: Redis, keys: RedisKeys, node: str,
                 backoff: RetrySchedule = RetrySchedule()) -> None:
        self.redis = redis
        self.key = keys.desired_failures(node)
        self.backoff = backoff

    async def failed(self, uri: str, device: str, error: str, *,
                     give_up: bool = False) -> Failing:
        """Count one more failure of (``uri``, ``device``); returns its new record.
        ``give_up``: no retry can help (a setting is missing), so give up at once."""
        before = await self.get(uri, device)
        failures = (before.failures if before else 0) + 1
        record = Failing(uri, device, failures, error[:2048],
                         time.time() + self.backoff.delay(failures),
                         give_up or failures >= self.backoff.give_up_after)
        await self.redis.hset(self.key, want_field(uri, device), json.dumps(record.to_json()))
        return record

    async def clear(self, uri: str, device: str) -> None:
        """It warmed, was asked for again, or is no longer wanted."""
        await self.redis.hdel(self.key, want_field(uri, device))

    async def get(self, uri: str, device: str) -> Failing | None:
        raw = await self.redis.hget(self.key, want_field(uri, device))
        return _decode(raw)

    async def all(self) -> dict[str, Failing]:
        """Every record, by desired-state field (``device|uri``)."""
        out = {}
        for name, raw in (await self.redis.hgetall(self.key)).items():
            record = _decode(raw)
            if record is not None:
                out[name.decode() if isinstance(name, bytes) else name] = record
        return out


def _decode(raw: bytes | str | None) -> Failing | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        return Failing(str(data["uri"]), str(data["device"]), int(data["failures"]),
                       str(data["error"]), float(data["retry_at"]), bool(data["given_up"]))
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: treated as no record (the model is simply tried)
