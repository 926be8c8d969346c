"""The one poll of the tests (and their fixtures): check until true, within a deadline.

Asynchronous tests have :func:`tests.controller_harness.wait_until`, which awaits its
check on the event loop; everything else polls with this."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

DEADLINE_S = 60.0


def poll(check: Callable[[], T], what: str = "condition", timeout: float = DEADLINE_S,
         interval: float = 0.05) -> T:
    """Call ``check`` until it returns something true, and return that; fail the test
    naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
