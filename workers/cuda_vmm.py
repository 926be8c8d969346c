"""GPU buffers through CUDA's virtual memory API, shared as POSIX file descriptors.

``cuMemCreate`` gives a physical allocation with no address; the worker maps it into a
reserved range it can write, and exports it with ``cuMemExportToShareableHandle`` as a
file descriptor that travels over the worker socket (SCM_RIGHTS). The serving process
imports the descriptor, maps it into its own range *read-only*, and wraps the pointer as a
torch tensor. The driver counts references across processes: the memory lives until the
last mapping of it is gone — a worker crash does not pull weights from under a serving
process, and a serving process that dies releases its share.

cuda-python is imported lazily (``pip install 'cuda-bindings>=12.6,<13'`` for CUDA 12
drivers; ``warmpool[gpu]``): the rest of warmpool, and CPU hosts, never need it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from warmpool.errors import WorkerError
from warmpool.workers.buffers import Export, ResidentBuffer


@functools.cache
def driver() -> Any:
    """cuda-python's driver module (new and old import paths)."""
    try:
        from cuda.bindings import driver as cu  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cuda as cu  # older cuda-python
        except ImportError:
            raise WorkerError("the cuda-vmm transport needs cuda-python: pip install "
                              "'cuda-bindings>=12.6' (or 'warmpool[gpu]')") from None
    _check(cu.cuInit(0), "cuInit")
    return cu


def _check(result: Any, what: str) -> Any:
    """cuda-python returns ``(error, *values)``; raise on error, return the values."""
    err, *values = result
    if int(err) != 0:
        raise WorkerError(f"{what} failed: {getattr(err, 'name', err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def available(ordinal: int) -> bool:
    """cuda-python importable and the GPU supports VMM with POSIX fd handles."""
    try:
        cu = driver()
        dev = _check(cu.cuDeviceGet(ordinal), "cuDeviceGet")
        attr = cu.CUdevice_attribute
        vmm = _check(cu.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev), "attribute")
        fds = _check(cu.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED, dev), "attribute")
    except WorkerError:
        return False
    return bool(vmm) and bool(fds)


@functools.cache
def _context(ordinal: int) -> Any:
    """The device's primary context — the one torch uses — retained for the process."""
    cu = driver()
    dev = _check(cu.cuDeviceGet(ordinal), "cuDeviceGet")
    return _check(cu.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")


def _make_current(ordinal: int) -> Any:
    cu = driver()
    _check(cu.cuCtxSetCurrent(_context(ordinal)), "cuCtxSetCurrent")
    return cu


def _posix_fd(cu: Any) -> Any:
    return cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR


def _location(cu: Any, target: Any, ordinal: int) -> None:
    target.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    target.id = ordinal


def _granularity(cu: Any, ordinal: int) -> tuple[Any, int]:
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    _location(cu, prop.location, ordinal)
    prop.requestedHandleTypes = _posix_fd(cu)
    flag = cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
    return prop, int(_check(cu.cuMemGetAllocationGranularity(prop, flag), "granularity"))


class _Mapping:
    """A mapped range, exposed through ``__cuda_array_interface__`` so torch can wrap it
    without a copy. torch keeps this object alive for as long as any view of the tensor
    lives, and the range is unmapped only when the last of them is gone — never under a
    view (that would be a use-after-free on the GPU)."""

    def __init__(self, ordinal: int, ptr: Any, size: int, nbytes: int) -> None:
        self.ordinal = ordinal
        self.ptr = ptr
        self.size = size  # mapped bytes (a multiple of the granularity)
        self.nbytes = nbytes  # bytes exposed to torch

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        # torch refuses the read-only flag; read-only is enforced by the mapping's access
        # flags instead (a write faults on the device).
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (int(self.ptr), False),
                "version": 2, "strides": None}

    def tensor(self) -> torch.Tensor:
        t = torch.as_tensor(self, device=torch.device("cuda", self.ordinal))
        if t.data_ptr() != int(self.ptr) or t.device.index != self.ordinal:
            raise WorkerError("torch copied the mapped buffer instead of wrapping it")
        return t

    def __del__(self) -> None:
        try:
            cu = _make_current(self.ordinal)
            cu.cuMemUnmap(self.ptr, self.size)
            cu.cuMemAddressFree(self.ptr, self.size)
        except Exception:  # noqa: BLE001 - interpreter shutdown; the driver cleans up
            pass


def _map(cu: Any, handle: Any, ordinal: int, size: int, gran: int, writable: bool) -> Any:
    ptr = _check(cu.cuMemAddressReserve(size, gran, 0, 0), "cuMemAddressReserve")
    try:
        _check(cu.cuMemMap(ptr, size, 0, handle, 0), "cuMemMap")
        desc = cu.CUmemAccessDesc()
        _location(cu, desc.location, ordinal)
        flags = cu.CUmemAccess_flags
        desc.flags = (flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE if writable
                      else flags.CU_MEM_ACCESS_FLAGS_PROT_READ)
        _check(cu.cuMemSetAccess(ptr, size, [desc], 1), "cuMemSetAccess")
    except BaseException:
        cu.cuMemUnmap(ptr, size)
        cu.cuMemAddressFree(ptr, size)
        raise
    return ptr


class VmmBuffer(ResidentBuffer):
    transport = "cuda-vmm"

    def __init__(self, ordinal: int, nbytes: int) -> None:
        cu = _make_current(ordinal)
        prop, gran = _granularity(cu, ordinal)
        self.ordinal = ordinal
        self.nbytes = nbytes
        self.size = -(-nbytes // gran) * gran
        self.granularity = gran
        self._handle = _check(cu.cuMemCreate(self.size, prop, 0), "cuMemCreate")
        try:
            ptr = _map(cu, self._handle, ordinal, self.size, gran, writable=True)
            self.tensor = _Mapping(ordinal, ptr, self.size, nbytes).tensor()
        except BaseException:
            cu.cuMemRelease(self._handle)  # an orphaned _Mapping unmaps itself
            raise

    def seal(self) -> None:
        # The worker keeps no view; importers map read-only.
        torch.cuda.synchronize(self.ordinal)
        self.tensor = None

    def export(self) -> Export:
        cu = _make_current(self.ordinal)
        fd = _check(cu.cuMemExportToShareableHandle(self._handle, _posix_fd(cu), 0),
                    "cuMemExportToShareableHandle")
        return Export({"size": self.size, "nbytes": self.nbytes,
                       "granularity": self.granularity}, [int(fd)])

    def free(self) -> None:
        self.tensor = None
        if self._handle is not None:
            cu = _make_current(self.ordinal)
            cu.cuMemRelease(self._handle)
            self._handle = None


def open_vmm(handle: dict[str, Any], fds: list[int], ordinal: int,
             writable: bool = False) -> torch.Tensor:
    """Import a VMM allocation and map it on this process's ``ordinal``: read-only, or
    read-write for an exporter filling it (:mod:`~warmpool.workers.export`)."""
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise WorkerError(f"cuda-vmm handle needs 1 descriptor, got {len(fds)}")
    try:
        cu = _make_current(ordinal)
        size, nbytes = int(handle["size"]), int(handle["nbytes"])
        gran = int(handle["granularity"])
        imported = _check(cu.cuMemImportFromShareableHandle(fds[0], _posix_fd(cu)),
                          "cuMemImportFromShareableHandle")
    finally:
        os.close(fds[0])
    try:
        ptr = _map(cu, imported, ordinal, size, gran, writable=writable)
    finally:
        # The mapping holds its own reference: releasing the handle now means the memory
        # goes exactly when the mapping does.
        cu.cuMemRelease(imported)
    return _Mapping(ordinal, ptr, size, nbytes).tensor()
