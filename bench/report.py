"""What every benchmark shares: waiting for a condition, and writing its result as a
markdown table beside the raw numbers (``<out>/<name>.md`` and ``.json``).

The benchmarks run as scripts (``python bench/<name>.py``), so this is imported as a
sibling module: their directory is first on ``sys.path``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def wait(check: Callable[[], T], what: str, timeout: float = 300.0,
         interval: float = 0.01) -> T:
    """Poll ``check`` until it returns something true, and return that; a RuntimeError
    naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)


def write_report(out: Path | str, name: str, lines: list[str], data: Any) -> Path:
    """``lines`` as ``<out>/<name>.md`` and ``data`` as ``<out>/<name>.json``; the
    markdown file's path."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    markdown = directory / f"{name}.md"
    markdown.write_text("\n".join(lines) + "\n")
    (directory / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    return markdown
