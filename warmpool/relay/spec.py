"""A relay's settings, from the command line or the config file's ``relays:`` list, and
the relays built from them.

In the config file (``warmpool serve`` runs each next to the controller)::

    relays:
      - kind: sqs
        queue_url: https://sqs.eu-west-1.amazonaws.com/123456789012/model-uploads
      - kind: http
        listen: 0.0.0.0:8080
        token_file: /etc/warmpool/relay-token

The webhook's secret comes from ``token_file`` or ``WARMPOOL_RELAY_TOKEN``, never from
the file itself or a command line (both are too easily read by others).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from warmpool.config import parse_bytes
from warmpool.controller.keys import RedisKeys
from warmpool.errors import ConfigError
from warmpool.relay.http import HttpOptions, HttpRelay, parse_listen
from warmpool.relay.metrics import RelayMetrics
from warmpool.relay.sink import StreamSink
from warmpool.relay.sqs import SqsOptions, SqsRelay

log = logging.getLogger(__name__)
TOKEN_ENV = "WARMPOOL_RELAY_TOKEN"
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
        try:
            spec = cls(**raw)
            spec.check()
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:  # e.g. wait_s: "soon"
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

    def http_options(self, environ: Mapping[str, str] | None = None) -> HttpOptions:
        host, port = parse_listen(self.listen or "127.0.0.1:8080")
        try:
            max_body = parse_bytes(self.max_body)
            options = HttpOptions(host, port, read_token(self.token_file or None, environ),
                                  bool(self.insecure), max_body or HttpOptions.max_body,
                                  float(self.rate), int(self.burst))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"http relay: {exc}") from None
        options.check()
        return options

    def build(self, redis: Redis, keys: RedisKeys, metrics: RelayMetrics,
              node: str) -> SqsRelay | HttpRelay:
        if self.kind == "sqs":
            sink = StreamSink(redis, keys, metrics, relay=self.label,
                              source=f"sqs:{self.queue_url}", node=node)
            return SqsRelay(SqsOptions(self.queue_url, int(self.wait_s),
                                       visibility_timeout_s=self.visibility_timeout_s), sink)
        options = self.http_options()
        sink = StreamSink(redis, keys, metrics, relay=self.label,
                          source=f"http:{options.host}:{options.port}", node=node)
        return HttpRelay(options, sink)


def read_token(token_file: str | os.PathLike[str] | None,
               environ: Mapping[str, str] | None = None) -> str | None:
    """The webhook secret: the file's content (stripped), else ``WARMPOOL_RELAY_TOKEN``."""
    env = os.environ if environ is None else environ
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the relay token file {token_file}: "
                              f"{exc.strerror}") from None
        if not token:
            raise ConfigError(f"the relay token file {token_file} is empty")
        return token
    return env.get(TOKEN_ENV, "").strip() or None


def parse_specs(entries: tuple[Mapping[str, Any], ...]) -> list[RelaySpec]:
    specs = [RelaySpec.parse(entry) for entry in entries]
    names = [s.label for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError("two relays share a name: give each a distinct 'name'")
    return specs


def start_relays(specs: list[RelaySpec], redis: Redis, keys: RedisKeys, metrics: RelayMetrics,
                 node: str, stopping: asyncio.Event) -> list[asyncio.Task[None]]:
    """One task per relay, each running until ``stopping`` is set."""
    tasks = []
    for spec in specs:
        relay = spec.build(redis, keys, metrics, node)
        tasks.append(asyncio.create_task(_logged(relay.run(stopping), spec.label),
                                         name=f"relay {spec.label}"))
    return tasks


async def _logged(coro: Any, label: str) -> None:
    try:
        await coro
    except Exception:  # noqa: BLE001 - one relay failing must not stop the controller
        log.exception("relay %s failed", label, extra={"event": "relay_failed",
                                                        "relay": label})
