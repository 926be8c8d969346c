"""The layout as a binary index that opens in constant time, whatever the tensor count.

A host-tier record is read by every attach. As JSON, a layout of 100,000 tensors costs a
parse and 100,000 objects before the first view exists; as this index it costs one
``mmap`` and a fixed-size header. Per-tensor numbers are little-endian int64 columns that
are read in place (``memoryview.cast``) or, by the view builder, checked all at once as
tensors; names are one NUL-separated UTF-8 block, decoded in one call when first needed
(a checkpoint whose names contain NUL gets a JSON list instead, marked by the version).

    header   64 bytes: magic, version, max_dims, count, total_bytes, alignment,
             names_bytes, files_bytes, hash_bytes
    columns  count int64 each: offset, nbytes, file_offset, dtype, file, ndim
    shapes   count × max_dims int64, unused dimensions padded with 1
    names, files (NUL-separated UTF-8), content hash (ASCII)

The index is read as untrusted input: sizes are checked against the file here, and every
slot against the buffer before a view is built (:func:`warmpool.pool.views.tensor_views`).
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import struct
import sys
from array import array
from functools import cached_property
from pathlib import Path

from warmpool.pool.layout import Layout, Slot

MAGIC = b"WPLAYOUT"
VERSION = 1
#: Names and files as a JSON list of strings: any name safetensors allows, NUL included.
VERSION_JSON_NAMES = 2
_HEADER = struct.Struct("<8sII6Q")
COLUMNS = ("offset", "nbytes", "file_offset", "dtype", "file", "ndim")
#: Stable codes of the safetensors dtypes (their position); never reorder, only append.
DTYPES = ("BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "I64",
          "U64", "F64", "C64", "F8_E5M2", "F8_E4M3", "F8_E8M0")
_DTYPE_CODE = {name: code for code, name in enumerate(DTYPES)}
SEP = "\0"
#: Names are untrusted text: a lone surrogate (valid in a JSON header) must round-trip.
_UTF8 = ("utf-8", "surrogatepass")


def _join(strings: list[str], version: int) -> bytes:
    if version == VERSION_JSON_NAMES:
        return json.dumps(strings).encode("ascii")
    return SEP.join(strings).encode(*_UTF8)


def _split(raw: memoryview, count: int, version: int) -> list[str]:
    if version == VERSION_JSON_NAMES:
        strings = json.loads(bytes(raw)) if len(raw) else []
        if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
            raise ValueError("layout index names are not a list of strings")
        return strings
    return bytes(raw).decode(*_UTF8).split(SEP) if count else []


def encode(layout: Layout) -> bytes:
    """The index of ``layout`` (done once, when a model is published)."""
    slots = layout.slots
    version = VERSION
    for s in slots:
        if SEP in s.name or SEP in s.file or not s.file:  # "" alone would read back as no file
            version = VERSION_JSON_NAMES
        if s.dtype not in _DTYPE_CODE:
            raise ValueError(f"tensor {s.name!r} has dtype {s.dtype!r}, which the index lacks")
    files = layout.files
    file_ids = {f: i for i, f in enumerate(files)}
    max_dims = max((len(s.shape) for s in slots), default=0)
    columns = array("q")
    for values in ([s.offset for s in slots], [s.nbytes for s in slots],
                   [s.file_offset for s in slots], [_DTYPE_CODE[s.dtype] for s in slots],
                   [file_ids[s.file] for s in slots], [len(s.shape) for s in slots]):
        columns.extend(values)
    for s in slots:
        columns.extend(s.shape + (1,) * (max_dims - len(s.shape)))
    if sys.byteorder != "little":
        columns.byteswap()
    names = _join([s.name for s in slots], version)
    file_block = _join(list(files), version)
    digest = layout.content_hash.encode("ascii")
    header = _HEADER.pack(MAGIC, version, max_dims, len(slots), layout.total_bytes,
                          layout.alignment, len(names), len(file_block), len(digest))
    return header + columns.tobytes() + names + file_block + digest


class LayoutIndex:
    """A layout read from its index: the same questions as :class:`Layout` answers, but
    per-tensor data is only read when asked for (``slot(i)``), never all up front."""

    def __init__(self, data: bytes | mmap.mmap) -> None:
        self._data = data  # keeps an mmap alive as long as the index (and its columns)
        view = memoryview(data)
        if len(view) < _HEADER.size:
            raise ValueError("layout index is truncated (no header)")
        (magic, self.version, self.max_dims, self.count, self.total_bytes, self.alignment,
         names_bytes, files_bytes, hash_bytes) = _HEADER.unpack_from(view)
        if magic != MAGIC or self.version not in (VERSION, VERSION_JSON_NAMES):
            raise ValueError(f"not a layout index of version {VERSION} or {VERSION_JSON_NAMES} "
                             f"(magic {magic!r}, version {self.version})")
        per_tensor = 8 * (len(COLUMNS) + self.max_dims)
        start = _HEADER.size + per_tensor * self.count
        if len(view) != start + names_bytes + files_bytes + hash_bytes:
            raise ValueError(f"layout index holds {len(view)} bytes; its header says "
                             f"{start + names_bytes + files_bytes + hash_bytes}")
        if sys.byteorder != "little":  # rare enough to pay a copy for
            swapped = array("q", view[_HEADER.size:start])
            swapped.byteswap()
            view = memoryview(bytes(view[:_HEADER.size]) + swapped.tobytes()
                              + bytes(view[start:]))
        self._columns = {name: view[_HEADER.size + 8 * self.count * i:
                                    _HEADER.size + 8 * self.count * (i + 1)].cast("q")
                         for i, name in enumerate(COLUMNS)}
        self._shapes = view[_HEADER.size + 8 * self.count * len(COLUMNS):start].cast("q")
        self._names_raw = view[start:start + names_bytes]
        files_end = start + names_bytes + files_bytes
        self._files_raw = view[start + names_bytes:files_end]
        self.content_hash = bytes(view[files_end:files_end + hash_bytes]).decode("ascii")

    @classmethod
    def open(cls, path: Path) -> LayoutIndex:
        """Map an index file read-only: constant cost, pages are read as they are used."""
        # Not through a link, and never a FIFO or device planted under the name (it would
        # block the reader or feed it endless bytes): checked on the open descriptor.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{path} is not a regular file")
            size = st.st_size
            data: bytes | mmap.mmap = (mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
                                       if size else b"")
        finally:
            os.close(fd)
        return cls(data)

    @classmethod
    def of(cls, layout: Layout) -> LayoutIndex:
        return cls(encode(layout))

    def __len__(self) -> int:
        return self.count

    @cached_property
    def names(self) -> list[str]:
        """Tensor names in buffer order (one decode and one split, in C)."""
        names = _split(self._names_raw, self.count, self.version)
        if len(names) != self.count:
            raise ValueError(f"layout index names {len(names)} tensors, not {self.count}")
        return names

    @cached_property
    def _positions(self) -> dict[str, int]:
        positions = dict(zip(self.names, range(self.count)))
        if len(positions) != self.count:
            raise ValueError("layout index names a tensor twice")
        return positions

    def position(self, name: str) -> int | None:
        """Where ``name`` is in buffer order; the name table is built on the first call."""
        return self._positions.get(name)

    @cached_property
    def files(self) -> list[str]:
        return _split(self._files_raw, len(self._files_raw), self.version)

    def column(self, name: str) -> memoryview:
        """One int64 column (see :data:`COLUMNS`), read in place."""
        return self._columns[name]

    @property
    def shapes(self) -> memoryview:
        """``count × max_dims`` int64, row after row, padded with 1."""
        return self._shapes

    def spec(self, i: int) -> tuple[str, tuple[int, ...], int]:
        """(dtype, shape, offset) of tensor ``i``: all a view needs."""
        row = i * self.max_dims
        ndim = self._columns["ndim"][i]
        return (DTYPES[self._columns["dtype"][i]], tuple(self._shapes[row:row + ndim]),
                self._columns["offset"][i])

    def slot(self, i: int) -> Slot:
        dtype, shape, offset = self.spec(i)
        return Slot(self.names[i], dtype, shape, offset, self._columns["nbytes"][i],
                    self.files[self._columns["file"][i]], self._columns["file_offset"][i])

    @cached_property
    def slots(self) -> tuple[Slot, ...]:
        """Every slot as a :class:`Slot` (costs one object per tensor: not for attach)."""
        return tuple(self.slot(i) for i in range(self.count))

    def slots_of(self, file: str) -> list[Slot]:
        return [s for s in self.slots if s.file == file]

    def to_layout(self) -> Layout:
        return Layout(self.content_hash, self.total_bytes, self.slots, self.alignment)
