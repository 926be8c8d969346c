"""Every setting is checked where it is read: a bad value is one line naming it, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from warmpool.config import Settings


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "warmpool.cli", *args], capture_output=True,
                          check=False, text=True, timeout=120, env={**os.environ, **env})


@pytest.mark.parametrize("variable, value, args", [
    ("WARMPOOL_METRICS_PORT", "abc", ("status",)),
    ("WARMPOOL_METRICS_PORT", "70000", ("status",)),
    ("WARMPOOL_HOST_CAPACITY", "1e400", ("status",)),
    ("WARMPOOL_HOST_CAPACITY", "-1", ("status",)),
    ("WARMPOOL_HOST_CAPACITY", "nan", ("status",)),
    ("WARMPOOL_NODE", "a b", ("status",)),
    ("WARMPOOL_REDIS_URL", "localhost:6379", ("status",)),
    ("WARMPOOL_MAX_INFLIGHT", "0", ("serve",)),
    ("WARMPOOL_HEARTBEAT_S", "0", ("serve",)),
    ("WARMPOOL_LOCK_TTL_S", "inf", ("serve",)),
    ("WARMPOOL_LOADER", "fast", ("serve",)),
    # Finite but absurd: each once passed, then failed far from the setting.
    ("WARMPOOL_LOCK_TTL_S", "1e308", ("serve",)),
    ("WARMPOOL_MAX_INFLIGHT", "100000000000000000000", ("serve",)),
    ("WARMPOOL_HISTORY_KEEP_S", "1e300", ("serve",)),
    ("WARMPOOL_CACHE_MAX_AGE_S", "1e300", ("status",)),
    ("WARMPOOL_HOST_CAPACITY", "1e30", ("status",)),
    ("WARMPOOL_CACHE_MAX_MODELS", "1000000000000", ("status",)),
])
def test_a_bad_setting_is_one_line_naming_it(settings: Settings, variable: str, value: str,
                                             args: tuple[str, ...]) -> None:
    done = _cli({variable: value, "WARMPOOL_METRICS_PORT": "-1"} if variable !=
                "WARMPOOL_METRICS_PORT" else {variable: value}, *args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and variable in lines[0], done.stderr


def test_config_file_values_are_checked_and_named(settings: Settings, tmp_path) -> None:
    config = tmp_path / "w.toml"
    config.write_text('concurrency = 0\n')
    done = _cli({"WARMPOOL_CONFIG": str(config)}, "status")
    assert done.returncode == 2 and "concurrency in" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_fifo_as_config_file_is_refused(settings: Settings, tmp_path) -> None:
    fifo = tmp_path / "w.toml"
    os.mkfifo(fifo)
    done = _cli({"WARMPOOL_CONFIG": str(fifo)}, "status")
    assert done.returncode == 2 and "not a regular file" in done.stderr, done.stderr
