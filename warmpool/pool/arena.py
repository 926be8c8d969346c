"""The host arena: shared memory whose pages are faulted once, then reused model after model.

A fresh tmpfs segment costs the kernel an allocation, a zeroing and a page-table fault for
every 4 KiB page before the first weight byte lands in it (``bench/host_fill.py``: 0.57 s of
CPU per GB against 0.10 s to copy into faulted pages). A pool in steady state evicts one
model to make room for the next, so it pays that again and again. The arena pays once:

- One shared-memory file per pool (``<prefix>arena.<16 hex>``, mode 0600, found through
  ``<runtime>/arena/file``), cut into chunks of :attr:`Arena.chunk_bytes`. It grows by
  whole chunks when a fill needs more (``posix_fallocate``: ENOSPC is said before a byte is
  streamed, as for a segment) and gives pages back only when told (:meth:`Arena.trim`).
- Who owns a chunk is never stored as a free list that a crash could leave wrong: it is
  *derived*, under the arena's lock, from three kinds of file. A published model's record
  names its chunks. A fill in progress has a claim (``arena/claims/<hash>.<random>.json``),
  live exactly while its filler holds the entry's lock, so a filler killed by SIGKILL gives
  its chunks back to the next allocation without anyone sweeping. An evicted model that
  still had leases (``evict --force``) leaves a retirement (``arena/retired/<random>/``)
  holding those lease files, live while any of them is locked: a chunk is never handed to a
  new model while a process may still read the old one through it.
- A model's chunks need not be contiguous in the file, but its buffer is contiguous to
  every reader: :func:`map_chunks` reserves one address range and maps the chunks into it
  side by side with ``MAP_FIXED`` (one ``mmap`` per run of consecutive chunks, usually one).
  Readers map read-only, and only their model's chunks.

What a reused chunk held before must never be readable through the new model: the fill
writes every tensor byte, and :func:`zero_gaps` clears the alignment padding between
tensors and the tail of the last chunk.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import mmap
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from warmpool.config import private_dir
from warmpool.errors import CapacityError
from warmpool.locks import file_lock, try_lock
from warmpool.pool.registry.files import atomic_write, read_regular

if TYPE_CHECKING:
    import torch

    from warmpool.pool.layout import Layout
    from warmpool.pool.leases import Lease

log = logging.getLogger(__name__)

#: 64 MiB: a 16 GB model is 256 chunks (attach maps at most that many runs; measured in
#: bench/attach_scaling.py), a model wastes less than one chunk (under 1 % from 6.4 GB up),
#: and a free list of a 1 TB host is 16,384 entries, scanned in microseconds.
DEFAULT_CHUNK = 64 << 20
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
MAP_FIXED = 0x10
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
SEEK_DATA = getattr(os, "SEEK_DATA", 3)
_ARENA_NAME = re.compile(r"arena\.[0-9a-f]{16}")
_KEY = re.compile(r"[0-9a-f]{8,64}@cpu")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


@dataclass(frozen=True)
class ArenaPlace:
    """Where a model's bytes live in the arena: the file, the chunk size, its chunks in
    buffer order. Recorded in the model's record, so attach needs nothing else."""

    file: str
    chunk_bytes: int
    chunks: tuple[int, ...]

    def to_json(self) -> dict[str, object]:
        return {"file": self.file, "chunk_bytes": self.chunk_bytes, "chunks": list(self.chunks)}

    @classmethod
    def from_json(cls, data: object) -> ArenaPlace:
        if not isinstance(data, dict):
            raise ValueError("arena place is not an object")
        chunks = data["chunks"]
        if not isinstance(chunks, list) or not all(type(c) is int and c >= 0 for c in chunks):
            raise ValueError("arena chunks are not a list of chunk numbers")
        size = data["chunk_bytes"]
        if type(size) is not int or size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"arena chunk size {size!r} is not a positive multiple of a page")
        return cls(str(data["file"]), size, tuple(chunks))

    @property
    def span(self) -> int:
        return len(self.chunks) * self.chunk_bytes


@dataclass(frozen=True)
class ArenaStatus:
    """What ``warmpool status`` shows of the arena, in bytes."""

    file: str
    chunk_bytes: int
    size: int      # the file's length: every chunk it has ever grown to
    used: int      # chunks of published models, fills in progress, leased evictions
    free: int      # size - used
    faulted: int   # free chunks whose pages are still allocated: the next fills' reuse
    locked: int = 0  # page-locked by a GPU worker (the most any one of them holds)

    def to_json(self) -> dict[str, object]:
        return {"file": self.file, "chunk_bytes": self.chunk_bytes, "size": self.size,
                "used": self.used, "free": self.free, "faulted": self.faulted,
                "locked": self.locked}


@dataclass
class Grant:
    """Chunks handed to one fill; its claim keeps them its own until publish or discard."""

    place: ArenaPlace
    claim: Path


def chunks_for(nbytes: int, chunk_bytes: int) -> int:
    return -(-nbytes // chunk_bytes)


def runs(chunks: Sequence[int]) -> list[tuple[int, int, int]]:
    """(position in the buffer, first chunk, count) for each run of consecutive chunks."""
    out: list[tuple[int, int, int]] = []
    for position, chunk in enumerate(chunks):
        if out and out[-1][1] + out[-1][2] == chunk and out[-1][0] + out[-1][2] == position:
            pos, first, count = out[-1]
            out[-1] = (pos, first, count + 1)
        else:
            out.append((position, chunk, 1))
    return out


class Arena:
    """The chunk allocator of one pool (one runtime directory)."""

    def __init__(self, runtime_dir: Path, prefix: str, shm_dir: Path, records: Path,
                 lock_path_of: Callable[[str], Path], chunk_bytes: int = DEFAULT_CHUNK
                 ) -> None:
        if chunk_bytes <= 0 or chunk_bytes % mmap.PAGESIZE:
            raise ValueError(f"arena chunk size {chunk_bytes} is not a multiple of a page")
        self.chunk_bytes = chunk_bytes
        self.shm_dir = shm_dir
        self.prefix = prefix
        self.records = records
        self.root = private_dir(runtime_dir / "arena")
        self.claims = private_dir(self.root / "claims")
        self.retired = private_dir(self.root / "retired")
        self._lock = runtime_dir / "locks" / "arena.lock"
        self._lock_path_of = lock_path_of  # entry key -> its lock file (the host tier's)

    # --- the file ------------------------------------------------------------------
    def _name(self) -> str | None:
        """The arena file's name, and (into :attr:`chunk_bytes`) the chunk size it was
        made with: an arena keeps its chunk size for life (records count in its chunks),
        and a changed ``host_arena_chunk`` applies to the next arena made."""
        try:
            data = json.loads(read_regular(self.root / "file", 4096))
            name, chunk = str(data["file"]), int(data["chunk_bytes"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            log.warning("unreadable %s (%s): a new arena is made", self.root / "file", exc,
                        extra={"event": "bad_record"})
            return None
        if not self.is_arena_name(name) or chunk <= 0 or chunk % mmap.PAGESIZE:
            return None
        if chunk != self.chunk_bytes:
            log.info("the host arena keeps its chunks of %d bytes (not %d)", chunk,
                     self.chunk_bytes, extra={"event": "arena_chunk"})
            self.chunk_bytes = chunk
        return name

    def is_arena_name(self, name: str) -> bool:
        return (name.startswith(self.prefix)
                and _ARENA_NAME.fullmatch(name[len(self.prefix):]) is not None)

    def _open(self, create: bool) -> tuple[int, str] | None:
        """An fd (read-write) on the arena file once it proved ours; a new file, under a
        new random name, when ``create`` and there is none of ours (the caller holds the
        arena lock). The old name may be gone (a reboot, systemd's RemoveIPC) and a file
        planted in its place: that is never used, and never blocks a fill; the records
        of the old arena are then records of a vanished segment (lost)."""
        from warmpool.pool.host import segment_ok

        name = self._name()
        if name is not None:
            try:
                fd = os.open(self.shm_dir / name,
                             os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError as exc:
                fd = -1
                if exc.errno != errno.ENOENT:
                    log.warning("arena %s cannot be opened (%s): a new one is made",
                                name, exc.strerror, extra={"event": "foreign_segments"})
            if fd >= 0:
                if segment_ok(os.fstat(fd)):
                    return fd, name
                os.close(fd)
                log.warning("%s is not a segment of ours: never used; a new arena is made",
                            self.shm_dir / name, extra={"event": "foreign_segments"})
        if not create:
            return None
        name = f"{self.prefix}arena.{secrets.token_hex(8)}"
        fd = os.open(self.shm_dir / name,
                     os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        atomic_write(self.root / "file", json.dumps(
            {"file": name, "chunk_bytes": self.chunk_bytes}).encode())
        return fd, name

    # --- who owns what -------------------------------------------------------------
    def _published(self, name: str) -> set[int]:
        """Chunks of the arena file ``name`` that published records name."""
        owned: set[int] = set()
        for path in self.records.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError, RecursionError):
                place = json.loads(read_regular(path)).get("arena")
                if place is not None and place.get("file") == name:
                    owned.update(ArenaPlace.from_json(place).chunks)
        return owned

    def _claimed(self, name: str) -> set[int]:
        """Chunks of fills in progress. A claim whose filler no longer holds its entry
        lock (killed, or it returned without publishing) is removed: its chunks are free."""
        owned: set[int] = set()
        for path in self.claims.glob("*.json"):
            try:
                data = json.loads(read_regular(path))
                key, chunks = str(data["key"]), [int(c) for c in data["chunks"]]
                if not _KEY.fullmatch(key):
                    raise ValueError(f"claim for {key!r}, not an entry key")
                if data["file"] != name:
                    chunks = []  # an earlier arena's (it vanished): nothing of this one
            except (OSError, ValueError, KeyError, TypeError, RecursionError):
                path.unlink(missing_ok=True)
                continue
            fd = try_lock(self._lock_path_of(key))
            if fd is None:
                owned.update(chunks)  # its filler is at work
                continue
            os.close(fd)
            path.unlink(missing_ok=True)
        return owned

    def _retained(self, name: str) -> set[int]:
        """Chunks of evicted models that a live lease may still read."""
        owned: set[int] = set()
        for directory in self.retired.iterdir():
            try:
                place = ArenaPlace.from_json(json.loads(read_regular(directory / "place.json")))
                chunks = list(place.chunks) if place.file == name else []
            except (OSError, ValueError, KeyError, TypeError, RecursionError):
                chunks = []
            if chunks and _any_locked((directory / "leases").glob("*.lease")):
                owned.update(chunks)
            else:
                shutil.rmtree(directory, ignore_errors=True)
        return owned

    def _owned(self, name: str) -> set[int]:
        return self._published(name) | self._claimed(name) | self._retained(name)

    def _survey(self, fd: int, name: str) -> tuple[int, set[int], list[int], set[int]]:
        """The arena as it is now (the caller holds its lock): its chunk count, the
        chunks owned, the free ones in file order, and those of them still faulted."""
        total = os.fstat(fd).st_size // self.chunk_bytes
        owned = self._owned(name)
        free = [c for c in range(total) if c not in owned]
        return total, owned, free, {c for c in free if self._faulted(fd, c)}

    # --- allocating ----------------------------------------------------------------
    def allocate(self, key: str, nbytes: int) -> Grant:
        """Chunks for ``nbytes`` of the entry ``key`` (whose lock the caller holds):
        faulted free chunks first, then chunks given back by a trim, then new ones."""
        need = chunks_for(nbytes, self.chunk_bytes)
        with file_lock(self._lock):
            opened = self._open(create=True)
            assert opened is not None
            fd, name = opened
            try:
                total, _, free, faulted = self._survey(fd, name)
                # reused pages first; free chunks in file order within each kind, so a
                # model's chunks tend to be consecutive (one mmap per run at attach)
                chosen = sorted(sorted(free, key=lambda c: c not in faulted)[:need])
                if len(chosen) < need:
                    grow = need - len(chosen)
                    os.ftruncate(fd, (total + grow) * self.chunk_bytes)
                    chosen += range(total, total + grow)
                for _, first, count in runs(chosen):
                    self._fault(fd, first, count, nbytes)
                place = ArenaPlace(name, self.chunk_bytes, tuple(chosen))
                claim = self.claims / f"{key.split('@', 1)[0]}.{secrets.token_hex(6)}.json"
                atomic_write(claim, json.dumps({"key": key, "pid": os.getpid(), "file": name,
                                                "chunks": list(chosen)}).encode())
                return Grant(place, claim)
            finally:
                os.close(fd)

    def _faulted(self, fd: int, chunk: int) -> bool:
        offset = chunk * self.chunk_bytes
        try:
            return os.lseek(fd, offset, SEEK_DATA) == offset
        except OSError:  # ENXIO: no data from there on
            return False

    def _fault(self, fd: int, first: int, count: int, nbytes: int) -> None:
        try:
            os.posix_fallocate(fd, first * self.chunk_bytes, count * self.chunk_bytes)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.ENOMEM):
                raise
            st = os.statvfs(self.shm_dir)
            free = st.f_bavail * st.f_frsize
            raise CapacityError(
                f"{self.shm_dir} cannot hold {count * self.chunk_bytes} more bytes for the "
                f"host arena ({nbytes} bytes to fill): {os.strerror(exc.errno)} ({free} "
                "bytes free there)", needed=nbytes, free=free) from None

    @staticmethod
    def settle(grant: Grant) -> None:
        """The fill is over (published: its record names the chunks now; or discarded:
        they are free again)."""
        grant.claim.unlink(missing_ok=True)

    def claimed_bytes(self, content_hash: str) -> int:
        """Bytes already allocated to fills of ``content_hash`` in progress."""
        total = 0
        for path in self.claims.glob(f"{content_hash}.*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                total += len(json.loads(read_regular(path))["chunks"]) * self.chunk_bytes
        return total

    # --- evicting ------------------------------------------------------------------
    def retire(self, place: ArenaPlace, lease_dir: Path) -> None:
        """Keep ``place``'s chunks from reuse while any lease in ``lease_dir`` lives: the
        directory moves under the retirement (the holders' locks move with their files)."""
        with file_lock(self._lock):  # an allocation never sees it half-made
            directory = private_dir(self.retired / secrets.token_hex(8))
            atomic_write(directory / "place.json", json.dumps(place.to_json()).encode())
            os.rename(lease_dir, directory / "leases")

    # --- page-locked by workers ----------------------------------------------------
    @staticmethod
    def announce_locked(runtime_dir: Path, nbytes: int) -> Lease:
        """A GPU worker page-locked ``nbytes`` of the arena: a lease-like file, locked
        while the worker holds the pages (the kernel ends it with the worker)."""
        from warmpool.pool.leases import Leases

        return Leases(runtime_dir).acquire("arena-locked", str(nbytes))

    def locked_bytes(self) -> int:
        from warmpool.pool.leases import Leases

        total = 0
        for holder in Leases(self.root.parent).holders("arena-locked"):
            with contextlib.suppress(TypeError, ValueError):
                total = max(total, int(str(holder.get("holder", 0))))
        return total

    # --- giving memory back --------------------------------------------------------
    def status(self) -> ArenaStatus | None:
        with file_lock(self._lock):
            opened = self._open(create=False)
            if opened is None:
                return None
            fd, name = opened
            try:
                total, _, free, faulted = self._survey(fd, name)
            finally:
                os.close(fd)
        c = self.chunk_bytes
        return ArenaStatus(name, c, total * c, (total - len(free)) * c, len(free) * c,
                           len(faulted) * c, self.locked_bytes())

    def trim(self, keep: int = 0) -> int:
        """Give the pages of free chunks back to the kernel until at most ``keep`` bytes
        of free faulted chunks remain; free chunks at the end of the file are cut off.
        Returns the bytes given back."""
        given = 0
        with file_lock(self._lock):
            opened = self._open(create=False)
            if opened is None:
                return 0
            fd, name = opened
            try:
                total, owned, free, faulted = self._survey(fd, name)
                excess = len(faulted) - keep // self.chunk_bytes
                for chunk in sorted(faulted, reverse=True):  # the end first: it can shrink
                    if excess <= 0:
                        break
                    _punch(fd, chunk * self.chunk_bytes, self.chunk_bytes)
                    given += self.chunk_bytes
                    excess -= 1
                end = total
                while end > 0 and end - 1 not in owned and not self._faulted(fd, end - 1):
                    end -= 1
                if end < total:
                    os.ftruncate(fd, end * self.chunk_bytes)
            finally:
                os.close(fd)
        return given


def _punch(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"giving arena pages back: {os.strerror(err)}")


def _any_locked(paths: Iterable[Path]) -> bool:
    for path in paths:
        fd = try_lock(path)
        if fd is None:
            return True
        os.close(fd)
    return False


def open_arena(place: ArenaPlace) -> int:
    """A read-only fd on the arena file of ``place`` once it proved ours and long enough
    to hold every chunk the place names."""
    from warmpool.pool.host import open_segment

    return open_segment(place.file, (max(place.chunks, default=-1) + 1) * place.chunk_bytes)


def map_chunks(fd: int, place: ArenaPlace, *, writable: bool,
               populate: bool = False) -> tuple[mmap.mmap, torch.Tensor]:
    """``place``'s chunks as one contiguous flat uint8 tensor (all of them: slice it to
    the model's size).

    The range is reserved by a Python ``mmap`` (anonymous, never touched) and every page
    of it replaced by the chunks' mappings (``MAP_FIXED``); when the tensor's last view
    goes, the reservation's own unmap takes the chunks' mappings with it, so nothing is
    unmapped under a live view. ``populate`` builds the page tables at once
    (``MAP_POPULATE``): a filler that writes every page saves a fault per page.
    """
    import torch

    if not place.chunks:
        raise ValueError("an arena place of no chunks has nothing to map")
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    reservation = mmap.mmap(-1, place.span, flags=mmap.MAP_PRIVATE | MAP_NORESERVE,
                            prot=prot)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": intended
        whole = torch.frombuffer(reservation, dtype=torch.uint8)
    base = whole.data_ptr()
    flags = mmap.MAP_SHARED | MAP_FIXED | (mmap.MAP_POPULATE if populate else 0)
    c = place.chunk_bytes
    for position, first, count in runs(place.chunks):
        want = base + position * c
        got = _libc.mmap(want, count * c, prot, flags, fd, first * c)
        if got != want:
            err = ctypes.get_errno()
            raise OSError(err, f"mapping arena chunks {first}..{first + count - 1}: "
                               f"{os.strerror(err)}")
    return reservation, whole


def zero_gaps(whole: torch.Tensor, layout: Layout) -> None:
    """Clear every byte of a reused buffer (``whole``: all its chunks) that the fill will
    not write: the padding between tensors and everything after the last one. One
    vectorised pass: the gaps between tensors are at most an alignment each."""
    array = whole.numpy()
    starts = np.fromiter((s.offset for s in layout.slots), np.int64, len(layout.slots))
    ends = starts + np.fromiter((s.nbytes for s in layout.slots), np.int64,
                                len(layout.slots))
    order = np.argsort(starts, kind="stable")
    gap_start = np.concatenate(([0], ends[order]))
    gap_end = np.concatenate((starts[order], [layout.total_bytes]))
    keep = gap_end > gap_start
    gap_start, gap_end = gap_start[keep], gap_end[keep]
    for at in range(0, len(gap_start), 4096):  # batches: the index is 8 bytes a byte
        starts, lengths = gap_start[at:at + 4096], (gap_end - gap_start)[at:at + 4096]
        index = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
        index += np.arange(int(lengths.sum()), dtype=np.int64)
        array[index] = 0
    array[layout.total_bytes:] = 0
