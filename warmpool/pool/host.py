"""The host tier: one POSIX shared-memory segment per model, and its published record.

A segment is filled under a *partial* name (``…<hash>.<random>.part-<pid>``) and renamed
to its final name (``…<hash>.<random>``) only when every byte is in place, so a reader can
never map half a model and a crashed filler leaves a name that :meth:`HostTier.reclaim`
recognises. Beside it, in the private runtime directory, ``resident/<hash>@cpu.json``
records the URI and ``resident/<hash>@cpu.layout`` the layout as a binary index (constant
cost to open, see :mod:`warmpool.pool.layout_index`): the one thing ``attach`` reads —
never the source files. The index is written before the record, so a record always has its
index.

Segments are created mode 0600: only processes of the same user may map them. Anyone
may create a name in ``/dev/shm``, so each segment's name has a random part (recorded in
its record) that no other user can know in advance: a name planted to block a model's
fill cannot hit (and the create is ``O_EXCL``, so a hit would fail, not be used). A
segment is used only when it is a regular file of ours, mode 0600, checked on the open
descriptor (:func:`open_segment`); a record names its segment, and that name must be one
this tier gives that content hash. Names under our prefix that are not our regular files
(planted, or a directory) are counted and reported once per sweep, never locked or used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
import re
import secrets
import stat
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from warmpool.config import private_dir
from warmpool.errors import CapacityError, ForeignSegmentError
from warmpool.locks import try_lock
from warmpool.pool.arena import (
    DEFAULT_CHUNK,
    Arena,
    ArenaPlace,
    Grant,
    map_chunks,
    open_arena,
    zero_gaps,
)
from warmpool.pool.layout import Layout
from warmpool.pool.layout_index import LayoutIndex, encode
from warmpool.pool.leases import Lease, Leases
from warmpool.pool.registry.files import atomic_write, read_regular

if TYPE_CHECKING:  # imported where a segment is mapped: listing and evicting need no torch
    import torch

SHM_DIR = Path("/dev/shm")
log = logging.getLogger(__name__)
DEVICE = "cpu"


@dataclass(frozen=True)
class HostResident:
    """A model resident in the host tier: which segment, which buffer layout, for which
    model — what attach needs. (A worker's counterpart on its device is
    :class:`warmpool.workers.residents.DeviceResident`.)"""

    uri: str
    content_hash: str
    segment: str
    layout: LayoutIndex
    created_at: float
    aliases: tuple[str, ...] = ()  # other URIs of the same bytes
    #: The engine-layout key (JSON) when the segment holds an engine's processed
    #: parameters; None for a checkpoint. Kept here so an adopting registry recovers it.
    engine: dict[str, Any] | None = None
    #: Where its bytes are when they live in the host arena (``segment`` is then the
    #: arena's file); None for a segment of its own.
    arena: ArenaPlace | None = None

    @property
    def key(self) -> str:
        return f"{self.content_hash}@{DEVICE}"

    @property
    def names(self) -> tuple[str, ...]:
        """Every URI of these bytes, ``uri`` first."""
        return (self.uri, *self.aliases)

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "uri": self.uri, "content_hash": self.content_hash, "segment": self.segment,
            "created_at": self.created_at, "aliases": list(self.aliases),
            "total_bytes": self.layout.total_bytes, "tensors": len(self.layout)}
        if self.engine is not None:
            data["engine"] = self.engine
        if self.arena is not None:
            data["arena"] = self.arena.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, object], layout: LayoutIndex) -> HostResident:
        if layout.content_hash != data["content_hash"]:
            raise ValueError(f"layout index of {layout.content_hash} beside the record of "
                             f"{data['content_hash']}")
        engine = data.get("engine")
        place = ArenaPlace.from_json(data["arena"]) if data.get("arena") is not None else None
        if place is not None and (place.file != data["segment"]
                                  or place.span < layout.total_bytes):
            raise ValueError("its arena place is not its segment's, or too small")
        return cls(str(data["uri"]), str(data["content_hash"]), str(data["segment"]),
                   layout, float(data["created_at"]),  # type: ignore[arg-type]
                   tuple(map(str, data.get("aliases") or ())),  # type: ignore[call-overload]
                   dict(engine) if isinstance(engine, dict) else None, place)


class WritableSegment:
    """A segment being filled; ``buffer`` is a flat uint8 tensor over its mapping."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.published: str | None = None  # the content hash it was published under
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            _allocate(fd, size, path)
            self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        import torch
        self.buffer = torch.frombuffer(self._mmap, dtype=torch.uint8)

    def close(self) -> None:
        """Drop our references; the mapping itself goes when the last view of it does.

        Never ``mmap.close()`` here: torch keeps a pointer into the mapping, not a buffer
        export, so an explicit unmap under a live view (a traceback's frame, a caller's
        variable) turns the next read of it into a segmentation fault.
        """
        self.buffer = None  # type: ignore[assignment]
        self._mmap = None  # type: ignore[assignment]


class ArenaSegment:
    """A fill into chunks of the host arena: the same ``buffer`` as a
    :class:`WritableSegment`, over chunks whose pages are faulted already. Its page
    tables are built at once (``MAP_POPULATE``): the fill writes every page anyway."""

    def __init__(self, grant: Grant, size: int) -> None:
        self.grant = grant
        self.size = size
        self.published: str | None = None
        self.path = SHM_DIR / grant.place.file
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            if not segment_ok(os.fstat(fd)):
                raise ForeignSegmentError(f"{self.path} is not a segment of ours")
            self._mmap, self.whole = map_chunks(fd, grant.place, writable=True,
                                                populate=True)
        finally:
            os.close(fd)
        self.buffer = self.whole[:size]

    def close(self) -> None:
        """Drop the fill's buffer; ``whole`` stays until the publish has cleared what
        the fill did not write (:meth:`HostTier.publish`) or the discard."""
        self.buffer = None  # type: ignore[assignment]

    def release(self) -> None:
        self.buffer = self.whole = None  # type: ignore[assignment]
        self._mmap = None  # type: ignore[assignment]


def check_segment_name(segment: str) -> str:
    """A record's ``segment`` field as a plain name in /dev/shm, never a path."""
    if not segment or "/" in segment or "\x00" in segment or segment in (".", ".."):
        raise ForeignSegmentError(f"segment name {segment!r} is not a plain name")
    return segment


def segment_ok(st: os.stat_result) -> bool:
    """Ours to trust: a regular file owned by this user, mode 0600 (no one else can
    have written it). A planted file, a link or a FIFO fails this."""
    return (stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()
            and stat.S_IMODE(st.st_mode) == 0o600)


def open_segment(segment: str, size: int) -> int:
    """An fd on ``segment`` once the open file itself proved ours and ``size`` bytes long.

    Checked after the open (``fstat``), so nothing can be swapped in between the check and
    the use; no symlink is followed and a FIFO cannot block the open.
    """
    path = SHM_DIR / check_segment_name(segment)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EACCES, errno.EPERM):
            raise ForeignSegmentError(f"{path} is not a segment of ours "
                                      f"({exc.strerror}); refusing to map it") from None
        raise
    try:
        st = os.fstat(fd)
        if not segment_ok(st):
            kind = "a file" if stat.S_ISREG(st.st_mode) else "not a regular file"
            raise ForeignSegmentError(
                f"{path} is not a segment of ours ({kind}, owner uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):o}); refusing to map it")
        if st.st_size < size:
            raise ForeignSegmentError(f"{path} holds {st.st_size} bytes, its layout {size}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _allocate(fd: int, size: int, path: Path) -> None:
    """Take every page of the segment now. A tmpfs file grows sparse: without this a
    fill into a /dev/shm that runs full half-way dies of SIGBUS (a write through the
    mapping) or EFAULT (a read into it), killing the filling process. Here the kernel
    says ENOSPC before any byte is streamed, and the prefetch fails cleanly."""
    if size == 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.ENOMEM):
            raise
        _, free = HostTier.shm_bytes()
        raise CapacityError(
            f"{SHM_DIR} cannot hold {size} bytes for {path.name}: {os.strerror(exc.errno)} "
            f"({free} bytes free there; other processes, or the tmpfs size limit, took the "
            "rest)", needed=size, free=free) from None


def map_resident(resident: HostResident) -> tuple[mmap.mmap, torch.Tensor]:
    """A published model's bytes, read-only, as one flat uint8 tensor: its own segment,
    or its chunks of the arena mapped side by side (one ``mmap`` per run of them)."""
    size = resident.layout.total_bytes
    if resident.arena is None:
        return map_readonly(resident.segment, size)
    fd = open_arena(resident.arena)
    try:
        mapping, whole = map_chunks(fd, resident.arena, writable=False)
    finally:
        os.close(fd)
    return mapping, whole[:size]


def map_readonly(segment: str, size: int) -> tuple[mmap.mmap, torch.Tensor]:
    """Map a published segment read-only: a stray write faults instead of corrupting
    weights that other processes share. Costs one mmap, whatever the model's size."""
    import torch
    fd = open_segment(segment, size)
    try:
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": intended
        buffer = torch.frombuffer(mapping, dtype=torch.uint8)
    return mapping, buffer


_HEX = re.compile(r"[0-9a-f]{8,64}")


_RANDOM = re.compile(r"[0-9a-f]{16}")


def _ours(st: os.stat_result) -> bool:
    """A regular file of this user: the only kind of name under our prefix we remove."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()


def _remove_ours(path: Path) -> bool:
    """Unlink ``path`` if it is a regular file of ours. Anything else (a file another
    user planted, which sticky /dev/shm would not let us remove, or a directory) is left
    alone and never taken for ours; :meth:`HostTier.reclaim` reports them."""
    try:
        if not _ours(path.lstat()):
            return False
        path.unlink()
        return True
    except FileNotFoundError:
        return False


class HostTier:
    def __init__(self, runtime_dir: Path, arena_chunk: int | None = None) -> None:
        """``arena_chunk``: fill new models into the host arena, in chunks of that many
        bytes (None: a segment of its own per model). Models already in the arena are
        read, evicted and reclaimed either way."""
        self.runtime_dir = runtime_dir
        self.arena_chunk = arena_chunk
        self._arena: Arena | None = None
        self.records = private_dir(runtime_dir / "resident")
        self.locks = private_dir(runtime_dir / "locks")
        # Segment names are global to the machine: the runtime directory is part of the
        # name so that two pools (two users, two test runs) never share a segment.
        tag = hashlib.sha256(str(runtime_dir.resolve()).encode()).hexdigest()[:8]
        self.prefix = f"warmpool-{os.getuid()}-{tag}-"

    @property
    def arena(self) -> Arena:
        if self._arena is None:
            self._arena = Arena(self.runtime_dir, self.prefix, SHM_DIR, self.records,
                                self.lock_path, self.arena_chunk or DEFAULT_CHUNK)
        return self._arena

    def has_arena(self) -> bool:
        """Whether this pool has ever filled into an arena (nothing to look at if not)."""
        return self._arena is not None or (self.runtime_dir / "arena").is_dir()

    # --- names ---------------------------------------------------------------------
    def new_segment_name(self, content_hash: str) -> str:
        """A fresh name for a segment of ``content_hash``: ``<prefix><hash>.<16 hex>``."""
        return f"{self.prefix}{content_hash}.{secrets.token_hex(8)}"

    def is_segment_name(self, content_hash: str, name: str) -> bool:
        """Whether ``name`` is one this tier gives a (final) segment of ``content_hash``.
        The name without a random part is that of 0.2's records, still read."""
        stem = f"{self.prefix}{content_hash}"
        return name == stem or (name.startswith(stem + ".")
                                and _RANDOM.fullmatch(name[len(stem) + 1:]) is not None)

    def is_arena_name(self, name: str) -> bool:
        return self.arena.is_arena_name(name)

    def _names_of(self, content_hash: str) -> list[Path]:
        """Every name in /dev/shm of ``content_hash`` under our prefix: segments and
        partial segments, whoever made them."""
        stem = f"{self.prefix}{content_hash}"
        return [p for p in SHM_DIR.glob(f"{stem}*")
                if p.name == stem or p.name.startswith(stem + ".")]

    def lock_path(self, key: str) -> Path:
        return self.locks / f"{key}.lock"

    def _record_path(self, content_hash: str) -> Path:
        return self.records / f"{content_hash}@{DEVICE}.json"

    def _index_path(self, content_hash: str) -> Path:
        return self.records / f"{content_hash}@{DEVICE}.layout"

    # --- filling -------------------------------------------------------------------
    def create(self, content_hash: str, size: int) -> WritableSegment | ArenaSegment:
        """A new partial segment under a fresh random name, or chunks of the arena when
        it is on; the caller must hold the entry's lock while filling."""
        if self.arena_chunk is not None and size > 0:
            grant = self.arena.allocate(f"{content_hash}@{DEVICE}", size)
            try:
                return ArenaSegment(grant, size)
            except BaseException:
                self.arena.settle(grant)
                raise
        path = SHM_DIR / f"{self.new_segment_name(content_hash)}.part-{os.getpid()}"
        try:
            return WritableSegment(path, size)
        except FileExistsError:  # 64 random bits taken: only if someone saw the name
            raise self._in_the_way(path) from None

    @staticmethod
    def _in_the_way(path: Path) -> ForeignSegmentError:
        try:
            owner = f"owned by uid {path.lstat().st_uid}"
        except OSError:
            owner = "not ours"
        return ForeignSegmentError(
            f"{path} is {owner}: another user created a name of this pool; remove it "
            "(as root) or use another runtime directory")

    def publish(self, segment: WritableSegment | ArenaSegment, uri: str, layout: Layout,
                created_at: float, engine: dict[str, Any] | None = None) -> HostResident:
        """Give a filled segment its final name and write the record attach reads; a
        segment the record named before (a re-publish) is removed after."""
        if isinstance(segment, ArenaSegment):
            return self._publish_chunks(segment, uri, layout, created_at, engine)
        name = segment.path.name.rsplit(".part-", 1)[0]
        final = SHM_DIR / name
        previous = self.read_record(layout.content_hash)
        try:
            st = final.lstat()
        except FileNotFoundError:
            pass
        else:
            # A planted file under our final name: in sticky /dev/shm we cannot replace
            # another user's file, and we must not leave it looking like ours.
            if not segment_ok(st):
                raise self._in_the_way(final)
        try:
            os.rename(segment.path, final)
        except PermissionError:
            raise self._in_the_way(final) from None
        index = encode(layout)
        atomic_write(self._index_path(layout.content_hash), index)
        resident = HostResident(uri, layout.content_hash, name, LayoutIndex(index), created_at,
                                engine=engine)
        atomic_write(self._record_path(layout.content_hash),
                     json.dumps(resident.to_json()).encode())
        if previous is not None and previous.segment != name and previous.arena is None:
            _remove_ours(SHM_DIR / previous.segment)
        segment.published = layout.content_hash
        return resident

    def _publish_chunks(self, segment: ArenaSegment, uri: str, layout: Layout,
                        created_at: float, engine: dict[str, Any] | None) -> HostResident:
        """The record names the chunks, then the claim goes: at no moment are they
        nobody's. The padding and the tail are cleared first, so nothing a chunk held
        for an earlier model is readable through this one."""
        zero_gaps(segment.whole, layout)
        segment.release()
        previous = self.read_record(layout.content_hash)
        if previous is not None and previous.arena is not None:
            self._retire_if_leased(previous)  # before the record stops naming them
        index = encode(layout)
        atomic_write(self._index_path(layout.content_hash), index)
        resident = HostResident(uri, layout.content_hash, segment.grant.place.file,
                                LayoutIndex(index), created_at, engine=engine,
                                arena=segment.grant.place)
        atomic_write(self._record_path(layout.content_hash),
                     json.dumps(resident.to_json()).encode())
        segment.published = layout.content_hash
        self.arena.settle(segment.grant)
        if previous is not None and previous.arena is None:
            _remove_ours(SHM_DIR / previous.segment)
        return resident

    def _retire_if_leased(self, resident: HostResident) -> None:
        """Chunks of ``resident`` that a live lease may read stay out of reuse until the
        last lease ends; without one they are free once no record names them."""
        leases = Leases(self.runtime_dir)
        if resident.arena is not None and leases.count(resident.key):
            self.arena.retire(resident.arena, leases.root / resident.key)

    def rename(self, content_hash: str, uri: str, aliases: list[str]) -> None:
        """Record the names of a published model (the caller holds its entry's lock)."""
        resident = self.resident(content_hash)
        if resident is None:
            return
        renamed = replace(resident, uri=uri, aliases=tuple(aliases))
        atomic_write(self._record_path(content_hash), json.dumps(renamed.to_json()).encode())

    def discard(self, segment: WritableSegment | ArenaSegment) -> None:
        """Drop a fill that failed. One that failed after its publish (Ctrl-C during
        the registry's last write: the registry never said warm) goes with its record,
        so that the segment and the registry never disagree."""
        segment.close()
        if isinstance(segment, ArenaSegment):
            segment.release()
            self.arena.settle(segment.grant)  # its chunks are free again
        else:
            segment.path.unlink(missing_ok=True)
        if segment.published is not None:
            self.remove(segment.published)

    # --- reading -------------------------------------------------------------------
    def resident(self, content_hash: str) -> HostResident | None:
        """The published model ``content_hash``, or None: no record, a record that does
        not parse or names another segment than ours, or a segment that is not ours (a
        planted file under our name is never taken for warm weights)."""
        resident = self.read_record(content_hash)
        if resident is None:
            return None
        try:
            return resident if segment_ok((SHM_DIR / resident.segment).lstat()) else None
        except FileNotFoundError:
            return None

    def read_record(self, content_hash: str) -> HostResident | None:
        """The record of ``content_hash`` if it is whole and consistent; a bad one is
        logged and skipped, so one corrupt file never breaks attach for every model."""
        path = self._record_path(content_hash)
        try:
            resident = HostResident.from_json(json.loads(read_regular(path)),
                                              LayoutIndex.open(self._index_path(content_hash)))
            named = (self.is_arena_name(resident.segment) if resident.arena is not None
                     else self.is_segment_name(content_hash, resident.segment))
            if (resident.content_hash != content_hash
                    or resident.layout.content_hash != content_hash or not named):
                raise ValueError("its hash or segment name is not this record's")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError,
                RecursionError) as exc:
            log.warning("skipping bad resident record %s: %s", path, exc,
                        extra={"event": "bad_record", "path": str(path)})
            return None
        return resident

    def residents(self, hash_prefix: str = "") -> list[HostResident]:
        """Every published model (whose content hash starts with ``hash_prefix``): only
        the matching records are read, each small whatever the tensor count."""
        found = []
        for path in sorted(self.records.glob(f"{hash_prefix}*@{DEVICE}.json")):
            resident = self.resident(path.name.split("@", 1)[0])
            if resident is not None:
                found.append(resident)
        return found

    def holds(self, resident: HostResident) -> bool:
        """Still published? Two stats, no parse: an eviction removes the record and the
        segment under the entry's exclusive lock, and a content hash names its bytes."""
        return (self._record_path(resident.content_hash).exists()
                and (SHM_DIR / resident.segment).exists())

    def lease(self, resident: HostResident, holder: str = "") -> Lease | None:
        """A lease on ``resident`` if it is still published, else None. Taken under the
        entry's shared lock: an eviction (exclusive) either ran before, and the check
        fails, or runs after and sees the lease."""
        from warmpool.locks import file_lock

        with file_lock(self.lock_path(resident.key), exclusive=False):
            if not self.holds(resident):
                return None
            return Leases(self.runtime_dir).acquire(resident.key, holder)

    def remove_all(self) -> None:
        """Drop every segment and record of this pool, the arena with them (tests and
        benchmarks)."""
        for path in SHM_DIR.glob(f"{self.prefix}*"):
            _remove_ours(path)
        if self.has_arena():
            (self.arena.root / "file").unlink(missing_ok=True)
        for record in [*self.records.glob("*.json"), *self.records.glob("*.layout")]:
            record.unlink(missing_ok=True)

    def remove(self, content_hash: str) -> None:
        """Unlink the segment and its record (the caller holds the entry's exclusive
        lock, so no fill of it is under way). Processes that mapped it keep their mapping
        until they unmap it; the memory returns to the system after the last one does.
        Chunks of the arena are free once the record is gone, unless a lease lives: then
        they are retired with the leases, and reused only after the last one ends."""
        resident = self.read_record(content_hash)
        if resident is not None:
            self._retire_if_leased(resident)
        for path in self._names_of(content_hash):
            _remove_ours(path)
        self._record_path(content_hash).unlink(missing_ok=True)
        self._index_path(content_hash).unlink(missing_ok=True)

    # --- capacity and recovery -----------------------------------------------------
    @staticmethod
    def shm_bytes() -> tuple[int, int]:
        """(total, free) bytes of the shared-memory filesystem."""
        st = os.statvfs(SHM_DIR)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def allocated(self, content_hash: str) -> int:
        """Bytes the kernel already gave the partial segments of ``content_hash`` (or
        the arena chunks its fill claimed)."""
        total = self.arena.claimed_bytes(content_hash) if self.has_arena() else 0
        for partial in self._names_of(content_hash):
            if ".part-" not in partial.name:
                continue
            try:
                st = partial.lstat()
            except FileNotFoundError:
                continue
            if _ours(st):
                total += st.st_blocks * 512
        return total

    def reclaim(self) -> list[str]:
        """Remove what a crashed process left: partial segments, and records or segments
        that lack their other half. An entry whose lock is held is someone's work in
        progress (a fill, a publish, an eviction) and is left alone."""
        hashes = {p.name[len(self.prefix):].split(".", 1)[0] for p in self._our_names()}
        hashes |= {p.name.split("@", 1)[0] for p in self.records.glob("*.json")}
        hashes |= {p.name.split("@", 1)[0] for p in self.records.glob("*.layout")}
        hashes = {h for h in hashes if _HEX.fullmatch(h)}  # names anyone may have made
        removed: list[str] = []
        for content_hash in sorted(hashes):
            fd = try_lock(self.lock_path(f"{content_hash}@{DEVICE}"))
            if fd is None:
                continue
            try:
                removed += self._reclaim_one(content_hash)
            finally:
                os.close(fd)
        return removed

    def _our_names(self) -> list[Path]:
        """The names under our prefix that are regular files of ours. The others (planted
        by another user, a directory) are reported in one line with their count."""
        ours: list[Path] = []
        foreign: list[Path] = []
        for path in SHM_DIR.glob(f"{self.prefix}*"):
            try:
                (ours if _ours(path.lstat()) else foreign).append(path)
            except FileNotFoundError:
                continue
        if foreign:
            log.warning("%d name(s) in %s carry this pool's prefix but are not its files "
                        "(another user's, or not regular files), e.g. %s: ignored",
                        len(foreign), SHM_DIR, foreign[0].name,
                        extra={"event": "foreign_segments", "count": len(foreign)})
        return ours

    def reclaim_partials(self) -> list[str]:
        """Remove partial segments whose writer is gone (its entry lock is free): the
        cheap part of :meth:`reclaim`, one listing of /dev/shm, for attach to run. A
        filler killed with SIGKILL leaves a segment as large as its model."""
        removed = []
        for partial in SHM_DIR.glob(f"{self.prefix}*.part-*"):
            content_hash = partial.name[len(self.prefix):].split(".", 1)[0]
            if not _HEX.fullmatch(content_hash):
                continue
            fd = try_lock(self.lock_path(f"{content_hash}@{DEVICE}"))
            if fd is None:
                continue  # a fill in progress
            try:
                if _remove_ours(partial):
                    removed.append(partial.name)
            finally:
                os.close(fd)
        return removed

    def _reclaim_one(self, content_hash: str) -> list[str]:
        removed = []
        names = self._names_of(content_hash)
        for partial in names:
            if ".part-" in partial.name and _remove_ours(partial):
                removed.append(partial.name)
        finals = [p for p in names if ".part-" not in p.name]
        record, index = self._record_path(content_hash), self._index_path(content_hash)
        resident = self.resident(content_hash)
        if resident is None and (finals or record.exists() or index.exists()):
            # Part of a model (a record, its layout index or its segment without the
            # others), a record that does not parse, or a segment that is not ours:
            # nothing attach may use.
            for final in finals:
                _remove_ours(final)
            record.unlink(missing_ok=True)
            index.unlink(missing_ok=True)
            removed.append(f"{self.prefix}{content_hash}")
        elif resident is not None:
            # A segment its record does not name: a publish that died before its record.
            for final in finals:
                if final.name != resident.segment and _remove_ours(final):
                    removed.append(final.name)
        return removed
