"""``warmpool relay sqs``: S3 notifications from an SQS queue into the requests stream.

At least once: a message is deleted from the queue only after its notification is in
the stream (or, when malformed, in the dead-letter stream — a message that can never be
acted on must not come back forever). A relay that dies in between leaves the message
to reappear after the queue's visibility timeout.

Messages are taken off the queue only while Redis answers: during an outage they stay
in the queue (not half-taken by a relay that cannot pass them on), and the relay
catches up when Redis returns. Bodies are S3 event notifications, the same wrapped in
an SNS envelope (a topic fanned out to the queue), or ``s3:TestEvent`` (ignored).

A bucket's queue is written by the bucket (and whoever else its policy lets send), so
nothing else passes: a request (deploy, evict...) or any other shape is dead-lettered
(``not_accepted``), and uploads under no watched prefix are dropped
(:class:`~warmpool.relay.policy.RelayPolicy`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import aiohttp
import botocore.exceptions as bce

from warmpool.contract.redis_client import keep_running
from warmpool.relay.policy import RelayPolicy
from warmpool.relay.sink import StreamSink
from warmpool.retry import Backoff
from warmpool.storage.s3 import aws_client

log = logging.getLogger(__name__)

_REGION = re.compile(r"https://(?:sqs\.([a-z0-9-]+)|([a-z0-9-]+)\.queue)\.amazonaws\.com(?:\.cn)?/")
#: Errors of the SQS call itself (not of Redis): logged, backed off, tried again.
_SQS_ERRORS = (bce.BotoCoreError, bce.ClientError, aiohttp.ClientError, TimeoutError)
_BACKOFF = Backoff(attempts=1_000_000, base=0.5, cap=20.0)


@dataclass(frozen=True)
class SqsOptions:
    queue_url: str
    wait_s: int = 20  # long poll: SQS answers at once when a message arrives
    batch: int = 10  # SQS's maximum per receive
    visibility_timeout_s: int | None = None  # None: the queue's own setting


def region_of(queue_url: str) -> str | None:
    """``https://sqs.eu-west-1.amazonaws.com/...`` names its region; other URLs do not."""
    found = _REGION.match(queue_url)
    return (found.group(1) or found.group(2)) if found else None


def unwrap(body: str) -> bytes:
    """The notification inside an SNS envelope, or the body itself."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body.encode("utf-8", "surrogateescape")
    if isinstance(doc, dict) and doc.get("Type") == "Notification" and isinstance(
            doc.get("Message"), str) and "TopicArn" in doc:
        return str(doc["Message"]).encode()
    return body.encode()


class SqsRelay:
    def __init__(self, options: SqsOptions, sink: StreamSink, policy: RelayPolicy) -> None:
        self.options = options
        self.sink = sink
        self.policy = policy
        self._failures = 0

    async def run(self, stopping: asyncio.Event) -> None:
        """Relay until ``stopping`` is set."""
        log.info("relaying %s into %s", self.options.queue_url, self.sink.keys.requests_stream,
                 extra={"event": "relay_started", "relay": self.sink.relay,
                        "queue": self.options.queue_url})
        async with aws_client("sqs", region=region_of(self.options.queue_url),
                              read_timeout=self.options.wait_s + 30) as sqs:
            await keep_running(self.sink.relay, lambda: self._run_once(sqs, stopping), stopping)

    async def _run_once(self, sqs: Any, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            await self.sink.redis.ping()  # no Redis: take nothing off the queue
            messages = await self._receive(sqs, stopping)
            if messages:
                await self._relay(sqs, messages)

    async def _receive(self, sqs: Any, stopping: asyncio.Event) -> list[dict[str, Any]]:
        kwargs: dict[str, Any] = {
            "QueueUrl": self.options.queue_url, "MaxNumberOfMessages": self.options.batch,
            "WaitTimeSeconds": self.options.wait_s, "AttributeNames": ["SentTimestamp"]}
        if self.options.visibility_timeout_s is not None:
            kwargs["VisibilityTimeout"] = self.options.visibility_timeout_s
        receive = asyncio.ensure_future(sqs.receive_message(**kwargs))
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not receive.done():  # stopping: what it would have taken reappears later
            receive.cancel()
            with suppress(asyncio.CancelledError, *_SQS_ERRORS):
                await receive
            return []
        try:
            reply = receive.result()
        except _SQS_ERRORS as exc:
            await self._sqs_failed("receive", exc, stopping)
            return []
        self._failures = 0
        return list(reply.get("Messages", []))

    async def _relay(self, sqs: Any, messages: list[dict[str, Any]]) -> None:
        """Pass each message on; delete those passed on, even when Redis fails midway
        (the rest stay in the queue and come back after their visibility timeout)."""
        done: list[dict[str, Any]] = []
        try:
            for message in messages:
                sent = message.get("Attributes", {}).get("SentTimestamp")
                await self.sink.put(unwrap(message.get("Body", "")), self.policy,
                                    sent_at=int(sent) / 1000 if sent else None)
                done.append(message)
        finally:
            if done:
                await self._delete(sqs, done)

    async def _delete(self, sqs: Any, messages: list[dict[str, Any]]) -> None:
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                   for i, m in enumerate(messages)]
        try:
            reply = await sqs.delete_message_batch(QueueUrl=self.options.queue_url,
                                                   Entries=entries)
        except _SQS_ERRORS as exc:  # they come back and are relayed again: harmless
            log.warning("%s: deleting %d message(s) failed (%s); they will be relayed again",
                        self.sink.relay, len(entries), exc,
                        extra={"event": "relay_delete_failed", "relay": self.sink.relay})
            return
        for failed in reply.get("Failed", []):
            log.warning("%s: deleting a message failed: %s", self.sink.relay,
                        failed.get("Message") or failed.get("Code"),
                        extra={"event": "relay_delete_failed", "relay": self.sink.relay})

    async def _sqs_failed(self, what: str, exc: BaseException, stopping: asyncio.Event) -> None:
        self._failures += 1
        delay = _BACKOFF.delay(min(self._failures, 10))
        log.log(logging.WARNING if self._failures == 1 else logging.DEBUG,
                "%s: SQS %s failed (%s); trying again in %.1fs", self.sink.relay, what, exc,
                delay, extra={"event": "relay_sqs_failed", "relay": self.sink.relay})
        with suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay)
