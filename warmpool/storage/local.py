"""The local filesystem behind the storage interface (``file://`` and plain paths).

The etag of a file is its inode, modification time (ns) and size: a rewrite changes it,
which is all the content hash needs, without reading gigabytes to hash them.
"""

from __future__ import annotations

import asyncio
import builtins  # the class's own ``list`` method shadows the type in its body
import os
import shutil
from pathlib import Path

from warmpool.errors import ObjectNotFoundError, StorageError, UnsafeKeyError
from warmpool.storage.base import ObjectInfo, Store, validate_relative_key


class LocalStore(Store):
    async def list(self) -> list[ObjectInfo]:
        root = self.uri.path
        if not root.is_dir():
            raise ObjectNotFoundError(f"{self.uri}: no such directory", key="")
        try:
            return await asyncio.to_thread(self._walk, root)
        except OSError as exc:  # a dangling link, a file we may not read, a vanished dir
            name = Path(exc.filename).name if exc.filename else ""
            raise StorageError(f"{self.uri}: cannot list {name or 'the directory'}: "
                               f"{exc.strerror or exc}", key=name or None) from exc

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
                # inode too: a file replaced by rename keeps neither its inode nor its etag
                found.append(ObjectInfo(key, st.st_size,
                                        f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"))
        return sorted(found)

    def _path(self, key: str) -> Path:
        return self.uri.path / validate_relative_key(key)

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        path = self._path(key)
        return await asyncio.to_thread(self._pread, path, key, start, length)

    async def read_into(self, key: str, start: int, out: memoryview) -> None:
        path = self._path(key)
        await asyncio.to_thread(self._preadinto, path, key, start, out)

    def _pread(self, path: Path, key: str, start: int, length: int) -> bytes:
        try:
            with open(path, "rb") as f:
                return os.pread(f.fileno(), length, start)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.uri.child(key)}: no such file", key=key) from None
        except OSError as exc:
            raise StorageError(f"{self.uri.child(key)}: {exc.strerror}", key=key) from exc

    def _preadinto(self, path: Path, key: str, start: int, out: memoryview) -> None:
        try:
            with open(path, "rb") as f:
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
        src = self._path(key)
        try:
            await asyncio.to_thread(shutil.copyfile, src, dest)
            return (await asyncio.to_thread(dest.stat)).st_size
        except FileNotFoundError:
            raise ObjectNotFoundError(f"{self.uri.child(key)}: no such file", key=key) from None
        except OSError as exc:
            raise StorageError(f"{self.uri.child(key)}: {exc.strerror or exc}", key=key) from exc
