"""Zero-copy tensor views over one flat byte buffer, host or device alike.

Views are built when first asked for: attaching a model of 100,000 tensors must not pay
for 100,000 views a serving engine may read a few at a time, or filter by name. Every
slot is checked against the buffer before any view exists, so a lazy view can never
reach outside it.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from warmpool.pool.layout import Layout
from warmpool.pool.layout_index import DTYPES, LayoutIndex

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8,
    "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16,
    "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64, "C64": torch.complex64,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
}
if hasattr(torch, "float8_e8m0fnu"):
    TORCH_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu


class TensorViews(Mapping[str, torch.Tensor]):
    """name → view of the buffer, in buffer order; read-only (the buffer is shared by
    every serving process, so nobody may swap a tensor in it). A view is made on first
    access and kept, so asking twice gives the same tensor object. Threads may share it:
    two racing first accesses build two equal views of the same bytes, nothing worse."""

    def __init__(self, buffer: torch.Tensor, table: LayoutIndex | Layout) -> None:
        self._buffer = buffer
        self._table = table
        self._typed: dict[str, tuple[torch.Tensor, int]] = {}
        self._strides: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._views: dict[int, torch.Tensor] = {}
        self._position: Callable[[str], int | None]
        if isinstance(table, Layout):
            self._names: Sequence[str] = [s.name for s in table.slots]
            self._position = {n: i for i, n in enumerate(self._names)}.get
        else:
            self._names = table.names
            self._position = table.position

    def __getitem__(self, name: str) -> torch.Tensor:
        i = self._position(name)
        if i is None:
            raise KeyError(name)
        return self.at(i)

    def at(self, i: int) -> torch.Tensor:
        """The ``i``-th tensor in buffer order."""
        view = self._views.get(i)
        if view is None:
            if isinstance(self._table, Layout):
                s = self._table.slots[i]
                dtype, shape, offset = s.dtype, s.shape, s.offset
            else:
                dtype, shape, offset = self._table.spec(i)
            view = self._views[i] = self._view(dtype, shape, offset)
        return view

    def _view(self, dtype: str, shape: tuple[int, ...], offset: int) -> torch.Tensor:
        # One typed view of the whole buffer per dtype, then one as_strided per tensor
        # (a single dispatcher call); strides are shared by the tensors of one shape.
        typed = self._typed.get(dtype)
        if typed is None:
            itemsize = TORCH_DTYPES[dtype].itemsize
            usable = self._buffer.numel() - self._buffer.numel() % itemsize
            typed = self._typed[dtype] = (self._buffer[:usable].view(TORCH_DTYPES[dtype]),
                                          itemsize)
        strides = self._strides.get(shape)
        if strides is None:
            strides = self._strides[shape] = _contiguous_strides(shape)
        return typed[0].as_strided(shape, strides, offset // typed[1])

    def materialize(self) -> dict[str, torch.Tensor]:
        """Every view at once, as a plain dict (for engines that walk all weights): the
        collector is paused meanwhile, as a pass over torch's objects would cost more
        than the views."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            if isinstance(self._table, LayoutIndex):
                self._build_from_columns(self._table)
            return {name: self.at(i) for i, name in enumerate(self._names)}
        finally:
            if enabled:
                gc.enable()

    def _build_from_columns(self, index: LayoutIndex) -> None:
        """All missing views from whole columns read at once (no per-tensor decode)."""
        dtypes, offsets = index.column("dtype").tolist(), index.column("offset").tolist()
        ndims, shapes, width = index.column("ndim").tolist(), index.shapes.tolist(), index.max_dims
        views, view = self._views, self._view
        for i in range(index.count):
            if i not in views:
                row = i * width
                views[i] = view(DTYPES[dtypes[i]], tuple(shapes[row:row + ndims[i]]),
                                offsets[i])

    def get(self, name: str, default: torch.Tensor | None = None) -> torch.Tensor | None:  # type: ignore[override]
        i = self._position(name)
        return default if i is None else self.at(i)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._position(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"TensorViews({len(self)} tensors, {len(self._views)} built)"


def tensor_views(buffer: torch.Tensor, layout: LayoutIndex | Layout) -> TensorViews:
    """name → tensor, each a view of ``buffer`` (a flat uint8 tensor); nothing is copied.

    Every slot is checked first (inside the buffer, aligned for its dtype, shape matching
    its bytes): with a :class:`LayoutIndex` in a handful of vectorised operations, so the
    cost does not grow with the tensor count in Python.
    """
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise TypeError("buffer must be a flat uint8 tensor")
    if buffer.numel() < layout.total_bytes:
        raise ValueError(f"buffer holds {buffer.numel()} bytes, layout needs {layout.total_bytes}")
    if isinstance(layout, Layout):
        _check_slots(layout)
    else:
        _check_index(layout)
    return TensorViews(buffer, layout)


def _check_slots(layout: Layout) -> None:
    for s in layout.slots:
        itemsize = TORCH_DTYPES[s.dtype].itemsize
        if s.offset % itemsize:  # torch cannot view misaligned bytes as a wider type
            raise ValueError(f"tensor {s.name!r} at offset {s.offset} is not aligned to its "
                             f"{s.dtype} items ({itemsize} bytes)")
        if s.offset < 0 or s.offset + s.nbytes > layout.total_bytes:
            raise ValueError(f"layout slot {s.name!r} lies outside the "
                             f"{layout.total_bytes}-byte buffer")
        numel = 1
        for dim in s.shape:
            numel *= dim
        if min(s.shape, default=0) < 0 or numel * itemsize != s.nbytes:
            raise ValueError(f"tensor {s.name!r}: shape {s.shape} of {s.dtype} is not "
                             f"{s.nbytes} bytes")


_ITEMSIZES = [TORCH_DTYPES[d].itemsize if d in TORCH_DTYPES else 0 for d in DTYPES]


def _check_index(index: LayoutIndex) -> None:
    """Every slot of an untrusted index lies inside the buffer and matches its dtype and
    shape; checked on whole columns at once. numpy rather than torch: these are small
    single-threaded passes, and torch's thread pool can stall them on a busy machine."""
    n = index.count
    if n == 0:
        return
    col = {name: np.frombuffer(index.column(name), dtype="<i8")
           for name in ("offset", "nbytes", "dtype", "ndim")}
    shapes = (np.frombuffer(index.shapes, dtype="<i8").reshape(n, index.max_dims)
              if index.max_dims else np.ones((n, 1), dtype=np.int64))
    dtype = col["dtype"]
    if bool(((dtype < 0) | (dtype >= len(DTYPES))).any()):
        raise ValueError("layout index has an unknown dtype code")
    itemsize = np.array(_ITEMSIZES, dtype=np.int64)[dtype]
    offset, nbytes, ndim = col["offset"], col["nbytes"], col["ndim"]
    beyond = np.arange(shapes.shape[1]) >= ndim[:, None]
    problems = {
        "a dtype this torch lacks": itemsize == 0,
        "a slot outside the buffer": (offset < 0) | (nbytes < 0)
                                     | (offset > index.total_bytes - nbytes),
        "a tensor misaligned for its dtype": offset % np.maximum(itemsize, 1) != 0,
        "a bad dimension count": (ndim < 0) | (ndim > index.max_dims),
        "a negative dimension": (shapes < 0).any(1),
        "padding that is not 1": (beyond & (shapes != 1)).any(1),
        # float64 is exact up to 2**53 bytes and cannot overflow as int64 products can
        "a shape that does not match its bytes":
            shapes.astype(np.float64).prod(1) * itemsize != nbytes,
    }
    for what, bad in problems.items():
        if bool(bad.any()):
            i = int(bad.argmax())
            raise ValueError(f"layout index has {what}: tensor {index.names[i]!r}")


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
