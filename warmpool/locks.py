"""Advisory file locks (``flock``) that the kernel drops when their holder dies.

Every cross-process rule in warmpool rests on these: one prefetch per (model, device),
eviction against attach, leases that end when the holder is killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import weakref
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

    Coroutines of one process queue on an in-process :class:`asyncio.Lock` first, so at
    most one thread per lock file and event loop ever blocks in ``flock``, and only while
    another *process* holds the lock. Without it, waiters of one busy lock (every
    warm-up that ``reconcile`` starts at once waits for the pool lock) fill the default
    executor, and the holder, which needs a thread for its next step, never gets one.

    A cancelled waiter must not close the fd under the thread still blocked in
    ``flock`` on it: the thread is left to finish, and the fd (with the lock it may
    then hold) is closed by the callback that sees it finish.
    """
    async with _loop_lock(path):
        fd = await _locked_fd(path, exclusive)
        try:
            yield fd
        finally:
            os.close(fd)  # closing the last fd of the open file description unlocks it


#: Per event loop, per lock file: an asyncio lock binds to the loop that first uses it,
#: and the map goes with its loop.
_LOOP_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary())


def _loop_lock(path: Path) -> asyncio.Lock:
    locks = _LOOP_LOCKS.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault(os.path.abspath(path), asyncio.Lock())


def _open_locked(path: Path, exclusive: bool) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def _locked_fd(path: Path, exclusive: bool) -> int:
    """An fd holding ``path``'s lock, opened and waited for in one thread."""
    task = asyncio.ensure_future(asyncio.to_thread(_open_locked, path, exclusive))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # The thread cannot be interrupted; when it gets the lock, drop it at once, or
        # the fd would hold the lock until this process exits.
        task.add_done_callback(
            lambda t: os.close(t.result()) if not t.cancelled() and not t.exception() else None)
        raise


def is_locked(path: Path) -> bool:
    """True while some process holds ``path``'s lock (a fill or eviction in progress)."""
    fd = try_lock(path)
    if fd is None:
        return True
    os.close(fd)
    return False
