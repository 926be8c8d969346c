"""``warmpool relay sqs|http``: run one relay on its own (``warmpool serve`` can run them
too, from its config file). SIGTERM or SIGINT stops it; logs are JSON lines on stderr."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Optional

import typer

from warmpool.config import ControllerOptions, Settings
from warmpool.console import guard
from warmpool.contract.keys import RedisKeys
from warmpool.contract.redis_client import connect
from warmpool.contract.watchlist import Watchlist
from warmpool.controller.remote import controller_url
from warmpool.errors import ConfigError, InvalidURIError
from warmpool.logs import configure_logging
from warmpool.relay.metrics import RelayMetrics
from warmpool.relay.spec import RelaySpec

app = typer.Typer(no_args_is_help=True, help="Bridge object-store notifications into Redis "
                  "(at least once: a notification is acknowledged only once it is in the "
                  "stream).")
RedisOpt = typer.Option(None, "--redis", help="Redis URL (default: WARMPOOL_REDIS_URL, the "
                        "config's redis_url, or the embedded Redis of a local `warmpool serve`).")
ConfigOpt = typer.Option(None, "--config", envvar="WARMPOOL_CONFIG", help="Config file.")
MetricsOpt = typer.Option(-1, "--metrics-port", help="Prometheus port (0: any, -1: off).")
LogOpt = typer.Option("info", "--log-level")


@app.command("sqs")
def sqs(queue_url: str = typer.Argument(..., help="The queue's URL."),
        redis: Optional[str] = RedisOpt, config: Optional[Path] = ConfigOpt,
        wait_s: int = typer.Option(20, "--wait-s", help="Long-poll seconds (1..20)."),
        visibility_timeout: Optional[int] = typer.Option(
            None, "--visibility-timeout", help="Seconds a received message stays hidden "
            "(default: the queue's setting)."),
        metrics_port: int = MetricsOpt, log_level: str = LogOpt) -> None:
    """Long-poll an SQS queue of S3 notifications (plain or via SNS) into the stream."""
    spec = RelaySpec("sqs", queue_url=queue_url, wait_s=wait_s,
                     visibility_timeout_s=visibility_timeout)
    guard(_run)(spec, redis, config, metrics_port, log_level)


@app.command("http")
def http(listen: str = typer.Option("127.0.0.1:8080", "--listen", help="HOST:PORT."),
         token_file: Optional[Path] = typer.Option(
             None, "--token-file", help="File holding the shared secret (else "
             "WARMPOOL_RELAY_TOKEN). Senders pass it as a Bearer token or ?token=."),
         insecure: bool = typer.Option(False, "--insecure", help="Run without a secret "
                                       "(loopback addresses only)."),
         max_body: str = typer.Option("256KiB", "--max-body", help="Largest body accepted."),
         rate: float = typer.Option(200.0, "--rate", help="Requests per second (then 429)."),
         burst: int = typer.Option(400, "--burst", help="Requests at once after a lull."),
         requests_token_file: Optional[Path] = typer.Option(
             None, "--requests-token-file", help="File holding the secret of POST /requests "
             "(deploy, evict, pin, unpin; else WARMPOOL_RELAY_REQUESTS_TOKEN). Without one, "
             "the relay takes notifications only."),
         allow_force: bool = typer.Option(False, "--allow-force", help="Pass requests "
                                          "that carry force (evict under leases)."),
         allow_local_paths: bool = typer.Option(False, "--allow-local-paths", help="Pass "
                                                "requests for file:// models."),
         allow_fleet: bool = typer.Option(False, "--allow-fleet", help="Pass requests for "
                                          "several nodes (replicas, nodes, node_selector)."),
         request_prefix: list[str] = typer.Option([], "--request-prefix", help="Pass only "
                                                  "requests under this URI prefix "
                                                  "(repeatable)."),
         allowed_origin: list[str] = typer.Option([], "--allowed-origin", help="Accept "
                                                  "requests from this web Origin "
                                                  "(repeatable; default: none)."),
         allowed_host: list[str] = typer.Option([], "--allowed-host", help="Accept only "
                                                "this Host header (repeatable)."),
         header_timeout: float = typer.Option(10.0, "--header-timeout", help="Seconds a "
                                              "connection has to send its request headers."),
         max_connections: int = typer.Option(256, "--max-connections", help="Connections "
                                             "at once (at most half of ulimit -n)."),
         redis: Optional[str] = RedisOpt, config: Optional[Path] = ConfigOpt,
         metrics_port: int = MetricsOpt, log_level: str = LogOpt) -> None:
    """A webhook for MinIO, Ceph RGW and GCS Pub/Sub push (POST /), and, with a requests
    token, deploy / evict / pin / unpin requests (POST /requests)."""
    spec = RelaySpec("http", listen=listen, token_file=str(token_file or ""),
                     insecure=insecure, max_body=max_body, rate=rate, burst=burst,
                     requests_token_file=str(requests_token_file or ""),
                     allow_force=allow_force, allow_local_paths=allow_local_paths,
                     allow_fleet=allow_fleet,
                     request_prefixes=tuple(request_prefix),
                     allowed_origins=tuple(allowed_origin), allowed_hosts=tuple(allowed_host),
                     header_timeout_s=header_timeout, max_connections=max_connections)
    guard(_run)(spec, redis, config, metrics_port, log_level)


def _run(spec: RelaySpec, redis: str | None, config: Path | None, metrics_port: int,
         log_level: str) -> None:
    spec.check()
    if not -1 <= metrics_port <= 65535:
        raise ConfigError(f"--metrics-port {metrics_port}: use 0 to 65535 (0: any free "
                          "port, -1: off)")
    settings = Settings.load(config, redis_url=redis)
    url = controller_url(settings)
    if not url:
        raise ConfigError("no Redis to relay into: pass --redis redis://host:6379/0 or set "
                          "WARMPOOL_REDIS_URL")
    keys = RedisKeys(ControllerOptions.load(settings.controller).key_prefix)
    configure_logging(log_level)
    try:
        watch = Watchlist.parse(settings.watch)
    except InvalidURIError as exc:
        raise ConfigError(f"watch: {exc}") from None
    asyncio.run(_serve(spec, url, keys, settings.node, watch, metrics_port))


async def _serve(spec: RelaySpec, url: str, keys: RedisKeys, node: str, watch: Watchlist,
                 metrics_port: int) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    redis = connect(url, name=f"warmpool-relay-{spec.kind}-{node}")
    metrics = RelayMetrics()
    try:
        metrics.serve(metrics_port)
        await spec.build(redis, keys, metrics, node, watch).run(stopping)
    finally:
        metrics.close()
        await redis.aclose()
