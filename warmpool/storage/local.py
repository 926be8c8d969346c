"""The local filesystem behind the storage interface (``file://`` and plain paths).

The etag of a file is its inode, modification and change times (ns) and size: a rewrite
changes it, even one whose mtime was then set back, which is all the content hash needs,
without reading gigabytes to hash them.

Only regular files are listed or opened: a FIFO (or a device) in a model directory would
block the open or the read for ever. Every open is non-blocking and checked with
``fstat`` on the descriptor, and every call is bounded in time (a hung filesystem).
"""

from __future__ import annotations

import asyncio
import builtins  # the class's own ``list`` method shadows the type in its body
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from warmpool.errors import ObjectNotFoundError, StorageError, TransientStorageError, UnsafeKeyError
from warmpool.storage.base import DOWNLOAD_CHUNK, ObjectInfo, Store, validate_relative_key

T = TypeVar("T")

#: No single local call (a listing, a header read, a file copy) may take longer: a hung
#: NFS or FUSE mount fails the prefetch instead of keeping it for ever.
CALL_TIMEOUT_S = 600.0


def etag_of(st: os.stat_result) -> str:
    """The etag of a file from its stat: a rewrite or a replacement changes it."""
    # inode: a file replaced by rename keeps neither its inode nor its etag. ctime: a
    # user can set mtime back (touch -d, os.utime) after rewriting a shard in place, but
    # not ctime, which every write and every utime call moves to now.
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_ctime_ns:x}-{st.st_size:x}"


def open_regular(path: Path, key: str) -> int:
    """A read-only fd on ``path`` once ``fstat`` shows a regular file.

    ``O_NONBLOCK`` makes the open of a FIFO return at once instead of waiting for a
    writer; for a regular file the flag changes nothing.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ObjectNotFoundError(f"{path}: no such file", key=key) from None
    except OSError as exc:
        raise StorageError(f"{path}: {exc.strerror}", key=key) from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise StorageError(f"{path} is not a regular file (a FIFO, socket or device); "
                           "refusing to read it", key=key)
    return fd


class LocalStore(Store):
    async def list(self) -> list[ObjectInfo]:
        root = self.uri.path
        if not root.is_dir():
            raise ObjectNotFoundError(f"{self.uri}: no such directory", key="")
        try:
            return await self._bounded("", "list", self._walk, root)
        except OSError as exc:  # a dangling link, a file we may not read, a vanished dir
            name = Path(exc.filename).name if exc.filename else ""
            raise StorageError(f"{self.uri}: cannot list {name or 'the directory'}: "
                               f"{exc.strerror or exc}", key=name or None) from exc

    async def _bounded(self, key: str, what: str, fn: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), CALL_TIMEOUT_S)
        except TimeoutError:
            raise TransientStorageError(f"{self.uri.child(key)}: {what} took over "
                                        f"{CALL_TIMEOUT_S:g} s (hung filesystem?)",
                                        key=key) from None

    @staticmethod
    def _walk(root: Path) -> builtins.list[ObjectInfo]:
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue  # temporary files of uploads in progress, editor droppings
                full = Path(dirpath, name)
                key = full.relative_to(root).as_posix()
                if full.is_symlink() and not full.resolve().is_relative_to(root.resolve()):
                    # A link out of the model directory would copy whatever it names
                    # (/etc/shadow, another user's files) into the cache and the pool.
                    raise UnsafeKeyError(f"{root / key} links outside the model directory",
                                         key=key)
                st = full.stat()
                if not stat.S_ISREG(st.st_mode):
                    raise StorageError(f"{root / key} is not a regular file (a FIFO, socket "
                                       "or device); remove it from the model directory",
                                       key=key)
                found.append(ObjectInfo(key, st.st_size, etag_of(st)))
        return sorted(found)

    def _path(self, key: str) -> Path:
        return self.uri.path / validate_relative_key(key)

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        path = self._path(key)
        return await self._bounded(key, "read", self._pread, path, key, start, length)

    async def read_into(self, key: str, start: int, out: memoryview) -> None:
        path = self._path(key)
        await self._bounded(key, "read", self._preadinto, path, key, start, out)

    def _pread(self, path: Path, key: str, start: int, length: int) -> bytes:
        fd = open_regular(path, key)
        try:
            return os.pread(fd, length, start)
        except OSError as exc:
            raise StorageError(f"{self.uri.child(key)}: {exc.strerror}", key=key) from exc
        finally:
            os.close(fd)

    def _preadinto(self, path: Path, key: str, start: int, out: memoryview) -> None:
        fd = open_regular(path, key)
        try:
            with os.fdopen(fd, "rb", closefd=True) as f:
                done = 0
                while done < len(out):
                    n = os.preadv(f.fileno(), [out[done:]], start + done)
                    if n == 0:
                        raise StorageError(
                            f"{self.uri.child(key)}: file ended at {start + done}, "
                            f"{len(out) - done} bytes short",
                            key=key,
                        )
                    done += n
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.uri.child(key)}: no such file", key=key) from None

    async def download(self, key: str, dest: Path) -> int:
        try:
            return await self._bounded(key, "copy", self._copy, self._path(key), key, dest)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.uri.child(key)}: no such file", key=key) from None
        except OSError as exc:
            raise StorageError(f"{self.uri.child(key)}: {exc.strerror or exc}", key=key) from exc

    @staticmethod
    def _copy(src: Path, key: str, dest: Path) -> int:
        fd = open_regular(src, key)
        with os.fdopen(fd, "rb") as f, open(dest, "wb") as out:
            while chunk := f.read(DOWNLOAD_CHUNK):
                out.write(chunk)
        return dest.stat().st_size
