"""Advisory file locks (``flock``) that the kernel drops when their holder dies.

Every cross-process rule in warmpool rests on these: one prefetch per (model, device),
eviction against attach, leases that end when the holder is killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path


def try_lock(path: Path, exclusive: bool = True) -> int | None:
    """Take the lock without waiting: an open fd holding it, or None if someone else has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextmanager
def file_lock(path: Path, exclusive: bool = True) -> Iterator[int]:
    """Hold ``path``'s lock for the block, waiting for it if need be."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield fd
    finally:
        os.close(fd)  # closing the last fd of the open file description unlocks it


@asynccontextmanager
async def async_file_lock(path: Path, exclusive: bool = True) -> AsyncIterator[int]:
    """:func:`file_lock` for coroutines: the wait happens in a thread, not on the loop.

    A cancelled waiter must not close the fd under the thread still blocked in
    ``flock`` on it: the thread is left to finish, and the fd (with the lock it may
    then hold) is closed by the callback that sees it finish.
    """
    fd = await asyncio.to_thread(os.open, path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    waiting = asyncio.ensure_future(
        asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH))
    try:
        await asyncio.shield(waiting)
    except BaseException:
        waiting.add_done_callback(lambda _: os.close(fd))
        raise
    try:
        yield fd
    finally:
        os.close(fd)  # closing the last fd of the open file description unlocks it

def is_locked(path: Path) -> bool:
    """True while some process holds ``path``'s lock (a fill or eviction in progress)."""
    fd = try_lock(path)
    if fd is None:
        return True
    os.close(fd)
    return False
