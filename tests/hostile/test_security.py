"""Another user on the node: no socket, segment, lease or record of ours is theirs to
reach, and a runtime directory they could have planted is refused.

The suite runs as root, so "another user" is a forked child that drops to ``nobody``
before it tries; it reports the errno of each attempt through a pipe.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.models import write_model
from tests.pool_env import run_cli, segments_of
from warmpool.config import Settings
from warmpool.controller.embedded_redis import EmbeddedRedis
from warmpool.errors import ConfigError, ProtocolError
from warmpool.pool.entries import Pool
from warmpool.pool.host import SHM_DIR
from warmpool.tiers.prefetch import prefetch
from warmpool.workers.protocol import check_peer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")


def as_nobody(attempts: dict[str, Callable[[], object]]) -> dict[str, str]:
    """Run each attempt in a child that became ``nobody``: what each one got."""
    nobody = pwd.getpwnam("nobody")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            got = {}
            for name, attempt in attempts.items():
                try:
                    attempt()
                    got[name] = "allowed"
                except OSError as exc:
                    got[name] = errno.errorcode.get(exc.errno or 0, str(exc))
                except Exception as exc:  # noqa: BLE001 - reported to the parent
                    got[name] = type(exc).__name__
            os.write(write, json.dumps(got).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return dict(json.loads(data))


@pytest.fixture
def embedded_redis(settings: Settings) -> Iterator[EmbeddedRedis]:
    redis = EmbeddedRedis(settings.runtime_dir)
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


async def test_another_user_reaches_nothing_of_ours(tmp_path: Path, settings: Settings,
                                                   embedded_redis: EmbeddedRedis) -> None:
    """The user gets: another local user can connect to none of our sockets (the
    embedded Redis), open no segment of a warm model, read no lease or record: every
    attempt is refused by the kernel (EACCES)."""
    write_model(tmp_path / "m", shards=1)
    await prefetch(str(tmp_path / "m"), settings=settings)
    [segment] = segments_of(settings)
    runtime = Path(settings.runtime_dir)

    def connect_redis() -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(embedded_redis.socket))

    got = as_nobody({
        "redis socket": connect_redis,
        "segment": lambda: os.close(os.open(SHM_DIR / segment, os.O_RDONLY)),
        "runtime dir": lambda: os.listdir(runtime),
        "leases": lambda: os.listdir(runtime / "leases"),
        "a record": lambda: os.listdir(runtime / "resident"),
    })
    assert got == dict.fromkeys(got, "EACCES"), got


def test_a_peer_of_another_uid_is_refused_on_a_worker_socket() -> None:
    """The user gets: even on a socket another user can reach (a loosened directory),
    a worker refuses the connection by the peer's uid (``SO_PEERCRED``)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as loose:
        os.chmod(loose, 0o777)
        path = os.path.join(loose, "w.sock")
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(path)
            os.chmod(path, 0o777)
            server.listen(1)

            def knock() -> None:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)

            assert as_nobody({"connect": knock}) == {"connect": "allowed"}
            conn, _ = server.accept()
            with conn, pytest.raises(ProtocolError, match="is not ours"):
                check_peer(conn)


def test_a_symlinked_runtime_dir_is_refused(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The user gets: a runtime directory that is a symlink (planted in /tmp by someone
    else, say) is refused with a ConfigError saying so; nothing is written through it."""
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o700)
    link = tmp_path / "warmpool-runtime"
    link.symlink_to(planted)
    settings = Settings(runtime_dir=link, cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match="symlink"):
        Pool(settings)
    monkeypatch.setenv("WARMPOOL_RUNTIME_DIR", str(link))
    result = run_cli("status")
    assert result.returncode != 0
    assert "symlink" in result.stderr and "Traceback" not in result.stderr
    assert list(planted.iterdir()) == []
