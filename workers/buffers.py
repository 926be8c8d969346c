"""The resident buffer of one (model, device): ONE allocation, three ways to share it.

- ``cuda-vmm``: CUDA's virtual memory API (:mod:`.cuda_vmm`), shared as a file descriptor
  that the driver reference-counts — weights outlive a crashed worker, and a crashed
  serving process releases its share. The preferred GPU transport.
- ``cuda-ipc``: torch's legacy CUDA IPC on the flat buffer (:mod:`.cuda_ipc`), one handle
  whatever the tensor count; the fallback where VMM or cuda-python is missing.
- ``shm-fd``: a sealed memfd, for ``cpu:N`` workers. Hosts without a GPU use it, and so
  does CI: the worker protocol, fd passing, leases and supervision run for real on it.

Every buffer is filled through :attr:`ResidentBuffer.tensor` (a flat uint8 tensor on
its device), then :meth:`~ResidentBuffer.seal`-ed, then exported once per attach.
"""

from __future__ import annotations

import abc
import fcntl
import mmap
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from warmpool.errors import ConfigError, WorkerError
from warmpool.workers.devices import DeviceSpec

TRANSPORTS = ("cuda-vmm", "cuda-ipc", "shm-fd")


@dataclass
class Export:
    """What one attach receives: plain fields, and descriptors to pass with SCM_RIGHTS.

    The sender closes ``fds`` once they are sent (the receiver holds its own copies)."""

    handle: dict[str, Any]
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class ResidentBuffer(abc.ABC):
    transport: str
    nbytes: int
    tensor: torch.Tensor | None  # the worker's writable view; None once sealed or freed

    @abc.abstractmethod
    def seal(self) -> None:
        """Filling is over: make the bytes read-only where the transport can enforce it."""

    @abc.abstractmethod
    def export(self) -> Export:
        """A handle for one more importer."""

    def export_writable(self) -> Export:
        """A handle an exporter maps WRITABLE, to fill the buffer before it is sealed
        (:mod:`~warmpool.workers.export`). CUDA handles are the same as :meth:`export`:
        the importer picks the access, and a CUDA mapping cannot be sealed anyway."""
        return self.export()

    @abc.abstractmethod
    def free(self) -> None:
        """Drop the worker's reference. Importers that still map it keep their memory
        (cuda-vmm, shm-fd) or block its reuse until they let go (cuda-ipc)."""


# --- shm-fd ------------------------------------------------------------------------


class ShmFdBuffer(ResidentBuffer):
    """A memfd: anonymous shared memory with no name another process could open.

    After filling, the worker unmaps its writable view and seals the file against writes
    and size changes, then hands out descriptors reopened ``O_RDONLY``: an importer cannot
    map it writable, so one serving process can never corrupt another's weights.
    """

    transport = "shm-fd"

    def __init__(self, nbytes: int, label: str = "warmpool") -> None:
        self.nbytes = nbytes
        self.fd = os.memfd_create(label[:200], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, nbytes)
            self._mmap: mmap.mmap | None = mmap.mmap(self.fd, nbytes, mmap.MAP_SHARED,
                                                     mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self.sealed = False

    def seal(self) -> None:
        self.tensor = None
        if self._mmap is not None:
            try:
                self._mmap.close()
                self._mmap = None
            except BufferError:
                return  # a view of the writable mapping still exists: leave it unsealed
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, seals)
        self.sealed = True

    def export(self) -> Export:
        readonly = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        return Export({"size": self.nbytes}, [readonly])

    def export_writable(self) -> Export:
        if self.sealed:
            raise WorkerError("a sealed buffer cannot be written")
        writable = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
        return Export({"size": self.nbytes}, [writable])

    def free(self) -> None:
        self.tensor = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # the mapping goes with its last view
            self._mmap = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_shm_fd(handle: dict[str, Any], fds: list[int]) -> torch.Tensor:
    """Map a received memfd read-only: one mmap, no page touched until read."""
    if len(fds) != 1:
        raise WorkerError(f"shm-fd handle needs 1 descriptor, got {len(fds)}")
    fd = fds[0]
    try:
        size = int(handle["size"])
        if os.fstat(fd).st_size < size:
            raise WorkerError(f"shared buffer is {os.fstat(fd).st_size} bytes, expected {size}")
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": intended
        return torch.frombuffer(mapping, dtype=torch.uint8)


class Writable:
    """An exporter's writable mapping of a worker's buffer (a flat uint8 ``tensor``).

    Call :meth:`release` once every view of it is dropped, before the worker is asked
    to seal: it waits for the writes (``sync``), drops this reference, then unmaps
    (``unmap``) — in that order, since a CUDA mapping unmaps with its last reference and
    must not go while copies into it are still queued."""

    def __init__(self, tensor: torch.Tensor, *, sync: Callable[[], None] | None = None,
                 unmap: Callable[[], None] | None = None) -> None:
        self.tensor: torch.Tensor | None = tensor
        self._sync = sync
        self._unmap = unmap

    def release(self) -> None:
        if self._sync is not None:
            self._sync()
        self.tensor = None
        if self._unmap is not None:
            self._unmap()


def open_shm_fd_writable(handle: dict[str, Any], fds: list[int]) -> Writable:
    """Map a received (unsealed) memfd writable, for an exporter to fill."""
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise WorkerError(f"shm-fd handle needs 1 descriptor, got {len(fds)}")
    try:
        size = int(handle["size"])
        if os.fstat(fds[0]).st_size < size:
            raise WorkerError(f"shared buffer is {os.fstat(fds[0]).st_size} bytes, "
                              f"expected {size}")
        mapping = mmap.mmap(fds[0], size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fds[0])

    def release() -> None:
        # The worker's seal is refused (EBUSY) while any writable mapping of the memfd
        # exists, so this one must really be gone: close() refuses while a view lives.
        try:
            mapping.close()
        except BufferError:
            raise WorkerError("a view of the writable export buffer is still alive; drop "
                              "every view before committing") from None

    return Writable(torch.frombuffer(mapping, dtype=torch.uint8), unmap=release)


# --- choosing and opening ------------------------------------------------------------


def allocate(device: DeviceSpec, nbytes: int, transport: str = "auto",
             label: str = "warmpool") -> ResidentBuffer:
    """One buffer of ``nbytes`` on ``device``, shared by ``transport`` (or the best one)."""
    if transport not in ("auto", *TRANSPORTS):
        raise ConfigError(f"unknown transport {transport!r}; choose auto or one of {TRANSPORTS}")
    if not device.is_cuda:
        if transport not in ("auto", "shm-fd"):
            raise ConfigError(f"{device} can only share by shm-fd, not {transport}")
        return ShmFdBuffer(nbytes, label)
    if transport == "shm-fd":
        raise ConfigError(f"{device} is a GPU: use cuda-vmm or cuda-ipc")
    from warmpool.workers import cuda_ipc, cuda_vmm

    if transport == "cuda-vmm" or (transport == "auto" and cuda_vmm.available(device.index)):
        return cuda_vmm.VmmBuffer(device.index, nbytes)
    return cuda_ipc.IpcBuffer(device.index, nbytes)


def open_writable(transport: str, handle: dict[str, Any], fds: list[int],
                  uuid: str) -> Writable:
    """The exporter's side: a flat uint8 tensor over the worker's buffer, writable.

    On CUDA the copies into it are asynchronous: ``release`` waits for them (the worker
    marks the entry warm on the exporter's word, and must not serve half-copied bytes).
    """
    if transport == "shm-fd":
        return open_shm_fd_writable(handle, fds)
    if transport == "cuda-vmm":
        from warmpool.workers import cuda_vmm
        from warmpool.workers.devices import local_index

        flat = cuda_vmm.open_vmm(handle, fds, local_index(uuid), writable=True)
    else:
        flat = open_export(transport, handle, fds, uuid)  # cuda-ipc maps read-write
    ordinal = flat.device.index
    return Writable(flat, sync=lambda: torch.cuda.synchronize(ordinal))


def open_export(transport: str, handle: dict[str, Any], fds: list[int],
                uuid: str) -> torch.Tensor:
    """The receiving side: a flat uint8 tensor over the worker's buffer, zero-copy.

    ``uuid`` names the GPU; it is turned into this process's own device index here.
    """
    if transport == "shm-fd":
        return open_shm_fd(handle, fds)
    if transport == "cuda-vmm":
        from warmpool.workers import cuda_vmm
        from warmpool.workers.devices import local_index

        return cuda_vmm.open_vmm(handle, fds, local_index(uuid))
    if transport == "cuda-ipc":
        from warmpool.workers import cuda_ipc
        from warmpool.workers.devices import local_index

        for fd in fds:
            os.close(fd)
        return cuda_ipc.open_ipc(handle, local_index(uuid))
    for fd in fds:
        os.close(fd)
    raise WorkerError(f"unknown transport {transport!r} in the worker's reply")
