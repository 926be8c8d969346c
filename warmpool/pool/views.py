"""Zero-copy tensor views over one flat byte buffer, host or device alike."""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

import torch

from warmpool.pool.layout import Layout

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8,
    "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16,
    "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64, "C64": torch.complex64,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
}
if hasattr(torch, "float8_e8m0fnu"):
    TORCH_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu


def tensor_views(buffer: torch.Tensor, layout: Layout) -> Mapping[str, torch.Tensor]:
    """name → tensor, each a view of ``buffer`` (a flat uint8 tensor); nothing is copied.

    The returned mapping is read-only: the buffer is shared by every serving process,
    so nobody may swap a tensor in it.
    """
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise TypeError("buffer must be a flat uint8 tensor")
    if buffer.numel() < layout.total_bytes:
        raise ValueError(f"buffer holds {buffer.numel()} bytes, layout needs {layout.total_bytes}")
    # One typed view of the whole buffer per dtype, then one as_strided per tensor: a
    # single dispatcher call each instead of slice + view + view (docs/findings.md).
    typed: dict[str, torch.Tensor] = {}
    views: dict[str, torch.Tensor] = {}
    for s in layout.slots:
        dtype = TORCH_DTYPES[s.dtype]
        itemsize = dtype.itemsize
        if s.offset % itemsize:  # torch cannot view misaligned bytes as a wider type
            raise ValueError(f"tensor {s.name!r} at offset {s.offset} is not aligned to its "
                             f"{s.dtype} items ({itemsize} bytes)")
        whole = typed.get(s.dtype)
        if whole is None:
            usable = buffer.numel() - buffer.numel() % itemsize
            whole = typed[s.dtype] = buffer[:usable].view(dtype)
        views[s.name] = whole.as_strided(s.shape, _contiguous_strides(s.shape),
                                         s.offset // itemsize)
    return MappingProxyType(views)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


def byte_view(buffer: torch.Tensor) -> memoryview:
    """The bytes of a host tensor as a writable memoryview, for readers that fill it in
    place (``preadv``, ``readinto``) without a copy."""
    return memoryview(buffer.numpy())  # type: ignore[arg-type]  # numpy stubs: no Buffer on 3.11
