"""The registry in a private local directory: the embedded default, no server needed.

One JSON file per entry, replaced atomically (write to a temporary name, fsync, rename),
so a reader never sees half an entry and a crash never leaves one.
"""

from __future__ import annotations

import asyncio
import builtins  # the class's own ``list`` method shadows the type in its body
import json
import os
import tempfile
from pathlib import Path

from warmpool.config import private_dir
from warmpool.pool.registry.base import PoolEntry, Registry


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
        try:
            return PoolEntry.from_json(json.loads(self._path(key).read_text()))
        except FileNotFoundError:
            return None

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
            try:
                entries.append(PoolEntry.from_json(json.loads(path.read_text())))
            except FileNotFoundError:
                continue  # deleted between glob and read
        return entries



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
