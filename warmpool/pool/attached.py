"""The attached model: zero-copy views of a warm entry, and the lease that keeps them.

A value of the pool, whichever tier made it (:mod:`warmpool.tiers`): the host tier's
views of a shared-memory segment, or a worker's CUDA IPC / VMM / shared-memory views.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from warmpool.pool.layout import Layout
from warmpool.pool.layout_index import LayoutIndex

if TYPE_CHECKING:  # torch is imported when a model is attached, not with the package:
    import torch  # `warmpool status` and friends start in a fraction of a second


class AttachedModel(Mapping[str, "torch.Tensor"]):
    """A read-only mapping of tensor name → view, plus the lease that keeps it alive.

    Use it as a context manager, or call :meth:`close` when the engine no longer needs
    the views (after copying into its own layout, say) so the pool may free the memory.
    """

    def __init__(self, uri: str, content_hash: str, device: str, layout: Layout | LayoutIndex,
                 tensors: Mapping[str, torch.Tensor], transport: str,
                 closer: Any) -> None:
        self.uri = uri
        self.content_hash = content_hash
        self.device = device
        self.layout = layout
        self.transport = transport
        self._tensors = tensors
        self._closer = closer

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        return self._tensors

    @property
    def closed(self) -> bool:
        return self._closer is None

    def close(self) -> None:
        """End the lease. Views already handed out stay readable until dropped."""
        closer, self._closer = self._closer, None
        if closer is not None:
            closer()

    def __enter__(self) -> AttachedModel:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"AttachedModel({self.uri!r}, device={self.device!r}, tensors={len(self)}, "
                f"bytes={self.layout.total_bytes}, transport={self.transport!r})")


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection while the layout and the views are built. They are a few
    objects per tensor, enough to trigger a full collection, and in a process that has
    imported torch (a great many tracked objects) one costs more than the whole attach
    (docs/findings.md). The collector runs again afterwards, as before."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
