"""Where payloads come from: Redis pub/sub (at most once) and streams (at least once).

Both readers hand each payload to the same handler, in its own task, up to a bound of
payloads in flight (the reader stops reading while the bound is reached, which is the
backpressure). A reader's ``run_once`` lives for one connection: it (re-)subscribes or
(re-)creates its consumer group first, so :func:`warmpool.contract.redis_client.keep_running`
resumes it after a Redis restart by simply calling it again.

Stream entries are acknowledged only after their handler finished. An entry whose
consumer died is claimed (``XAUTOCLAIM``) once it has been idle for ``claim_idle_ms``;
a live consumer keeps its long-running entries from looking idle by re-claiming them for
itself. An entry delivered more than ``max_deliveries`` times (it crashed every consumer
that took it) is dead-lettered as ``poison`` instead of being tried again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis import exceptions as rexc
from redis.asyncio import Redis

from warmpool.contract.redis_client import CONNECTION_ERRORS

log = logging.getLogger(__name__)

#: ``handler(payload, source)``; ``source`` is ``"pubsub"``, ``"shared"`` or ``"node"``.
Handler = Callable[[bytes, str], Awaitable[None]]
DeadLetter = Callable[[bytes, str, str, str], Awaitable[None]]


class PubSubSource:
    def __init__(self, redis: Redis, channel: str, handler: Handler, stopping: asyncio.Event,
                 *, max_inflight: int = 64) -> None:
        self.redis = redis
        self.channel = channel
        self.handler = handler
        self.stopping = stopping
        self.tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_inflight)
        self.subscribed = asyncio.Event()

    async def run_once(self) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
            self.subscribed.set()
            while not self.stopping.is_set():
                message = await pubsub.get_message(timeout=0.5)
                if message is not None and message["type"] == "message":
                    await self._slots.acquire()
                    self._spawn(message["data"])
        finally:
            self.subscribed.clear()
            await pubsub.aclose()

    def _spawn(self, payload: bytes) -> None:
        task = asyncio.create_task(self._run(payload))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, payload: bytes) -> None:
        try:
            await self.handler(payload, "pubsub")
        except Exception:  # noqa: BLE001 - at most once: log and go on
            log.exception("handling a pub/sub payload failed")
        finally:
            self._slots.release()


class StreamSource:
    def __init__(self, redis: Redis, streams: dict[str, str], group: str, consumer: str,
                 handler: Handler, dead_letter: DeadLetter, stopping: asyncio.Event, *,
                 max_inflight: int = 32, claim_idle_ms: int = 60_000, max_deliveries: int = 5,
                 block_ms: int = 500) -> None:
        self.redis = redis
        self.streams = streams  # stream name -> source kind ("shared" or "node")
        self.group = group
        self.consumer = consumer
        self.handler = handler
        self.dead_letter = dead_letter
        self.stopping = stopping
        self.max_inflight = max_inflight
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.block_ms = block_ms
        self.inflight: dict[tuple[str, bytes], asyncio.Task[None]] = {}
        self.ready = asyncio.Event()

    async def ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                # from "0": entries added before any controller existed are read too
                await self.redis.xgroup_create(stream, self.group, id="0", mkstream=True)
            except rexc.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def run_once(self) -> None:
        self.ready.clear()
        await self.ensure_groups()
        self.ready.set()
        while not self.stopping.is_set():
            room = self.max_inflight - len(self.inflight)
            if room <= 0:
                await asyncio.wait(list(self.inflight.values()), timeout=0.5,
                                   return_when=asyncio.FIRST_COMPLETED)
                continue
            reply: Any = await self.redis.xreadgroup(self.group, self.consumer,
                                                     {s: ">" for s in self.streams},
                                                     count=room, block=self.block_ms)
            for stream, entries in reply or []:
                for entry_id, fields in entries:
                    self._start(_text(stream), entry_id, fields)

    def _start(self, stream: str, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        if (stream, entry_id) in self.inflight:
            return
        task = asyncio.create_task(self._process(stream, entry_id, _payload(fields)))
        self.inflight[(stream, entry_id)] = task
        task.add_done_callback(lambda _t: self.inflight.pop((stream, entry_id), None))

    async def _process(self, stream: str, entry_id: bytes, payload: bytes) -> None:
        try:
            await self.handler(payload, self.streams[stream])
        except Exception:  # noqa: BLE001 - not acked: retried, and dead-lettered as poison
            log.exception("handling stream entry %s %s failed", stream, _text(entry_id))
            return
        await self._ack(stream, entry_id)

    async def _ack(self, stream: str, entry_id: bytes) -> None:
        # The work is done: keep trying to say so through a short outage, or the entry
        # is done twice (harmless, work is idempotent, but slow).
        for attempt in range(20):
            try:
                await self.redis.xack(stream, self.group, entry_id)
                return
            except rexc.ResponseError:
                return  # NOGROUP: Redis came back empty, the entry is gone with it
            except CONNECTION_ERRORS:
                await asyncio.sleep(min(0.1 * 2**attempt, 3.0))

    # --- claiming from dead consumers -------------------------------------------------
    async def claim_once(self) -> int:
        """Take over entries idle too long (their consumer died); returns how many."""
        claimed = 0
        for stream in self.streams:
            room = self.max_inflight - len(self.inflight)
            if room <= 0:
                break
            reply = await self.redis.xautoclaim(stream, self.group, self.consumer,
                                                min_idle_time=self.claim_idle_ms,
                                                start_id="0-0", count=room)
            for entry_id, fields in reply[1]:
                if fields is None or (stream, entry_id) in self.inflight:
                    continue
                if await self._poisoned(stream, entry_id, fields):
                    continue
                log.info("claimed %s %s from a dead consumer", stream, _text(entry_id),
                         extra={"event": "claimed", "stream": stream})
                self._start(stream, entry_id, fields)
                claimed += 1
        return claimed

    async def _poisoned(self, stream: str, entry_id: bytes, fields: dict[bytes, bytes]) -> bool:
        info = await self.redis.xpending_range(stream, self.group, min=entry_id, max=entry_id,
                                               count=1)
        deliveries = int(info[0]["times_delivered"]) if info else 0
        if deliveries <= self.max_deliveries:
            return False
        await self.dead_letter(_payload(fields), "poison",
                               f"delivered {deliveries} times without being done", stream)
        await self.redis.xack(stream, self.group, entry_id)
        return True

    async def touch(self) -> None:
        """Reset the idle time of our entries in flight, so nobody claims them."""
        by_stream: dict[str, list[Any]] = {}  # entry ids, as redis-py types them
        for stream, entry_id in list(self.inflight):
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            await self.redis.xclaim(stream, self.group, self.consumer, min_idle_time=0,
                                    message_ids=ids, justid=True)


def _payload(fields: dict[bytes, bytes]) -> bytes:
    """The ``payload`` field; an entry without one is passed on whole (as JSON) so that
    parsing refuses it with a reason like any other malformed event."""
    if b"payload" in fields:
        return fields[b"payload"]
    return json.dumps({_text(k): _text(v) for k, v in fields.items()}).encode()


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
