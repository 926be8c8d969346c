"""Prometheus metrics of one controller (served by :class:`warmpool.metrics_http.Endpoint`).

Each :class:`Metrics` has its own ``CollectorRegistry`` rather than the global one, so
that two controllers in one process (the tests run several) never collide.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from warmpool.loading.stats import PeerStats
from warmpool.metrics_http import Endpoint
from warmpool.pool.arena import ArenaStatus
from warmpool.pool.registry.base import PoolEntry, State

log = logging.getLogger(__name__)

#: Seconds from "start warming" to "warm": small models take well under a second, a 70B
#: checkpoint from object storage minutes.
WARM_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics(Endpoint):
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.events = Counter("warmpool_events_received", "Event payloads received.",
                              ["source"], registry=r)
        self.rejected = Counter("warmpool_events_rejected",
                                "Payloads refused and dead-lettered, by reason.",
                                ["reason"], registry=r)
        self.models = Gauge("warmpool_models", "Pool entries of this node, by state.",
                            ["state"], registry=r)
        self.bytes_streamed = Counter("warmpool_bytes_streamed",
                                      "Weight bytes streamed into resident buffers.",
                                      ["device"], registry=r)
        self.streamed = Counter("warmpool_models_streamed",
                                "Models streamed to warm (already-warm hits excluded).",
                                ["device"], registry=r)
        self.time_to_warm = Histogram("warmpool_time_to_warm_seconds",
                                      "Seconds from starting to warm a model to warm.",
                                      ["device"], buckets=WARM_BUCKETS, registry=r)
        self.occupancy = Gauge("warmpool_pool_bytes",
                               "Bytes held and capacity of each device's pool.",
                               ["device", "kind"], registry=r)
        self.arena = Gauge("warmpool_host_arena_bytes",
                           "The host arena: its size, chunks used, free, free and still "
                           "faulted (reused by the next fills), page-locked by a worker.",
                           ["kind"], registry=r)
        self.fill_bytes = Counter("warmpool_fill_bytes",
                                  "Weight bytes of models filled on this node, by source: "
                                  "the model's store, or peers over NIXL.",
                                  ["source"], registry=r)
        self.peer_ranges = Counter("warmpool_peer_ranges",
                                   "Ranges peers failed to give: fallback (the peer died, "
                                   "evicted or stalled), mismatch (wrong checksum).",
                                   ["outcome"], registry=r)
        self.peer_rate = Gauge("warmpool_peer_read_bytes_per_second",
                               "The rate of the last fill from peers.", registry=r)
        self.seeds = Gauge("warmpool_peer_seeds",
                           "Models this node serves to peers, and the leases it holds "
                           "for peers reading them.", ["kind"], registry=r)

    def observe_fill(self, entry: PoolEntry) -> None:
        """Count a model that became warm here by where its bytes came from."""
        peer = min(entry.peer_bytes, entry.bytes)
        self.fill_bytes.labels("store").inc(entry.bytes - peer)
        self.fill_bytes.labels("peers").inc(peer)

    def observe_peers(self, stats: PeerStats) -> None:
        """Carry the process's peer counters (:data:`warmpool.loading.peers.STATS`) over."""
        fallbacks, mismatches, rate = stats.take()
        self.peer_ranges.labels("fallback").inc(fallbacks)
        self.peer_ranges.labels("mismatch").inc(mismatches)
        if rate is not None:
            self.peer_rate.set(rate)

    def progress(self, device: str) -> Callable[[int], Callable[[int], None]]:
        """A prefetch progress factory that counts streamed bytes (thread-safe)."""
        counter = self.bytes_streamed.labels(device)

        def factory(total: int) -> Callable[[int], None]:
            return counter.inc

        return factory

    def observe_arena(self, status: ArenaStatus | None) -> None:
        if status is None:
            return
        for kind in ("size", "used", "free", "faulted", "locked"):
            self.arena.labels(kind).set(getattr(status, kind))

    def observe_entries(self, entries: Iterable[PoolEntry],
                        capacity: dict[str, int]) -> dict[str, int]:
        """Refresh the state and occupancy gauges; returns bytes used per device."""
        entries = list(entries)
        states = Tally(e.state.value for e in entries)
        for state in State:
            self.models.labels(state.value).set(states.get(state.value, 0))
        used: dict[str, int] = {device: 0 for device in capacity}
        for e in entries:
            if e.state.holds_memory:
                used[e.device] = used.get(e.device, 0) + e.bytes
        for device, nbytes in used.items():
            self.occupancy.labels(device, "used").set(nbytes)
        for device, nbytes in capacity.items():
            self.occupancy.labels(device, "capacity").set(nbytes)
        return used
