"""A worker's buffers as seeds for peers (:mod:`warmpool.loading.seeder`).

A worker on another node reads them straight into its own device buffer: on GPUs with a
NIC that supports GPUDirect RDMA, GPU to GPU without a host copy on either side. A
peer's lease is a lease like a serving process's (a negative id in the resident's lease
set, so it never names a connection): eviction asks holders to detach and waits for it,
capacity eviction passes the model over while it is held.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from warmpool.loading.seeder import Holding, Release
from warmpool.workers.buffers import open_shm_fd

if TYPE_CHECKING:
    from warmpool.workers.worker import Worker


class WorkerHoldings:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._ids = itertools.count(-1, -1)  # connection ids are positive

    async def current(self) -> dict[str, tuple[str, object]]:
        return {h: (r.uri, id(r.buffer)) for h, r in self.worker.residents.items()
                if r.warm and r.entry.engine is None}

    async def open(self, content_hash: str) -> Holding:
        resident = self.worker.residents[content_hash]
        tensor = resident.buffer.tensor
        if tensor is None:
            # A sealed memfd (cpu:N) keeps no mapping of its own: a read-only one, as a
            # serving process gets, is what peers read.
            export = resident.buffer.export()
            tensor = open_shm_fd(export.handle, export.fds)
        device = self.worker.device
        return Holding(resident.uri, tensor, resident.layout,
                       kind="VRAM" if device.kind == "cuda" else "DRAM",
                       device_id=device.index if device.kind == "cuda" else 0)

    async def lease(self, content_hash: str, holder: str) -> Release | None:
        resident = self.worker.residents.get(content_hash)
        if resident is None or not resident.warm:
            return None
        lease_id = next(self._ids)
        resident.add_lease(lease_id)
        return lambda: resident.drop_lease(lease_id)
