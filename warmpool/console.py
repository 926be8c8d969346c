"""The terminal side of every ``warmpool`` command: two consoles (stdout, stderr) that
never pass an outside string's control characters to the terminal, and :func:`guard`,
which turns warmpool's errors into one line and an exit code. ``warmpool`` and its
sub-apps (``warmpool relay``, ``warmpool workers``) share them."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from warmpool.errors import ConfigError, InvalidURIError, WarmpoolError

T = TypeVar("T")

# No console markup by default: URIs, object keys and error messages are outside text, and
# "[s3]" in "pip install 'warmpool[s3]'" must print as it is. Styled lines opt in.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROL_IN_LINES = {c: v for c, v in _CONTROL.items() if c not in (0x09, 0x0A)}


class _Console(Console):
    """rich prints control characters as they are, and our lines carry paths, object keys
    and error messages from outside: an escape sequence in a directory name would move the
    cursor, recolour or retitle the terminal. Text is shown with them as ``\\xNN`` (tabs
    and line breaks kept: they move nothing but the line)."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(o.translate(_CONTROL_IN_LINES) if isinstance(o, str) else o
                        for o in objects), **kwargs)


# Hashes, paths and tables stay whole on one line in pipes and logs.
out = _Console(soft_wrap=True, width=None if sys.stdout.isatty() else 240, markup=False)
err = _Console(stderr=True, markup=False)


def fail(exc: BaseException) -> None:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False,
              soft_wrap=True)
    code = 2 if isinstance(exc, (InvalidURIError, ConfigError)) else 1
    raise typer.Exit(code)


def guard(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn our errors into one line and an exit code, keeping typer's signature."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except WarmpoolError as exc:
            fail(exc)
        except KeyboardInterrupt:
            err.print("[red]interrupted[/]", markup=True)
            raise typer.Exit(130) from None
        raise AssertionError("unreachable")

    return wrapper


def shown(text: str) -> str:
    """A value from the registry (anyone who can write Redis wrote it) as a terminal
    may print it: control characters (an escape sequence would move the cursor, recolour
    or retitle the terminal) shown as ``\\xNN``."""
    return text.translate(_CONTROL)
