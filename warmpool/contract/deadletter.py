"""The dead-letter stream's record: one shape for every writer (controller and relays).

A refused payload is kept (its first bytes) with why it was refused and where it came
from, so an operator can read the reason and replay a fixed payload where it belongs.
The stream is capped: a flood of bad payloads must not fill Redis.
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis

DEAD_PAYLOAD_BYTES = 4096  # what the dead-letter stream keeps of a refused payload
DEAD_MAXLEN = 10_000


def dead_record(payload: bytes, reason: str, detail: str, source: str, node: str, *,
                size: int | None = None) -> dict[Any, Any]:
    """``source``: the channel or stream it came from (or the queue / endpoint of a
    relay). ``size`` is the whole payload's (pass it when ``payload`` is only its start);
    ``truncated`` says whether the record holds less than that."""
    size = len(payload) if size is None else size
    kept = bytes(payload[:DEAD_PAYLOAD_BYTES])
    return {"payload": kept, "reason": reason, "detail": detail[:1024], "source": source,
            "node": node, "size": size, "truncated": int(size > len(kept)),
            "ts": repr(time.time())}


async def write_dead_letter(redis: Redis, stream: str, record: dict[Any, Any]) -> None:
    await redis.xadd(stream, record, maxlen=DEAD_MAXLEN, approximate=True)
