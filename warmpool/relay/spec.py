"""A relay's settings, from the command line or the config file's ``relays:`` list, and
the relays built from them.

In the config file (``warmpool serve`` runs each next to the controller)::

    relays:
      - kind: sqs
        queue_url: https://sqs.eu-west-1.amazonaws.com/123456789012/model-uploads
      - kind: http
        listen: 0.0.0.0:8080
        token_file: /etc/warmpool/relay-token
        requests_token_file: /etc/warmpool/relay-requests-token  # enables POST /requests

The webhook's secrets come from ``token_file`` (``WARMPOOL_RELAY_TOKEN``) and
``requests_token_file`` (``WARMPOOL_RELAY_REQUESTS_TOKEN``), never from the config file
itself or a command line (both are too easily read by others). A token file that other
users may read, or a token shorter than 16 bytes, is refused. Every setting is checked
strictly: a boolean is ``true`` or ``false`` (the string ``"false"`` is an error, not
true), a number is finite and within its bounds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from warmpool.config import parse_bytes
from warmpool.contract.keys import RedisKeys
from warmpool.contract.watchlist import Watchlist
from warmpool.errors import ConfigError
from warmpool.relay.http import HttpOptions, HttpRelay, parse_listen
from warmpool.relay.metrics import RelayMetrics
from warmpool.relay.policy import RelayPolicy
from warmpool.relay.sink import StreamSink
from warmpool.relay.sqs import SqsOptions, SqsRelay

log = logging.getLogger(__name__)
TOKEN_ENV = "WARMPOOL_RELAY_TOKEN"
REQUESTS_TOKEN_ENV = "WARMPOOL_RELAY_REQUESTS_TOKEN"
KINDS = ("sqs", "http")


@dataclass(frozen=True)
class RelaySpec:
    kind: str
    name: str = ""  # the ``relay`` label of its metrics; default: the kind
    # sqs
    queue_url: str = ""
    wait_s: int = 20
    visibility_timeout_s: int | None = None
    # http
    listen: str = ""
    token_file: str = ""
    insecure: bool = False
    max_body: int | str | None = None
    rate: float = 200.0
    burst: int = 400
    requests_token_file: str = ""
    allow_force: bool = False
    allow_local_paths: bool = False
    request_prefixes: tuple[str, ...] = ()
    allow_fleet: bool = False
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    max_connections: int = 256

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> RelaySpec:
        """From one entry of the config file's ``relays:`` list."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown relay setting(s) {', '.join(map(repr, unknown))}; "
                              f"known: {', '.join(sorted(known))}")
        if raw.get("kind") not in KINDS:
            raise ConfigError(f"relay kind {raw.get('kind')!r}: use one of {', '.join(KINDS)}")
        values = dict(raw)
        for name, value in raw.items():
            kind = _KINDS.get(name)
            where = f"relays[{raw.get('name') or raw['kind']}].{name}"
            if kind is bool and not isinstance(value, bool):
                raise ConfigError(f"{where}: {value!r} is not true or false")
            if kind is tuple:
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{where}: {value!r} is not a list of strings")
                values[name] = tuple(value)
            if kind in (int, float) and (isinstance(value, bool) or not isinstance(
                    value, (int, float)) or kind is int and isinstance(value, float)):
                what = "an integer" if kind is int else "a number"
                raise ConfigError(f"{where}: {value!r} is not {what}")
            if kind is str and not isinstance(value, str):
                raise ConfigError(f"{where}: {value!r} is not a string")
        try:
            spec = cls(**values)
            spec.check()
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"relay settings {dict(raw)!r}: {exc}") from None
        return spec

    def check(self) -> None:
        if self.kind == "sqs" and not self.queue_url:
            raise ConfigError("an sqs relay needs queue_url")
        if self.kind == "sqs" and not 0 <= int(self.wait_s) <= 20:
            raise ConfigError(f"wait_s {self.wait_s}: SQS long polls last 0 to 20 seconds")
        if self.visibility_timeout_s is not None and not (
                0 <= int(self.visibility_timeout_s) <= 43_200):
            raise ConfigError(f"visibility_timeout_s {self.visibility_timeout_s}: SQS takes "
                              "0 to 43200 seconds")
        if self.kind == "http":
            self.http_options()

    @property
    def label(self) -> str:
        return self.name or self.kind

    def http_options(self, environ: Mapping[str, str] | None = None,
                     watch: Watchlist = Watchlist()) -> HttpOptions:
        host, port = parse_listen(self.listen or "127.0.0.1:8080")
        try:
            max_body = parse_bytes(self.max_body)
            options = HttpOptions(
                host, port, read_token(self.token_file or None, environ),
                self.insecure, HttpOptions.max_body if max_body is None else max_body,
                float(self.rate), int(self.burst),
                requests_token=read_token(self.requests_token_file or None, environ,
                                          env_name=REQUESTS_TOKEN_ENV),
                allow_force=self.allow_force, allow_local_paths=self.allow_local_paths,
                request_prefixes=tuple(self.request_prefixes), allow_fleet=self.allow_fleet,
                allowed_origins=tuple(self.allowed_origins),
                allowed_hosts=tuple(self.allowed_hosts),
                header_timeout_s=float(self.header_timeout_s),
                body_timeout_s=float(self.body_timeout_s),
                max_connections=int(self.max_connections), watch=watch)
            RelayPolicy.requests(request_prefixes=options.request_prefixes)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(f"http relay: {exc}") from None
        options.check()
        return options

    def build(self, redis: Redis, keys: RedisKeys, metrics: RelayMetrics,
              node: str, watch: Watchlist) -> SqsRelay | HttpRelay:
        """``watch``: the node's watch list; uploads outside it are dropped here."""
        if self.kind == "sqs":
            sink = StreamSink(redis, keys, metrics, relay=self.label,
                              source=f"sqs:{self.queue_url}", node=node)
            return SqsRelay(SqsOptions(self.queue_url, int(self.wait_s),
                                       visibility_timeout_s=self.visibility_timeout_s),
                            sink, RelayPolicy.notifications(watch, s3_only=True))
        options = self.http_options(watch=watch)
        sink = StreamSink(redis, keys, metrics, relay=self.label,
                          source=f"http:{options.host}:{options.port}", node=node)
        return HttpRelay(options, sink)


def read_token(token_file: str | os.PathLike[str] | None,
               environ: Mapping[str, str] | None = None, *,
               env_name: str = TOKEN_ENV) -> str | None:
    """A webhook secret: the file's content (stripped), else the variable ``env_name``.

    The file must be readable by its owner only (as ssh asks of a private key): a
    secret that other users can read is no secret. In Kubernetes, mount the Secret with
    ``defaultMode: 0400``."""
    env = os.environ if environ is None else environ
    if token_file:
        try:
            mode = Path(token_file).stat().st_mode
            token = Path(token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"cannot read the relay token file {token_file}: {why}") from None
        if mode & 0o077:
            raise ConfigError(f"the relay token file {token_file} has mode "
                              f"{stat.S_IMODE(mode):04o}: other users may read it; "
                              f"chmod 600 {token_file}")
        if not token:
            raise ConfigError(f"the relay token file {token_file} is empty")
        return token
    return env.get(env_name, "").strip() or None


#: The type of each setting, checked before use: YAML's ``"false"`` is a string.
_KINDS: dict[str, type] = {f.name: (tuple if f.name in (
    "request_prefixes", "allowed_origins", "allowed_hosts") else {
    "bool": bool, "int": int, "float": float, "str": str}.get(str(f.type), object))
    for f in fields(RelaySpec)}
_KINDS["max_body"] = object  # bytes: an int or "256KiB", checked by parse_bytes
_KINDS["visibility_timeout_s"] = object  # int or None, checked in check()
_KINDS["rate"] = float


def parse_specs(entries: tuple[Mapping[str, Any], ...]) -> list[RelaySpec]:
    specs = [RelaySpec.parse(entry) for entry in entries]
    names = [s.label for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError("two relays share a name: give each a distinct 'name'")
    return specs


def start_relays(specs: list[RelaySpec], redis: Redis, keys: RedisKeys, metrics: RelayMetrics,
                 node: str, watch: Watchlist, stopping: asyncio.Event
                 ) -> list[asyncio.Task[None]]:
    """One task per relay, each running until ``stopping`` is set."""
    tasks = []
    for spec in specs:
        relay = spec.build(redis, keys, metrics, node, watch)
        tasks.append(asyncio.create_task(_logged(relay.run(stopping), spec.label),
                                         name=f"relay {spec.label}"))
    return tasks


async def _logged(coro: Any, label: str) -> None:
    try:
        await coro
    except Exception:  # noqa: BLE001 - one relay failing must not stop the controller
        log.exception("relay %s failed", label, extra={"event": "relay_failed",
                                                        "relay": label})
