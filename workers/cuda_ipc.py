"""GPU buffers through torch's legacy CUDA IPC: the fallback transport.

torch shares a CUDA tensor as ``reduce_tensor(t) → (rebuild_cuda_tensor, args)``, and
``multiprocessing`` pickles that pair. We never pickle: the storage's
``_share_cuda_()`` fields (an IPC memory handle, sizes, offsets, a ref-counter file name,
an event handle) go over the socket as plain bytes and ints, and the receiver rebuilds the
storage by hand with ``UntypedStorage._new_shared_cuda`` on *its* index for the GPU's
UUID. One handle covers the whole flat buffer, so opening it costs the same whatever the
model's tensor count.

Unlike cuda-vmm the worker must stay alive while importers use the memory, and a freed
buffer returns to the device only once importers drop it and the worker runs
``torch.cuda.ipc_collect()``.
"""

from __future__ import annotations

from typing import Any

import torch

from warmpool.errors import WorkerError
from warmpool.workers.buffers import Export, ResidentBuffer

_FIELDS = ("device", "handle", "size_bytes", "offset_bytes", "ref_counter_handle",
           "ref_counter_offset", "event_handle", "event_sync_required")


class IpcBuffer(ResidentBuffer):
    transport = "cuda-ipc"

    def __init__(self, ordinal: int, nbytes: int) -> None:
        self.ordinal = ordinal
        self.nbytes = nbytes
        self._storage_tensor: torch.Tensor | None = torch.empty(
            nbytes, dtype=torch.uint8, device=torch.device("cuda", ordinal))
        self.tensor = self._storage_tensor

    def seal(self) -> None:
        torch.cuda.synchronize(self.ordinal)
        self.tensor = None  # the storage itself stays referenced until free()

    def export(self) -> Export:
        if self._storage_tensor is None:
            raise WorkerError("buffer already freed")
        shared = self._storage_tensor.untyped_storage()._share_cuda_()
        fields = dict(zip(_FIELDS, shared, strict=True))
        fields.pop("device")  # the receiver uses its own index for the GPU's UUID
        return Export({**{k: _plain(v) for k, v in fields.items()},
                       "nbytes": self.nbytes,
                       "storage_offset": self._storage_tensor.storage_offset()})

    def free(self) -> None:
        self.tensor = None
        self._storage_tensor = None
        torch.cuda.ipc_collect()
        torch.cuda.empty_cache()


def _plain(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, bool) or value is None:
        return value
    return int(value)


def open_ipc(handle: dict[str, Any], ordinal: int) -> torch.Tensor:
    """Rebuild the flat buffer from plain fields on this process's ``ordinal``."""
    try:
        storage = torch.UntypedStorage._new_shared_cuda(
            ordinal, bytes(handle["handle"]), int(handle["size_bytes"]),
            int(handle["offset_bytes"]), bytes(handle["ref_counter_handle"]),
            int(handle["ref_counter_offset"]), bytes(handle["event_handle"]),
            bool(handle["event_sync_required"]))
    except (KeyError, TypeError) as exc:
        raise WorkerError(f"malformed cuda-ipc handle: {exc}") from None
    nbytes, offset = int(handle["nbytes"]), int(handle["storage_offset"])
    if offset + nbytes > storage.nbytes():
        raise WorkerError(f"cuda-ipc handle covers {storage.nbytes()} bytes, not {nbytes}")
    flat = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", ordinal))
    return flat.set_(storage, offset, (nbytes,), (1,))
