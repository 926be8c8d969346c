"""Devices by identity: names, GPU UUIDs, free memory, and page-locking host memory.

``cuda:0`` means different GPUs to processes with different ``CUDA_VISIBLE_DEVICES``
(a serving process pinned to GPU 3 calls it ``cuda:0``; the worker, which sees all of
them, calls it ``cuda:3``). So a client resolves its device to the GPU's UUID, the
worker is found by that UUID, and a handle is opened on whatever index the *receiving*
process gives that UUID. CPU "devices" (``cpu:N``) are worker slots for CI and hosts
without a GPU; their identity is their name.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

from warmpool.errors import ConfigError, WorkerError

log = logging.getLogger(__name__)

#: cudaHostRegisterReadOnly: lets a PROT_READ mapping be page-locked.
HOST_REGISTER_READ_ONLY = 8


@dataclass(frozen=True)
class DeviceSpec:
    kind: str  # "cpu" or "cuda"
    index: int

    @property
    def name(self) -> str:
        """File-name friendly: ``cuda0``, ``cpu1``."""
        return f"{self.kind}{self.index}"

    def __str__(self) -> str:
        return f"{self.kind}:{self.index}"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"


def parse_device(text: str) -> DeviceSpec:
    """``cpu`` / ``cpu:N`` / ``cuda`` / ``cuda:N`` → :class:`DeviceSpec`."""
    kind, _, index = text.strip().partition(":")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {text!r}: use cpu:N or cuda:N")
    try:
        number = int(index) if index else 0
    except ValueError:
        raise ConfigError(f"bad device index in {text!r}") from None
    if number < 0:
        raise ConfigError(f"bad device index in {text!r}")
    return DeviceSpec(kind, number)


def normalise_uuid(value: object) -> str:
    text = str(value).strip().lower()
    return text.removeprefix("gpu-")


def device_uuid(spec: DeviceSpec) -> str:
    """The identity of ``spec`` as *this* process numbers its devices."""
    if not spec.is_cuda:
        return str(spec)
    import torch

    if not torch.cuda.is_available():
        raise WorkerError(f"{spec} requested but CUDA is not available: {cuda_missing_why()}")
    if spec.index >= torch.cuda.device_count():
        raise WorkerError(f"{spec} does not exist: this process sees "
                          f"{torch.cuda.device_count()} GPU(s) (CUDA_VISIBLE_DEVICES?)")
    return normalise_uuid(torch.cuda.get_device_properties(spec.index).uuid)


def cuda_missing_why() -> str:
    """Why torch sees no GPU, and what to do about it."""
    import torch

    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build. On a GPU node install "
                "a CUDA build (pip install --force-reinstall torch --index-url "
                "https://download.pytorch.org/whl/cu128, or `make TORCH_INDEX= install`, which "
                "takes pip's default CUDA build); on a machine without a GPU use device cpu")
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but finds no "
            "usable GPU: check `nvidia-smi` (driver loaded?) and CUDA_VISIBLE_DEVICES; on a "
            "machine without a GPU use device cpu")


def local_index(uuid: str) -> int:
    """This process's index for the GPU with ``uuid``."""
    import torch

    wanted = normalise_uuid(uuid)
    for i in range(torch.cuda.device_count()):
        if normalise_uuid(torch.cuda.get_device_properties(i).uuid) == wanted:
            return i
    raise WorkerError(f"GPU {uuid} is not visible to this process (CUDA_VISIBLE_DEVICES?)")


def cuda_free_bytes(index: int) -> int:
    import torch

    free, _total = torch.cuda.mem_get_info(index)
    return int(free)


def visible_cuda_devices() -> list[DeviceSpec]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [DeviceSpec("cuda", i) for i in range(torch.cuda.device_count())]


# --- page-locking host memory --------------------------------------------------------


def pin_host_memory(ptr: int, nbytes: int) -> bool:
    """Page-lock ``nbytes`` at ``ptr`` (a read-only mapping) so uploads run at PCIe speed.

    Returns False, with CUDA's sticky last error cleared, when registration fails: left
    set, the next kernel launch check in torch would report our error as its own.
    """
    import torch

    err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, HOST_REGISTER_READ_ONLY)
    if int(getattr(err, "value", err)) == 0:
        return True
    log.warning("cudaHostRegister of %d bytes failed (%s); uploading from pageable memory",
                nbytes, err)
    clear_cuda_last_error()
    return False


def unpin_host_memory(ptr: int) -> None:
    import torch

    err = torch.cuda.cudart().cudaHostUnregister(ptr)
    if int(getattr(err, "value", err)) != 0:
        clear_cuda_last_error()


def clear_cuda_last_error() -> None:
    """``cudaGetLastError()`` on the CUDA runtime torch itself loaded.

    torch's ``cudart()`` binding has no cudaGetLastError, so we call it through ctypes on
    the very library the process already mapped (found in /proc/self/maps): ``dlopen``
    of an already-loaded path returns that instance, whose per-thread error we clear.
    """
    path = _loaded_cudart()
    if path is None:
        log.warning("could not find the loaded libcudart to clear CUDA's last error")
        return
    ctypes.CDLL(path).cudaGetLastError()


def _loaded_cudart() -> str | None:
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1]
                if "libcudart.so" in path:
                    return path
    except OSError:
        return None
    return None
