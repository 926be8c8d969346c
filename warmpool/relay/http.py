"""``warmpool relay http``: a webhook endpoint for stores that POST their notifications.

``POST /`` takes one notification per request: S3 ``Records`` as MinIO and Ceph RGW send
them, a GCS Pub/Sub push envelope, or a deploy / evict / pin / unpin request (the JSON
the stream carries). It answers 200 only once the payload is in the stream, so a sender
that got no 2xx retries; 400 (413 when too large) with the reason for a payload the
controller would refuse, which is dead-lettered; 401 without the shared secret; 429 past
the request rate; 408 for a body that trickles in; 503 while Redis is unreachable.
``GET /healthz`` answers 200 while Redis does.

The rate limit is one token bucket for the endpoint, checked before the token: a flood
of unauthenticated requests is refused as cheaply as possible, at the price of sharing
the rate with legitimate senders (which retry on 429).

The secret is an ``Authorization: Bearer`` token, or ``?token=`` for senders that cannot
set headers (Pub/Sub push). No access log is written: it would record that token.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from warmpool.controller.deadletter import DEAD_PAYLOAD_BYTES
from warmpool.controller.events import MAX_PAYLOAD_BYTES
from warmpool.controller.redis_client import CONNECTION_ERRORS
from warmpool.errors import ConfigError
from warmpool.relay.sink import Outcome, StreamSink

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5
#: A sender that trickles its body holds a connection and a task: cut it off.
BODY_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class HttpOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None  # None: no secret (only with insecure, on loopback)
    insecure: bool = False
    max_body: int = MAX_PAYLOAD_BYTES  # the parser refuses larger payloads anyway
    rate: float = 200.0  # requests per second, sustained
    burst: int = 400  # requests at once, after a quiet spell

    def check(self) -> None:
        """Refuse to listen without a secret, unless told to and only on loopback."""
        if self.token is None and not self.insecure:
            raise ConfigError("the http relay needs a shared secret: put one in a file and "
                              "pass --token-file, or set WARMPOOL_RELAY_TOKEN (--insecure "
                              "runs without one, on a loopback address only)")
        if self.token is None and not is_loopback(self.host):
            raise ConfigError(f"--insecure (no secret) is only allowed on a loopback "
                              f"address, not on {self.host!r}")
        if self.rate <= 0 or self.burst < 1 or self.max_body < 1:
            raise ConfigError("the http relay's rate, burst and max_body must be positive")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` → (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; one per request."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class HttpRelay:
    def __init__(self, options: HttpOptions, sink: StreamSink) -> None:
        options.check()
        self.options = options
        self.sink = sink
        self.bucket = TokenBucket(options.rate, options.burst)
        self._secret = options.token.encode() if options.token is not None else None
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.options.max_body)
        app.router.add_post("/", self._post)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def start(self) -> int:
        """Listen; returns the port bound (``port`` 0 picks a free one)."""
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                                      shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.options.host, self.options.port)
        await site.start()
        port = int(self._runner.addresses[0][1])
        log.info("http relay listening on %s:%d", self.options.host, port,
                 extra={"event": "relay_listening", "relay": self.sink.relay,
                        "host": self.options.host, "port": port,
                        "auth": self._secret is not None})
        return port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def run(self, stopping: asyncio.Event) -> None:
        """Serve until ``stopping`` is set."""
        await self.start()
        try:
            await stopping.wait()
        finally:
            await self.close()

    # --- handlers ----------------------------------------------------------------------
    async def _post(self, request: web.Request) -> web.StreamResponse:
        if not self.bucket.take():
            return self._refuse(429, "rate_limited", "too many requests",
                                {"Retry-After": "1"})
        if not self._authorized(request):
            return self._refuse(401, "unauthorized", "a valid bearer token is required",
                                {"WWW-Authenticate": 'Bearer realm="warmpool"'})
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                body, whole = await self._body(request)
        except TimeoutError:
            return self._refuse(408, "slow_body", f"the body took over {BODY_TIMEOUT_S} s",
                                {"Connection": "close"})
        try:
            if not whole:
                size = max(request.content_length or 0, len(body) + 1)  # at least
                await self.sink.reject(body, "oversized",
                                       f"body of {size} bytes or more exceeds "
                                       f"{self.options.max_body}", size=size)
                return _json(413, {"status": "rejected", "reason": "oversized",
                                   "detail": f"the body exceeds {self.options.max_body} bytes"})
            outcome = await self.sink.put(body)
        except CONNECTION_ERRORS as exc:
            log.warning("http relay: Redis unreachable (%s); answering 503", exc,
                        extra={"event": "redis_unreachable", "relay": self.sink.relay})
            return _json(503, {"status": "unavailable", "detail": "Redis is unreachable"},
                         {"Retry-After": str(RETRY_AFTER_S)})
        return _answer(outcome)

    def _authorized(self, request: web.Request) -> bool:
        if self._secret is None:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            given = request.query.get("token", "")
        return hmac.compare_digest(given.strip().encode(), self._secret)

    async def _body(self, request: web.Request) -> tuple[bytes, bool]:
        """``(body, True)``, or ``(its first max_body bytes, False)`` when it is longer:
        a longer body is read no further (a dead letter keeps only its start anyway)."""
        limit = self.options.max_body
        if request.content_length is not None and request.content_length > limit:
            return await request.content.read(min(limit, DEAD_PAYLOAD_BYTES)), False
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await request.content.readany()
            if not chunk:
                return b"".join(chunks), True
            size += len(chunk)
            chunks.append(chunk)
            if size > limit:
                return b"".join(chunks)[:limit], False

    def _refuse(self, status: int, reason: str, detail: str,
                headers: dict[str, str]) -> web.Response:
        self.sink.metrics.rejected.labels(self.sink.relay, reason).inc()
        return _json(status, {"status": "rejected", "reason": reason, "detail": detail}, headers)

    async def _healthz(self, request: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(self.sink.redis.ping(), 2.0)
        except CONNECTION_ERRORS as exc:  # includes TimeoutError
            return _json(503, {"status": "unavailable", "detail": f"Redis: {exc}"})
        return _json(200, {"status": "ok"})


def _answer(outcome: Outcome) -> web.Response:
    if outcome.status == "rejected":
        status = 413 if outcome.reason == "oversized" else 400
        return _json(status, {"status": "rejected", "reason": outcome.reason,
                              "detail": outcome.detail})
    doc: dict[str, Any] = {"status": outcome.status, "events": outcome.events}
    if outcome.entry_id:
        doc["id"] = outcome.entry_id
    return _json(200, doc)


def _json(status: int, doc: dict[str, Any], headers: dict[str, str] | None = None
          ) -> web.Response:
    return web.json_response(doc, status=status, headers=headers)
