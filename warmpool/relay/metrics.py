"""Prometheus metrics of the relays.

They register in the registry they are given: ``warmpool serve`` passes its own, so the
relays it runs appear on the controller's ``/metrics``; a standalone relay has a
registry of its own (:meth:`RelayMetrics.serve`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from warmpool.metrics_http import Endpoint

#: Seconds from the store's notification to the stream: SQS long polls answer at once,
#: a relay that was down (or waited out a Redis outage) catches up minutes later.
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class RelayMetrics(Endpoint):
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
