"""Prometheus metrics of the relays.

They register in the registry they are given: ``warmpool serve`` passes its own, so the
relays it runs appear on the controller's ``/metrics``; a standalone relay has a
registry of its own (:meth:`RelayMetrics.serve`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

log = logging.getLogger(__name__)

#: Seconds from the store's notification to the stream: SQS long polls answer at once,
#: a relay that was down (or waited out a Redis outage) catches up minutes later.
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.received = Counter("warmpool_relay_received",
                                "Notifications received (webhook: past the rate limit and "
                                "the token check).", ["relay"], registry=r)
        self.relayed = Counter("warmpool_relay_relayed",
                               "Notifications added to the requests stream.",
                               ["relay"], registry=r)
        self.ignored = Counter("warmpool_relay_ignored",
                               "Notifications understood but with nothing to do (test events).",
                               ["relay"], registry=r)
        self.rejected = Counter("warmpool_relay_rejected",
                                "Notifications refused, by reason (malformed ones are "
                                "dead-lettered; unauthorized and rate-limited ones are not).",
                                ["relay", "reason"], registry=r)
        self.lag = Histogram("warmpool_relay_lag_seconds",
                             "Seconds from the notification's time to the stream.",
                             ["relay"], buckets=LAG_BUCKETS, registry=r)
        self._server: Any = None

    def serve(self, port: int) -> int | None:
        """Serve ``/metrics`` on ``port`` (0: any free port; < 0: off), on loopback unless
        ``WARMPOOL_METRICS_ADDR`` says otherwise; the port bound, or None."""
        if port < 0:
            return None
        addr = os.environ.get("WARMPOOL_METRICS_ADDR", "127.0.0.1")
        server, thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = (server, thread)
        bound = int(server.server_port)
        log.info("metrics on http://%s:%d/metrics", addr, bound,
                 extra={"event": "metrics_listening", "port": bound, "addr": addr})
        return bound

    def close(self) -> None:
        if self._server is not None:
            server, thread = self._server
            self._server = None
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
