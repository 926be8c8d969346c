"""What serving processes call: ``attach(uri_or_hash, device)`` → zero-copy tensors.

On the host tier attach reads one small JSON record from the private runtime directory,
maps the layout index and the model's shared-memory segment read-only (two ``mmap``s, no
page of the segment touched), checks every slot in a few vectorised operations, and
builds each view when it is first asked for: what remains per tensor is decoding its
name. It never reads the source files (they may be gone). A lease is held from the call
until ``close()`` or the process's death, and keeps the entry from being evicted.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from warmpool.config import Settings
from warmpool.errors import NotWarmError
from warmpool.locks import file_lock
from warmpool.pool.entries import HOST_DEVICE
from warmpool.pool.host import HostResident, HostTier, map_readonly
from warmpool.pool.layout import Layout
from warmpool.pool.layout_index import LayoutIndex
from warmpool.pool.leases import Lease, Leases
from warmpool.pool.refs import ModelRef

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


def attach(ref: str, device: str = HOST_DEVICE, *, settings: Settings | None = None,
           holder: str = "") -> AttachedModel:
    """Attach to the warm model ``ref`` (a URI or a content hash) on ``device``."""
    settings = settings or Settings.load()
    if device != HOST_DEVICE:
        from warmpool.workers.gpu_attach import attach_gpu

        with _gc_paused():
            gpu = attach_gpu(ref, device, settings, holder=holder)
        return AttachedModel(gpu.uri, gpu.content_hash, device, gpu.layout, gpu.tensors,
                             gpu.transport, gpu.close)
    from warmpool.pool.views import tensor_views

    host = HostTier(settings.runtime_dir)
    host.reclaim_partials()  # what a killed prefetch left must not hold memory for ever
    with _gc_paused():
        resident = _resolve(host, ref)
        with file_lock(host.lock_path(resident.key), exclusive=False):
            # Check again under the lock: an eviction may have won the race since _resolve.
            if not host.holds(resident):
                raise _not_warm(ref)
            lease = Leases(settings.runtime_dir).acquire(resident.key, holder)
        try:
            mapping, buffer = map_readonly(resident.segment, resident.layout.total_bytes)
            tensors = tensor_views(buffer, resident.layout)
        except FileNotFoundError:  # a forced evict between the lease and the open
            lease.release()
            raise _not_warm(ref) from None
        except BaseException:
            lease.release()
            raise
    return AttachedModel(_name(resident, ref), resident.content_hash, HOST_DEVICE,
                         resident.layout,
                         tensors, "shm", _HostCloser(lease, mapping))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
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


class _HostCloser:
    """Ends the lease; the mapping is left to the views (unmapping under a live view
    would turn a later read into a crash), and goes when the last of them does."""

    def __init__(self, lease: Lease, mapping: mmap.mmap) -> None:
        self.lease = lease
        self.mapping = mapping

    def __call__(self) -> None:
        self.lease.release()


def _resolve(host: HostTier, ref: str) -> HostResident:
    # NotWarmError for text that names nothing; a bug (a ref that is no string) is not
    # caught here, so it surfaces as the TypeError it is rather than as "not warm".
    wanted = ModelRef.parse(ref)
    if wanted.is_hash:
        matches = host.residents(hash_prefix=wanted.text)  # parses only the matching records
    else:
        matches = [r for r in host.residents()
                   if any(wanted.matches(name, r.content_hash) for name in r.names)]
    if not matches:
        raise _not_warm(ref)
    return max(matches, key=lambda r: r.created_at)


def _name(resident: HostResident, ref: str) -> str:
    """The URI the caller attached by (one of the model's names), or its first name."""
    with contextlib.suppress(NotWarmError):
        wanted = ModelRef.parse(ref)
        if not wanted.is_hash and wanted.text in resident.names:
            return wanted.text
    return resident.uri


def _not_warm(ref: str, device: str = HOST_DEVICE) -> NotWarmError:
    return NotWarmError(f"{ref} is not warm on {device}: run `warmpool prefetch {ref}` "
                        f"first (and `warmpool status` to see what is warm)")
