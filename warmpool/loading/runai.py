"""runai-model-streamer as a loader: local files, ``s3://`` and ``gs://`` into a buffer.

The streamer runs with ``owned=False`` and a ``memory_limit``, so memory stays bounded;
each tensor is copied into its slot before the iteration moves on (the streamer reuses
that memory afterwards: a retained view would silently read the next tensor's bytes).
Blocking: callers run it in a thread (:func:`warmpool.threads.to_thread_joined`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import torch

from warmpool.config import StreamerOptions
from warmpool.errors import StreamError, WarmpoolError
from warmpool.loading.environ import STREAMER_ENVIRONMENT
from warmpool.model.uri import ModelURI
from warmpool.pool.layout import Layout, Slot
from warmpool.pool.views import TORCH_DTYPES
from warmpool.storage.local import open_regular

Progress = Callable[[int], None]

#: Schemes runai-model-streamer 0.17 streams for us.
RUNAI_SCHEMES = ("file", "s3", "gs")

#: runai-model-streamer 0.17 opens ONE object-storage backend per process and keeps it
#: until exit ("Object storage backend will be closed on process exit"): after an
#: s3:// stream, a gs:// request goes to the S3 client and fails with "File access
#: error" (and the reverse). We remember which one this process opened.
_runai_object_scheme: str | None = None


def opened_object_scheme() -> str | None:
    """The object-store scheme this process's streamer is bound to, if any."""
    return _runai_object_scheme


def _runai_path(uri: ModelURI, key: str) -> str:
    return str(uri.path / key) if uri.is_local else uri.child(key)


def streamer_environment(options: StreamerOptions, largest_tensor: int = 0,
                         base: dict[str, str] | None = None) -> dict[str, str]:
    """The variables a streamer run needs, including what test servers need."""
    env = options.environment(base, largest_tensor=largest_tensor)
    if env.get("AWS_ENDPOINT_URL"):
        # S3-compatible servers answer path-style only.
        env.setdefault("RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "0")
        env.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    emulator = env.get("STORAGE_EMULATOR_HOST")
    if emulator and "CLOUD_STORAGE_EMULATOR_ENDPOINT" not in env:
        env["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = (
            emulator if emulator.startswith("http") else f"http://{emulator}")
    return env


def stream_runai(uri: ModelURI, layout: Layout, target: torch.Tensor, *,
                 options: StreamerOptions, files: list[str] | None = None,
                 progress: Progress, distributed: bool = False,
                 stop: threading.Event | None = None, stream_device: str = "cpu",
                 extra_env: dict[str, str] | None = None,
                 on_open: Callable[[Any], None] | None = None) -> int:
    """Fill ``target`` with runai-model-streamer (blocking; run it in a thread).

    ``stream_device`` is where the streamer lands tensors (a group streaming with NCCL
    broadcasts between device buffers); ``on_open`` sees the streamer before it starts
    (the worker group counts its storage reads there). Returns the tensors copied.
    """
    from runai_model_streamer import SafetensorsStreamer

    global _runai_object_scheme
    if uri.scheme != "file":
        _runai_object_scheme = _runai_object_scheme or uri.scheme
    slots = {s.name: s for s in layout.slots if files is None or s.file in files}
    paths = [_runai_path(uri, f) for f in sorted({s.file for s in slots.values()})]
    largest = max((s.nbytes for s in slots.values()), default=0)
    env = {**streamer_environment(options, largest, STREAMER_ENVIRONMENT.base()),
           **(extra_env or {})}
    if uri.is_local:  # the streamer's own open of a FIFO would block for ever
        for f in sorted({s.file for s in slots.values()}):
            os.close(open_regular(uri.path / f, f))
    filled = 0
    try:
        # Held for the whole run: the native library reads some variables (endpoints,
        # timeouts) when a request starts, not only when the streamer opens.
        with STREAMER_ENVIRONMENT.holding(env), SafetensorsStreamer() as streamer:
            if on_open is not None:
                on_open(streamer)
            streamer.stream_files(paths, device=stream_device, is_distributed=distributed,
                                  owned=False)
            for name, tensor in streamer.get_tensors():
                if stop is not None and stop.is_set():
                    raise StreamError(f"{uri}: streaming cancelled")
                slot = slots.get(name)
                if slot is None:
                    raise StreamError(f"{uri}: streamer yielded unexpected tensor {name!r}")
                copy_slot(target, slot, tensor, uri)
                filled += 1
                progress(slot.nbytes)
    except WarmpoolError:
        raise
    except Exception as exc:  # the streamer raises plain exceptions from C++
        raise StreamError(f"{uri}: runai-model-streamer failed reading "
                          f"{_suspects(uri, paths)}: {exc}") from exc
    if filled != len(slots):
        raise StreamError(f"{uri}: streamed {filled} of {len(slots)} tensors")
    return filled


def _suspects(uri: ModelURI, paths: list[str]) -> str:
    """The files a failed streamer run may have failed on: its C++ errors name none. A
    local file that is gone now is the culprit; otherwise every file of the run."""
    if uri.is_local:
        gone = [p for p in paths if not os.path.exists(p)]
        if gone:
            return ", ".join(gone) + " (no longer there)"
    shown = ", ".join(paths[:5])
    return shown + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")


def copy_slot(target: torch.Tensor, slot: Slot, tensor: torch.Tensor, uri: ModelURI) -> None:
    """Copy one streamed tensor's bytes into its slot, after checking it is the tensor the
    header promised (a file rewritten since its header was read is refused)."""
    if tensor.dtype != TORCH_DTYPES[slot.dtype] or tuple(tensor.shape) != slot.shape:
        raise StreamError(
            f"{uri.child(slot.file)}: tensor {slot.name!r} arrived as {tensor.dtype} "
            f"{tuple(tensor.shape)}, header said {slot.dtype} {slot.shape} (file changed?)")
    if slot.nbytes:
        flat = tensor.reshape(-1).view(torch.uint8)
        target[slot.offset : slot.offset + slot.nbytes].copy_(flat)
