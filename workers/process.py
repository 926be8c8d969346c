"""Process-level helpers shared by the worker and the supervisor entry points."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys


def fast_exit(code: int) -> None:
    """Exit without the interpreter's final garbage collection.

    With torch loaded that collection takes over a second, and a supervisor restarting a
    worker (or stopping them all) waits for it. Call it only once everything is released
    — buffers freed, records removed; only output still needs flushing.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` when our parent (the supervisor) dies.

    An orphaned worker would keep its device lock and socket, and the next supervisor's
    worker for that device would be refused until the orphan went away. Workers run in
    their own session (a terminal's Ctrl-C reaches only the supervisor, which stops them
    in order), so this is how they learn that the supervisor is gone.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)
