"""Where every relay puts what it received: the requests stream, or the dead-letter stream.

A payload is checked with the controller's own parser (:func:`parse_event`), then
against the endpoint's :class:`~warmpool.relay.policy.RelayPolicy`, before it is added:
a relay refuses what the controller would refuse and what its endpoint may not pass on,
and refuses it where the sender can still be told (a webhook's 4xx). Uploads under no
watched prefix are dropped (``ignored``, reason ``not_watched``). The payload is added
unchanged: the controller parses it again, which keeps one format on the stream, whoever
wrote it.

Redis errors are not caught here: the caller must not acknowledge a notification that
is not in the stream (SQS keeps the message, a webhook sender gets a 503 and retries).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from redis.asyncio import Redis

from warmpool.contract.deadletter import dead_record, write_dead_letter
from warmpool.contract.keys import RedisKeys
from warmpool.contract.notifications import parse_event
from warmpool.errors import BadEvent
from warmpool.relay.metrics import RelayMetrics
from warmpool.relay.policy import RelayPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What became of one payload. ``entry_id``: the stream entry when ``relayed``;
    ``reason`` and ``detail``: why, when ``rejected``."""

    status: Literal["relayed", "ignored", "rejected"]
    events: int = 0
    entry_id: str | None = None
    reason: str | None = None
    detail: str | None = None


class StreamSink:
    """One relay's writer. ``relay`` names it in metrics and logs; ``source`` says where
    its payloads came from (a queue URL, a listening address) in dead-letter records."""

    def __init__(self, redis: Redis, keys: RedisKeys, metrics: RelayMetrics, *, relay: str,
                 source: str, node: str) -> None:
        self.redis = redis
        self.keys = keys
        self.metrics = metrics
        self.relay = relay
        self.source = source
        self.node = node
        self._not_watched = 0  # logged at 1, 10, 100, then every 1000: floods stay quiet

    async def put(self, payload: bytes, policy: RelayPolicy, *,
                  sent_at: float | None = None) -> Outcome:
        """Validate ``payload`` against the parser and ``policy`` and add it to the
        requests stream, or dead-letter it, or drop it when nothing in it is watched.

        ``sent_at`` (epoch seconds) is when the store sent it, for the lag metric; without
        it, the payload's own event time is used where it has one."""
        self.metrics.received.labels(self.relay).inc()
        try:
            events = parse_event(payload, accept=policy.accept)
            kept = policy.watched(events)
        except BadEvent as exc:
            await self.reject(payload, exc.reason, exc.detail)
            return Outcome("rejected", reason=exc.reason, detail=exc.detail)
        if not events:
            self.metrics.ignored.labels(self.relay).inc()
            log.info("%s: ignored a notification with nothing to warm (a test event?)",
                     self.relay, extra={"event": "relay_ignored", "relay": self.relay})
            return Outcome("ignored")
        if not kept:
            self.metrics.rejected.labels(self.relay, "not_watched").inc()
            self._not_watched += 1
            if self._not_watched in (1, 10, 100) or self._not_watched % 1000 == 0:
                log.warning("%s: dropped %d notification(s) under no watched prefix "
                            "(the last: %s)", self.relay, self._not_watched,
                            _first_uri(events), extra={"event": "relay_not_watched",
                                                       "relay": self.relay,
                                                       "count": self._not_watched})
            return Outcome("ignored", reason="not_watched",
                           detail=f"{_first_uri(events)} is under no watched prefix")
        entry_id = await self.redis.xadd(self.keys.requests_stream, {"payload": payload})
        self.metrics.relayed.labels(self.relay).inc()
        sent_at = sent_at if sent_at is not None else event_time(payload)
        if sent_at is not None:
            self.metrics.lag.labels(self.relay).observe(max(0.0, time.time() - sent_at))
        return Outcome("relayed", len(events), _text(entry_id))

    async def reject(self, payload: bytes, reason: str, detail: str, *,
                     size: int | None = None) -> None:
        """Count, log and dead-letter a payload the controller could not act on
        (``size``: the whole payload's, when ``payload`` is only its start)."""
        self.metrics.rejected.labels(self.relay, reason).inc()
        log.warning("%s: refused a payload: %s: %s", self.relay, reason, detail,
                    extra={"event": "rejected", "reason": reason, "relay": self.relay})
        await write_dead_letter(self.redis, self.keys.dead_stream,
                                dead_record(payload, reason, detail, self.source, self.node,
                                            size=size))


def event_time(payload: bytes) -> float | None:
    """The time a valid payload names (an S3 record's ``eventTime``, a Pub/Sub message's
    ``publishTime``), as epoch seconds; None when it names none."""
    try:
        doc: Any = json.loads(payload)
        if "Records" in doc:
            stamp = doc["Records"][0]["eventTime"]
        else:
            stamp = doc["message"]["publishTime"]
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def _first_uri(events: list[Any]) -> str:
    return repr(events[0].uri)[:200] if events else "?"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
