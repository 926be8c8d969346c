"""Leases on the host tier: a locked file per holder, released by close or by death.

A lease is ``<runtime>/leases/<entry key>/<pid>-<random>.lease`` with an exclusive
``flock`` held by the attaching process for as long as it uses the weights. The kernel
drops the lock when the process dies, even by SIGKILL, so a lease can never outlive its
holder; a file whose lock can be taken is a dead holder's and is swept. The directory's
``last`` file records when the model was last attached (least-recently-attached eviction).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import time
from pathlib import Path

from warmpool.config import private_dir
from warmpool.locks import try_lock
from warmpool.pool.registry.files import read_regular

log = logging.getLogger(__name__)


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except FileNotFoundError:
        return True  # gone since the glob: try_lock's own open tells


class Lease:
    """One holder's claim on one entry; keep it referenced while the tensors are in use."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def active(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:  # a forgotten lease still ends with its object
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            finally:
                os.close(fd)


class Leases:
    def __init__(self, runtime_dir: Path) -> None:
        self.root = private_dir(runtime_dir / "leases")

    def _dir(self, key: str) -> Path:
        return private_dir(self.root / key)

    def acquire(self, key: str, holder: str = "") -> Lease:
        directory = self._dir(key)
        name = f"{os.getpid()}-{secrets.token_hex(6)}"
        # Lock under a name the sweeper ignores, then rename: a sweeper must never find
        # the file between its creation and its lock and take it for a dead holder's.
        staging, path = directory / f"{name}.new", directory / f"{name}.lease"
        fd = try_lock(staging)
        if fd is None:  # a fresh random name cannot be locked by anyone else
            raise RuntimeError(f"could not lock new lease file {staging}")
        os.write(fd, json.dumps({"pid": os.getpid(), "holder": holder,
                                 "since": time.time()}).encode())
        os.rename(staging, path)
        (directory / "last").touch()
        return Lease(path, fd)

    def holders(self, key: str) -> list[dict[str, object]]:
        """The live holders of ``key``; files left by dead holders are removed."""
        directory = self.root / key
        if not directory.is_dir():
            return []
        live = []
        for path in directory.glob("*.lease"):
            if not _regular(path):
                # Not a file acquire() made: it proves no holder (a FIFO would also
                # block a reader), so it is neither counted nor opened.
                log.warning("removing %s: a lease is a regular file", path,
                            extra={"event": "bad_record", "record": str(path)})
                path.unlink(missing_ok=True)
                continue
            fd = try_lock(path)
            if fd is not None:  # nobody holds it: its holder is gone
                path.unlink(missing_ok=True)
                os.close(fd)
                continue
            try:
                live.append(json.loads(read_regular(path, 1 << 16) or b"{}"))
            except (OSError, ValueError, RecursionError):
                live.append({})
        return live

    def count(self, key: str) -> int:
        return len(self.holders(key))

    def held_hashes(self) -> set[str]:
        """Content hashes with at least one live holder, on any device."""
        return {d.name.split("@", 1)[0] for d in self.root.iterdir()
                if d.is_dir() and self.count(d.name)}

    def last_attached(self, key: str) -> float | None:
        try:
            return (self.root / key / "last").stat().st_mtime
        except FileNotFoundError:
            return None

    def forget(self, key: str) -> None:
        """Remove the records of an evicted entry (live holders keep their own mappings)."""
        directory = self.root / key
        if directory.is_dir():
            for path in directory.iterdir():
                path.unlink(missing_ok=True)
            directory.rmdir()
