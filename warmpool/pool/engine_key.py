"""The key of an engine layout, and the layout of its buffer: values, below the tiers.

An engine layout is the parameters as an engine of one key (engine and version,
platform, dtype, quantisation, TP size and rank) holds them after post-processing
(:mod:`warmpool.engine_layouts` writes and attaches them). Its content hash is derived
from the checkpoint hash and the key, so a different version or configuration looks up
a different entry and never attaches wrong bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from warmpool.pool.layout import ALIGNMENT, Layout, Slot, align_up
from warmpool.pool.registry.base import PoolEntry

if TYPE_CHECKING:
    import torch

#: What an engine-layout slot records as its source file: the bytes came from an engine.
#: Not empty: the layout index stores file names joined, and one empty name reads back
#: as no file at all.
ENGINE_SOURCE = "engine"


@dataclass(frozen=True)
class EngineKey:
    """Everything that decides the bytes of an engine's processed parameters."""

    checkpoint: str  # content hash of the checkpoint the engine loaded
    engine: str  # "vllm", "sglang"
    engine_version: str
    dtype: str  # the engine's model dtype, e.g. "bfloat16"
    quantization: str = "none"
    tp_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if not self.checkpoint or not self.engine or not self.engine_version:
            raise ValueError("an engine key needs a checkpoint hash, an engine and its version")
        if self.tp_size < 1 or not 0 <= self.rank < self.tp_size:
            raise ValueError(f"rank {self.rank} is outside tensor-parallel size {self.tp_size}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def dumps(self) -> str:
        """The stable text form: sorted keys, no spaces; the content hash is taken of it."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineKey:
        known = {f.name for f in fields(cls)}
        missing = known - set(data)
        if missing:
            raise ValueError(f"engine key lacks {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def content_hash(self) -> str:
        """The entry's own content hash: of the checkpoint's hash and this key."""
        digest = hashlib.sha256()
        digest.update(b"warmpool-engine-layout\0")
        digest.update(self.checkpoint.encode())
        digest.update(b"\0")
        digest.update(self.dumps().encode())
        return digest.hexdigest()

    def label(self) -> str:
        """Short human form, used as the entry URI's fragment and in log lines."""
        return (f"{self.engine}-{self.engine_version},{self.dtype},quant={self.quantization},"
                f"tp={self.tp_size},rank={self.rank}")

    def differences(self, other: EngineKey) -> dict[str, tuple[Any, Any]]:
        """field → (ours, theirs) for each field that differs."""
        mine, theirs = self.to_json(), other.to_json()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}


def layout_uri(checkpoint_uri: str, key: EngineKey) -> str:
    return f"{checkpoint_uri}#{key.label()}"


def plan_engine_layout(key: EngineKey,
                       tensors: Iterable[tuple[str, torch.Tensor]]) -> Layout:
    """One aligned buffer for the named tensors, in the order given."""
    from warmpool.pool.views import TORCH_DTYPES

    names = {dtype: name for name, dtype in TORCH_DTYPES.items()}
    slots: list[Slot] = []
    seen: set[str] = set()
    offset = 0
    for name, tensor in tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} given twice")
        seen.add(name)
        if tensor.dtype not in names:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which a layout "
                            "cannot record")
        if tensor.is_sparse or tensor.device.type == "meta":
            raise TypeError(f"tensor {name!r} is not a dense tensor with data")
        offset = align_up(offset, ALIGNMENT)
        nbytes = tensor.numel() * tensor.element_size()
        slots.append(Slot(name, names[tensor.dtype], tuple(tensor.shape), offset, nbytes,
                          ENGINE_SOURCE, 0))
        offset += nbytes
    return Layout(key.content_hash, align_up(max(offset, 1), ALIGNMENT), tuple(slots),
                  ALIGNMENT)


@dataclass(frozen=True)
class ExportResult:
    """An engine layout written (or found warm) on a tier."""

    entry: PoolEntry
    seconds: float
    already_warm: bool


def write_engine_layout(buffer: torch.Tensor, layout: Layout,
                        items: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy each tensor once, bit for bit, into its slot of ``buffer`` (host or device
    memory; the tensors may live on any device). No view outlives the call: the caller
    seals or unmaps the buffer next."""
    from warmpool.pool.views import tensor_views

    views = tensor_views(buffer, layout)
    try:
        for name, tensor in items:
            views[name].copy_(tensor.detach())
    finally:
        del views
