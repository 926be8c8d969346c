"""``warmpool relay http``: a webhook endpoint for stores that POST their notifications.

Two paths, each with its own secret and its own :class:`~warmpool.relay.policy.RelayPolicy`:

- ``POST /`` takes one *notification* per request: S3 ``Records`` as MinIO and Ceph RGW
  send them, or a GCS Pub/Sub push envelope. Uploads under no watched prefix are
  answered 202 ``ignored`` / ``not_watched`` and dropped.
- ``POST /requests`` takes one *request* (deploy, evict, pin, unpin: the JSON the stream
  carries). It exists only when a requests token is configured (``requests_token_file``):
  a bucket's notifier must not be able to evict a model. ``force`` and local paths are
  refused unless the operator allowed them.

Answers: 200 only once the payload is in the stream, so a sender that got no 2xx retries;
400 (413 when too large) for a payload the controller would refuse, 403 for one this
relay may not pass on (both dead-lettered); 401 without the path's secret; 415 without
``Content-Type: application/json``; 403 for a cross-origin request (an ``Origin``
header) or a ``Host`` this relay does not serve; 429 past the request rate; 408 for a
body that trickles in; 503 while Redis is unreachable or slower than ``redis_timeout_s``.
``GET /healthz`` answers 200 while Redis does.

Why each check: a web page in a browser on the node can POST to a loopback relay.
Browsers send ``Content-Type: text/plain`` without asking the server first, and always
send ``Origin`` on a cross-site POST; a DNS-rebinding page sends its own ``Host``. So a
loopback relay without a secret is safe from pages only with all three checks.

The secret is checked before the rate limit: unauthenticated floods are answered 401
and never use up the rate that legitimate senders share. A connection must deliver its
request headers within ``header_timeout_s`` of opening (or of its previous answer);
past ``max_connections`` the oldest connection still waiting for its headers is closed
to let the new one in. No access log is written: it would record the ``?token=`` query.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from warmpool.contract.deadletter import DEAD_PAYLOAD_BYTES
from warmpool.contract.notifications import MAX_PAYLOAD_BYTES
from warmpool.contract.redis_client import CONNECTION_ERRORS
from warmpool.contract.watchlist import Watchlist
from warmpool.errors import ConfigError
from warmpool.relay.logs import RateLimitedLog, quiet_aiohttp_errors
from warmpool.relay.policy import POLICY_REASONS, RelayPolicy
from warmpool.relay.sink import Outcome, StreamSink

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5
#: Shortest secret accepted: 16 bytes of a random token are 128 bits or so.
MIN_TOKEN_BYTES = 16
MAX_BODY_LIMIT = 16 << 20
MAX_RATE = 1e6
JSON_TYPES = ("application/json",)
#: Redis down, or slower than ``redis_timeout_s``: answered 503, and the sender retries.
_UNAVAILABLE: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, TimeoutError)


@dataclass(frozen=True)
class HttpOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None  # POST /; None: no secret (only with insecure, on loopback)
    insecure: bool = False
    max_body: int = MAX_PAYLOAD_BYTES  # the parser refuses larger payloads anyway
    rate: float = 200.0  # authenticated requests per second, sustained
    burst: int = 400  # authenticated requests at once, after a quiet spell
    requests_token: str | None = None  # POST /requests exists only with one
    allow_force: bool = False
    allow_local_paths: bool = False
    request_prefixes: tuple[str, ...] = ()
    allow_fleet: bool = False
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    redis_timeout_s: float = 3.0
    max_connections: int = 256  # also bounded by half the open-file limit
    watch: Watchlist = field(default_factory=Watchlist)

    def check(self) -> None:
        """Refuse to listen without a secret, unless told to and only on loopback; refuse
        numbers that would turn a limit off (``nan``, 0, huge)."""
        if self.token is None and not self.insecure:
            raise ConfigError("the http relay needs a shared secret: put one in a file "
                              "(mode 0600) and pass --token-file, or set "
                              "WARMPOOL_RELAY_TOKEN (--insecure runs without one, on a "
                              "loopback address only)")
        if self.token is None and not is_loopback(self.host):
            raise ConfigError(f"--insecure (no secret) is only allowed on a loopback "
                              f"address, not on {self.host!r}")
        for name, token in (("token", self.token), ("requests token", self.requests_token)):
            if token is not None and len(token.encode()) < MIN_TOKEN_BYTES:
                raise ConfigError(f"the relay's {name} is {len(token.encode())} bytes; use "
                                  f"at least {MIN_TOKEN_BYTES} (e.g. openssl rand -hex 32)")
        if self.requests_token is not None and self.requests_token == self.token:
            raise ConfigError("the requests token must differ from the notification token "
                              "(a bucket's notifier must not be able to send requests)")
        _within("rate", self.rate, 1e-3, MAX_RATE)
        _within("burst", self.burst, 1, MAX_RATE)
        _within("max_body", self.max_body, 1, MAX_BODY_LIMIT)
        _within("max_connections", self.max_connections, 1, 65536)
        for name in ("header_timeout_s", "body_timeout_s", "redis_timeout_s"):
            _within(name, getattr(self, name), 0.1, 3600)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port}: use 0 to 65535")

    def connection_limit(self) -> int:
        """``max_connections``, but at most half the open-file limit: the other half is
        for Redis, the log and (under ``serve``) the controller."""
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        return max(4, min(self.max_connections, soft // 2))


def _within(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value) or not low <= value <= high:
        raise ConfigError(f"the http relay's {name} {value!r}: use a number from {low:g} "
                          f"to {high:g}")


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


def host_name(header: str) -> str:
    """The host part of a ``Host`` header: ``[::1]:80`` → ``::1``, ``a:80`` → ``a``."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    name, sep, port = header.rpartition(":")
    return name if sep and port.isdigit() else header


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


class Connections:
    """The relay's connections: each must deliver a request within ``header_timeout``
    of opening, and at most ``limit`` are open. At the limit the oldest one that has
    delivered nothing yet is closed (a slow client, most likely), so that a new sender
    still gets in; when every connection is busy with a request, the new one is closed."""

    def __init__(self, server: web.Server, limit: int, header_timeout: float) -> None:
        self.server = server
        self.limit = limit
        self.header_timeout = header_timeout
        self.waiting: dict[RequestHandler, None] = {}  # oldest first
        self.cut = RateLimitedLog(log, "http relay: closed %d connection(s) that sent no "
                                  "request in time or came past the connection limit")

    def protocol(self) -> Any:
        loop = asyncio.get_running_loop()
        if len(self.server.connections) >= self.limit and not self._close_oldest_waiting():
            self.cut.hit()
            return _Refused()
        handler = self.server()
        self.waiting[handler] = None
        loop.call_later(self.header_timeout, self._expire, handler)
        return handler

    def delivered(self, handler: object) -> None:
        """``handler`` delivered a request: from now on aiohttp's keep-alive timeout
        (``header_timeout`` as well) bounds its idle time."""
        self.waiting.pop(handler, None)  # type: ignore[call-overload]

    def _expire(self, handler: RequestHandler) -> None:
        if self.waiting.pop(handler, False) is None:
            self.cut.hit()
            handler.force_close()

    def _close_oldest_waiting(self) -> bool:
        while self.waiting:
            handler = next(iter(self.waiting))
            del self.waiting[handler]
            if handler.transport is not None:
                self.cut.hit()
                handler.force_close()
                return True
        return False


class _Refused:
    """A connection past the limit: closed as soon as it is accepted (an fd held
    open would be one more for a flood to use up)."""

    def connection_made(self, transport: Any) -> None:
        transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


class HttpRelay:
    def __init__(self, options: HttpOptions, sink: StreamSink) -> None:
        options.check()
        self.options = options
        self.sink = sink
        self.bucket = TokenBucket(options.rate, options.burst)
        self._secrets = {"/": _secret(options.token),
                         "/requests": _secret(options.requests_token)}
        self._policies = {
            "/": RelayPolicy.notifications(options.watch),
            "/requests": RelayPolicy.requests(
                allow_force=options.allow_force, allow_local_paths=options.allow_local_paths,
                request_prefixes=options.request_prefixes, allow_fleet=options.allow_fleet)}
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self.connections: Connections | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.options.max_body,
                              middlewares=[self._checks])
        app.router.add_post("/", self._post)
        if self.options.requests_token is not None:
            app.router.add_post("/requests", self._post)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def start(self) -> int:
        """Listen; returns the port bound (``port`` 0 picks a free one)."""
        quiet_aiohttp_errors()
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                                      shutdown_timeout=5.0,
                                      keepalive_timeout=self.options.header_timeout_s)
        await self._runner.setup()
        assert self._runner.server is not None
        self.connections = Connections(self._runner.server, self.options.connection_limit(),
                                       self.options.header_timeout_s)
        loop = asyncio.get_running_loop()
        _quiet_accept_errors(loop)
        self._server = await loop.create_server(self.connections.protocol, self.options.host,
                                                self.options.port, reuse_address=True)
        port = int(self._server.sockets[0].getsockname()[1])
        log.info("http relay listening on %s:%d", self.options.host, port,
                 extra={"event": "relay_listening", "relay": self.sink.relay,
                        "host": self.options.host, "port": port,
                        "auth": self._secrets["/"] is not None,
                        "requests": self.options.requests_token is not None,
                        "watched": [str(p) for p in self.options.watch.prefixes],
                        "max_connections": self.connections.limit})
        if not self.options.watch.prefixes:
            log.warning("http relay: the node watches no prefix, so every upload "
                        "notification will be dropped (set 'watch' in the config)",
                        extra={"event": "relay_watches_nothing", "relay": self.sink.relay})
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
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
    @web.middleware
    async def _checks(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Before any route: the connection delivered a request; the request is for this
        relay (``Host``) and not from a web page (``Origin``)."""
        if self.connections is not None:
            self.connections.delivered(request.protocol)
        name = host_name(request.headers.get("Host", ""))
        allowed = self.options.allowed_hosts
        if allowed and name not in allowed or not allowed and is_loopback(
                self.options.host) and not is_loopback(name):
            return self._refuse(403, "bad_host", f"this relay does not serve the host "
                                f"{name[:100]!r} (allowed_hosts)", {"Connection": "close"})
        origin = request.headers.get("Origin")
        if origin is not None and origin not in self.options.allowed_origins:
            return self._refuse(403, "cross_origin", "requests from web pages (with an "
                                "Origin header) are refused (allowed_origins)", {})
        response: web.StreamResponse = await handler(request)
        return response

    async def _post(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if request.content_type not in JSON_TYPES:
            return self._refuse(415, "unsupported_media_type", "send the body as "
                                "Content-Type: application/json", {})
        authorized = self._authorized(request, self._secrets[path])
        if authorized is None:
            return self._refuse(400, "bad_header", "the Authorization header is not "
                                "valid text", {"Connection": "close"})
        if not authorized:
            return self._refuse(401, "unauthorized", "a valid bearer token is required",
                                {"WWW-Authenticate": 'Bearer realm="warmpool"'})
        if not self.bucket.take():
            return self._refuse(429, "rate_limited", "too many requests",
                                {"Retry-After": "1"})
        try:
            async with asyncio.timeout(self.options.body_timeout_s):
                body, whole = await self._body(request)
        except TimeoutError:
            return self._refuse(408, "slow_body", f"the body took over "
                                f"{self.options.body_timeout_s} s", {"Connection": "close"})
        try:
            async with asyncio.timeout(self.options.redis_timeout_s):
                if not whole:
                    size = max(request.content_length or 0, len(body) + 1)  # at least
                    await self.sink.reject(body, "oversized",
                                           f"body of {size} bytes or more exceeds "
                                           f"{self.options.max_body}", size=size)
                    return _json(413, {"status": "rejected", "reason": "oversized",
                                       "detail": f"the body exceeds {self.options.max_body} "
                                                 "bytes"})
                outcome = await self.sink.put(body, self._policies[path])
        except _UNAVAILABLE as exc:
            log.warning("http relay: Redis unreachable (%s); answering 503",
                        type(exc).__name__ if isinstance(exc, TimeoutError) else exc,
                        extra={"event": "redis_unreachable", "relay": self.sink.relay})
            return _json(503, {"status": "unavailable", "detail": "Redis is unreachable"},
                         {"Retry-After": str(RETRY_AFTER_S)})
        return _answer(outcome)

    @staticmethod
    def _authorized(request: web.Request, secret: bytes | None) -> bool | None:
        """True or False; None when the header's bytes are not text (aiohttp hands them
        over with surrogate escapes). Compared in constant time, never logged."""
        if secret is None:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            given = request.query.get("token", "")
        try:
            given_bytes = given.strip().encode("utf-8")
        except UnicodeEncodeError:
            return None
        return hmac.compare_digest(given_bytes, secret)

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
            await asyncio.wait_for(self.sink.redis.ping(), self.options.redis_timeout_s)
        except CONNECTION_ERRORS as exc:  # includes TimeoutError
            return _json(503, {"status": "unavailable", "detail": f"Redis: {exc}"})
        except TimeoutError:
            return _json(503, {"status": "unavailable", "detail": "Redis: no answer"})
        return _json(200, {"status": "ok"})


def _secret(token: str | None) -> bytes | None:
    return token.encode() if token is not None else None


def _answer(outcome: Outcome) -> web.Response:
    if outcome.status == "rejected":
        status = 413 if outcome.reason == "oversized" else 403 if outcome.reason in (
            *POLICY_REASONS, "not_accepted") else 400
        return _json(status, {"status": "rejected", "reason": outcome.reason,
                              "detail": outcome.detail})
    doc: dict[str, Any] = {"status": outcome.status, "events": outcome.events}
    if outcome.entry_id:
        doc["id"] = outcome.entry_id
    if outcome.reason:
        doc["reason"] = outcome.reason
        doc["detail"] = outcome.detail
        return _json(202, doc)
    return _json(200, doc)


def _json(status: int, doc: dict[str, Any], headers: dict[str, str] | None = None
          ) -> web.Response:
    return web.json_response(doc, status=status, headers=headers)


_ACCEPT_ERROR = "socket.accept() out of system resource"


def _quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio reports each failed ``accept()`` past the open-file limit through the
    loop's exception handler, once per retry (136,403 lines in 25 s, measured): let
    through one line per interval with the count, and everything else unchanged."""
    previous = loop.get_exception_handler()
    if getattr(previous, "warmpool_quiet_accept", False):
        return
    limited = RateLimitedLog(logging.getLogger("asyncio"),
                             _ACCEPT_ERROR + ": %d time(s); the relay's connection limit "
                             "or the open-file limit (ulimit -n) is too low for this load")

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith(_ACCEPT_ERROR):
            limited.hit()
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.warmpool_quiet_accept = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)
