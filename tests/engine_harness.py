"""The serving-engine harness of the tests: vLLM and SGLang, each in a virtualenv of its
own (``make vllm-venv``, ``make sglang-venv``; ``make test`` builds both), run as
subprocesses of a child script that starts several engines in a row and prints one
``RESULT {json}`` line per engine.

Shared by the vLLM, vLLM zero-copy, vLLM export and SGLang tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.servers import REPO, S3Backend, Server

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
VLLM_CHILD = REPO / "tests" / "vllm_child.py"
SGLANG_PYTHON = REPO / ".venv-sglang" / "bin" / "python"
SGLANG_CHILD = REPO / "tests" / "sglang_child.py"


@dataclass(frozen=True)
class Served:
    """Models written, put where the engines find them, and some warmed."""

    env: dict[str, str]
    uris: dict[str, str]  # name -> the model's URI
    files_dirs: dict[str, str]  # name -> metadata cache files directory
    local: dict[str, Path]  # name -> the model as written, weights included


def engine_python(python: Path, target: str) -> Path:
    """The engine's Python; a missing one fails (these tests are how CI knows the plugin
    works), saying which make target builds it."""
    if not python.exists():
        pytest.fail(f"{python} is missing: build the engine's test virtualenv with "
                    f"`make {target}` (make test does it first)", pytrace=False)
    return python


def vllm_python() -> Path:
    return engine_python(VLLM_PYTHON, "vllm-venv")


def sglang_python() -> Path:
    return engine_python(SGLANG_PYTHON, "sglang-venv")


def vllm_env(moto_server: Server, root: Path) -> dict[str, str]:
    """The environment of a vLLM child: the S3 test server, a pool of its own under
    ``root``, CPU settings for two ranks, nothing from the hub, no controller."""
    env = {**os.environ, **moto_server.env,
           "WARMPOOL_RUNTIME_DIR": str(root / "runtime"),
           "WARMPOOL_CACHE_DIR": str(root / "cache"),
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    for name in moto_server.unset:
        env.pop(name, None)
    env.pop("WARMPOOL_REDIS_URL", None)
    return env


def run(argv: list[str], env: dict[str, str], timeout: float) -> str:
    """Run ``argv`` to its end; its whole output, or a failure showing the output's tail."""
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=REPO)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{argv[:4]} exited {done.returncode}:\n{output[-6000:]}"
    return output


def upload(backend: S3Backend, local: Path, prefix: str) -> None:
    for path in sorted(local.iterdir()):
        backend.put(prefix + path.name, path.read_bytes())


def start_engines(python: Path, child: Path, served: Served, spec: list[dict[str, Any]],
                  timeout: float) -> tuple[dict[str, dict[str, Any]], str]:
    """Start one engine per spec entry in one process of the engine's Python: results by
    name, and the process's whole output (the engine's and the loader's log lines)."""
    output = run([str(python), str(child), "run", json.dumps(spec)], served.env, timeout)
    results = {}
    for line in output.splitlines():
        if line.startswith("RESULT "):
            item = json.loads(line[len("RESULT "):])
            results[item.pop("name")] = item
    assert set(results) == {s["name"] for s in spec}, output[-6000:]
    return results, output


def vllm_engines(served: Served, spec: list[dict[str, Any]],
                 timeout: float) -> tuple[dict[str, dict[str, Any]], str]:
    return start_engines(vllm_python(), VLLM_CHILD, served, spec, timeout)


def sglang_engines(served: Served, spec: list[dict[str, Any]],
                   timeout: float) -> tuple[dict[str, dict[str, Any]], str]:
    return start_engines(sglang_python(), SGLANG_CHILD, served, spec, timeout)


def log_lines(output: str, pattern: str) -> list[str]:
    """The lines of an engine's output that match ``pattern``."""
    return [line for line in output.splitlines() if re.search(pattern, line)]
