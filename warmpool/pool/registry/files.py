"""The registry in a private local directory: the embedded default, no server needed.

One JSON file per entry, replaced atomically (write to a temporary name, fsync, rename),
so a reader never sees half an entry and a crash never leaves one.
"""

from __future__ import annotations

import asyncio
import builtins  # the class's own ``list`` method shadows the type in its body
import json
import logging
import os
import stat
import tempfile
from pathlib import Path

from warmpool.config import private_dir
from warmpool.pool.registry.base import PoolEntry, Registry, parse_entry

log = logging.getLogger(__name__)


class FileRegistry(Registry):
    def __init__(self, root: Path) -> None:
        self.root = private_dir(root / "entries")

    def _path(self, key: str) -> Path:
        # keys are "<sha256>@<device>"; devices hold ':' which is fine in file names
        if "/" in key or key.startswith("."):
            raise ValueError(f"bad entry key {key!r}")
        return self.root / f"{key}.json"

    async def get(self, key: str) -> PoolEntry | None:
        return self.get_sync(key)

    def get_sync(self, key: str) -> PoolEntry | None:
        """The entry of ``key``; a corrupt or non-regular file is reported and read as
        absent (the next write replaces it)."""
        path = self._path(key)
        try:
            raw = read_regular(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("skipping bad pool entry %s: %s", path, exc,
                        extra={"event": "bad_record", "record": str(path)})
            return None
        return parse_entry(raw, str(path))

    async def put(self, entry: PoolEntry) -> None:
        # fsync can take a disk's worth of latency: never on the loop (a worker's loop
        # also answers attach requests)
        await asyncio.to_thread(self.put_sync, entry)

    def put_sync(self, entry: PoolEntry) -> None:
        data = json.dumps(entry.to_json(), indent=1).encode()
        atomic_write(self._path(entry.key), data)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)

    async def list(self) -> list[PoolEntry]:
        return self.list_sync()

    def list_sync(self) -> builtins.list[PoolEntry]:
        entries = []
        for path in sorted(self.root.glob("*.json")):
            entry = self.get_sync(path.name.removesuffix(".json"))
            if entry is not None:  # None: deleted since the glob, or bad (logged)
                entries.append(entry)
        return entries



#: An entry is a few hundred bytes; a file far larger is not one of ours.
MAX_RECORD_BYTES = 256 << 20


def read_regular(path: Path, limit: int = MAX_RECORD_BYTES) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes.

    Opened without following a link and without blocking, then checked on the open
    descriptor: a FIFO planted under a record's name would otherwise block the reader
    (``status``, ``attach``) for ever, and a device could feed it endless bytes.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{path} is {st.st_size} bytes, over {limit}")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise ValueError(f"{path} grew past {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
