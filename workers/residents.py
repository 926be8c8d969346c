"""What a worker holds: one resident per model, its leases, and the eviction policy.

The policy is the pool's (:mod:`warmpool.pool.eviction`): room for a new model is made
before any byte is streamed, by evicting warm models with no live lease and no pin, least
recently attached first; if that cannot free enough, the load is refused at once with the
free and needed bytes — a worker never runs out of device memory half-way through a stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from warmpool.pool import eviction
from warmpool.pool.eviction import Candidate
from warmpool.pool.layout import Layout
from warmpool.pool.registry.base import PoolEntry
from warmpool.workers.buffers import ResidentBuffer


@dataclass(eq=False)
class DeviceResident:
    """A model a worker holds in its device's memory: the buffer, its leases and whether
    it is warm yet. (The host tier's counterpart is
    :class:`warmpool.pool.host.HostResident`.)"""

    uri: str
    content_hash: str
    layout: Layout
    buffer: ResidentBuffer
    entry: PoolEntry
    warm: bool = False
    pinned: bool = False
    loader: str = ""
    peer_bytes: int = 0  # of its bytes, how many came from peers (NIXL)
    created_at: float = field(default_factory=time.time)
    last_attached: float | None = None
    #: ids of the connections that hold a lease; the connection IS the lease.
    leases: set[int] = field(default_factory=set)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def nbytes(self) -> int:
        return self.layout.total_bytes

    @property
    def evictable(self) -> bool:
        return self.warm and not self.pinned and not self.leases

    def add_lease(self, conn_id: int) -> None:
        self.leases.add(conn_id)
        self.released.clear()
        self.last_attached = time.time()

    def drop_lease(self, conn_id: int) -> None:
        self.leases.discard(conn_id)
        if not self.leases:
            self.released.set()

    def summary(self) -> dict[str, object]:
        return {"uri": self.uri, "content_hash": self.content_hash,
                "state": "warm" if self.warm else "streaming", "bytes": self.nbytes,
                "tensors": len(self.layout.slots), "leases": len(self.leases),
                "pinned": self.pinned, "transport": self.buffer.transport,
                "loader": self.loader, "last_attached_at": self.last_attached,
                "engine": self.entry.engine}


def choose_victims(residents: Iterable[DeviceResident], needed: int, room: int, *,
                   who: str, device: str) -> list[DeviceResident]:
    """Which residents to evict so that ``needed`` bytes fit in ``room`` (plus what they
    free): the pool's policy (:func:`warmpool.pool.eviction.choose_victims`)."""
    return eviction.choose_victims(
        (Candidate(r, r.nbytes, r.evictable, r.last_attached or r.created_at)
         for r in residents), needed, room, who=who, device=device)
