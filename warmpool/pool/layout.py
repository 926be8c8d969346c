"""The resident layout: where each tensor lives in the ONE flat buffer of a model.

One allocation per (model, device) makes attach cost one mapping however many tensors
there are, and lets the pool account and free a model in one step. Tensors are placed in
file order (so streaming writes move forward through the buffer) at offsets aligned to
:data:`ALIGNMENT` bytes, which satisfies every dtype and the 256-byte alignment CUDA
kernels prefer. The layout is plain JSON: it crosses process boundaries, never pickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from warmpool.errors import SafetensorsError
from warmpool.model.safetensors import SafetensorsHeader

ALIGNMENT = 256
LAYOUT_VERSION = 1


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class Slot:
    """One tensor: its place in the buffer and where its bytes come from."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # in the resident buffer
    nbytes: int
    file: str  # relative key of the safetensors file
    file_offset: int  # absolute offset of the tensor's bytes in that file


@dataclass(frozen=True)
class Layout:
    content_hash: str
    total_bytes: int
    slots: tuple[Slot, ...]
    alignment: int = ALIGNMENT

    @property
    def files(self) -> list[str]:
        return sorted({s.file for s in self.slots})

    def slots_of(self, file: str) -> list[Slot]:
        return [s for s in self.slots if s.file == file]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": LAYOUT_VERSION,
            "content_hash": self.content_hash,
            "total_bytes": self.total_bytes,
            "alignment": self.alignment,
            "tensors": [
                [s.name, s.dtype, list(s.shape), s.offset, s.nbytes, s.file, s.file_offset]
                for s in self.slots
            ],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Layout:
        """Rebuild a layout and check it against the buffer it describes.

        A layout read from disk or a socket is checked as untrusted: a slot outside the
        buffer would turn a view into an out-of-bounds read.
        """
        if data.get("version") != LAYOUT_VERSION:
            raise ValueError(f"unsupported layout version {data.get('version')!r}")
        total = int(data["total_bytes"])
        slots = []
        for name, dtype, shape, offset, nbytes, file, file_offset in data["tensors"]:
            if offset < 0 or nbytes < 0 or offset + nbytes > total:
                raise ValueError(f"layout slot {name!r} lies outside the {total}-byte buffer")
            slots.append(Slot(name, dtype, tuple(shape), offset, nbytes, file, file_offset))
        return cls(str(data["content_hash"]), total, tuple(slots), int(data["alignment"]))

    @classmethod
    def loads(cls, text: str | bytes) -> Layout:
        return cls.from_json(json.loads(text))


def plan_layout(content_hash: str, headers: Iterable[tuple[str, SafetensorsHeader]],
                alignment: int = ALIGNMENT) -> Layout:
    """Place every tensor of ``headers`` (relative key, header) in one aligned buffer."""
    slots: list[Slot] = []
    seen: dict[str, str] = {}
    offset = 0
    for key, header in sorted(headers, key=lambda kh: kh[0]):
        for t in header.tensors:
            if t.name in seen:
                raise SafetensorsError(f"tensor also defined in {seen[t.name]}",
                                       file=header.file, tensor=t.name)
            seen[t.name] = key
            offset = align_up(offset, alignment)
            slots.append(Slot(t.name, t.dtype, t.shape, offset, t.nbytes, key,
                              header.data_start + t.begin))
            offset += t.nbytes
    return Layout(content_hash, align_up(max(offset, 1), alignment), tuple(slots), alignment)
