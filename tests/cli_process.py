"""``warmpool serve`` and ``warmpool relay`` as real processes for the tests: their JSON
log lines in a file, waited for by event name; all killed at teardown."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.poll import DEADLINE_S, poll


class CliProcess:
    """One ``warmpool <command> ...`` process; its stderr (JSON log lines) in ``log``."""

    def __init__(self, log: Path, command: str, *args: str,
                 env: dict[str, str] | None = None, max_files: int | None = None) -> None:
        """``max_files``: the child's open-file limit (``ulimit -n``), as a small
        container might set it."""
        self.log = log
        self.command = command

        def limit() -> None:
            if max_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "warmpool.cli", command, *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                env={**os.environ, **(env or {})},
                preexec_fn=limit if max_files is not None else None)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == name]

    def event(self, name: str) -> dict[str, Any] | None:
        found = self.events(name)
        return found[0] if found else None

    def wait_event(self, name: str, timeout: float = DEADLINE_S) -> dict[str, Any]:
        def seen() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                pytest.fail(f"warmpool {self.command} exited with {self.proc.returncode}:\n"
                            + self.text()[-3000:])
            return self.event(name)

        return dict(poll(seen, f"a {name!r} log line from warmpool {self.command}", timeout))

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Relay(CliProcess):
    def __init__(self, log: Path, *args: str, env: dict[str, str] | None = None,
                 max_files: int | None = None) -> None:
        super().__init__(log, "relay", *args, env=env, max_files=max_files)


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[Callable[..., Relay]]:
    """Start relays (``start(*args, env=..., ready="relay_listening")``); all are killed
    at teardown."""
    started: list[Relay] = []

    def start(*args: str, env: dict[str, str] | None = None,
              ready: str | None = None, max_files: int | None = None) -> Relay:
        relay = Relay(tmp_path / f"relay-{len(started)}.log", *args, env=env,
                      max_files=max_files)
        started.append(relay)
        if ready:
            relay.wait_event(ready)
        return relay

    yield start
    for relay in started:
        relay.kill()
