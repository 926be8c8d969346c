"""Fixtures that give each test its own pool: runtime dir, cache dir, and cleanup.

Every test gets private directories and the matching ``WARMPOOL_*`` variables, so
subprocesses it starts (a CLI call, a serving process) see the same pool; at teardown
every shared-memory segment of that pool is removed, whatever the test left.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from warmpool.config import Settings
from warmpool.pool.host import SHM_DIR, HostTier


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    runtime = tmp_path / "runtime"
    cache = tmp_path / "cache"
    monkeypatch.setenv("WARMPOOL_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("WARMPOOL_CACHE_DIR", str(cache))
    monkeypatch.delenv("WARMPOOL_HOST_CAPACITY", raising=False)
    monkeypatch.delenv("WARMPOOL_REDIS_URL", raising=False)
    yield Settings.load()
    if runtime.exists():
        HostTier(runtime).remove_all()


def segments_of(settings: Settings) -> list[str]:
    prefix = HostTier(settings.runtime_dir).prefix
    return sorted(p.name for p in SHM_DIR.glob(f"{prefix}*"))


def run_python(code: str, *, env: dict[str, str] | None = None, timeout: float = 120,
               argv: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (a separate serving process)."""
    return subprocess.run([sys.executable, "-c", code, *(argv or [])], capture_output=True,
                          text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "warmpool.cli", *args], capture_output=True,
                          text=True, timeout=timeout)
