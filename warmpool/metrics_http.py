"""The ``/metrics`` HTTP endpoint that the controller and a standalone relay share.

It binds to loopback unless told otherwise: metrics name models and buckets, which is
nobody's business off the node without a deliberate choice (``WARMPOOL_METRICS_ADDR``).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


class Endpoint:
    """The ``/metrics`` HTTP endpoint of one registry (the controller's, or a standalone
    relay's)."""

    registry: CollectorRegistry
    _server: Any = None

    def serve(self, port: int, addr: str | None = None) -> int | None:
        """Serve ``/metrics`` on ``addr:port`` (port 0: any free port; < 0: off).

        Returns the port bound, or None when off."""
        if port < 0:
            return None
        addr = addr or os.environ.get("WARMPOOL_METRICS_ADDR", "127.0.0.1")
        server, thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = (server, thread)
        bound = int(server.server_port)
        log.info("metrics on http://%s:%d/metrics", addr, bound,
                 extra={"event": "metrics_listening", "port": bound, "addr": addr})
        return bound

    def close(self) -> None:
        if self._server is None:
            return
        server, thread = self._server
        self._server = None
        server.shutdown()
        server.server_close()
        if isinstance(thread, threading.Thread):
            thread.join(timeout=5)
