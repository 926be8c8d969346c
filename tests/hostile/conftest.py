"""Fixtures of the hostile cases: an S3 server to kill (the controller harness is
:mod:`tests.controller_harness`, a plugin of the whole suite)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import HOST, Server, _serve, _venv_tool


@pytest.fixture
def doomed_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """A moto S3 server of this test alone, to SIGKILL with :func:`kill_server` without
    taking the session's shared one down with it."""
    argv = _venv_tool("moto_server", "moto.server")
    with _serve("moto-doomed", lambda port: [*argv, "-H", HOST, "-p", str(port)],
                tmp_path / "moto") as srv:
        server = Server(srv.name, srv.endpoint, {
            "AWS_ENDPOINT_URL": srv.endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }, srv.pid, srv.log, unset=("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION",
                                    "AWS_ENDPOINT_URL_S3"))
        server.apply(monkeypatch)
        yield server


def kill_server(server: Server) -> None:
    """SIGKILL the server's whole process group (it runs in a session of its own)."""
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
