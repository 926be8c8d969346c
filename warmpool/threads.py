"""Threads and event loops: blocking work on a thread without outliving the caller, and
a coroutine run to its end from synchronous code.

``asyncio.to_thread`` has a trap for code that hands a thread memory it will free:
cancelling the awaiting task returns at once while the thread runs on. A stream that
fails (one read short) cancels its sibling reads and then unmaps the buffer they are
still copying into: a segmentation fault, not an exception. :func:`to_thread_joined`
keeps the rule "when this returns or raises, the thread is done".
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def to_thread_joined(fn: Callable[..., T], *args: Any,
                           on_cancel: Callable[[], None] | None = None, **kwargs: Any) -> T:
    """``await asyncio.to_thread(fn, ...)``, except that a cancellation first calls
    ``on_cancel`` (a loader's stop flag, so it ends within one piece) and then waits for
    ``fn`` to return before the cancellation propagates."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel()
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                continue  # cancelled again while waiting: the thread still holds the memory
            except Exception:  # noqa: BLE001 - its error is moot; we are cancelled
                break
        raise


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end from synchronous code: the Python API and an engine's
    synchronous loader. Inside a running event loop (a caller that forgot
    ``asyncio.to_thread``, or an engine with a loop of its own) it runs on a thread with
    a loop of its own rather than fail."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name="warmpool-run-sync")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
