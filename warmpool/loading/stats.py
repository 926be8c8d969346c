"""Counters of this process's fills from peers, for the controller's metrics.

Kept apart from :mod:`warmpool.loading.peers` so that reading them imports neither Redis
nor NIXL: a fill counts into :data:`STATS`, and the metrics take what accumulated.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class PeerStats:
    fallbacks: int = 0
    mismatches: int = 0
    last_rate: float | None = None  # bytes per second of the last fill from peers
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, fallbacks: int, mismatches: int, rate: float | None) -> None:
        with self._lock:
            self.fallbacks += fallbacks
            self.mismatches += mismatches
            if rate is not None:
                self.last_rate = rate

    def take(self) -> tuple[int, int, float | None]:
        """What accumulated since the last take."""
        with self._lock:
            taken = self.fallbacks, self.mismatches, self.last_rate
            self.fallbacks = self.mismatches = 0
            return taken


STATS = PeerStats()
