"""What a newcomer meets first: the demo's Makefile, the progress bar, the worker start,
and error messages that say what is wrong once, and what to do."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

import warmpool
from tests.models import write_model
from tests.pool_env import run_cli
from warmpool.cli import progress_bar, progress_factory
from warmpool.config import Settings
from warmpool.pool.host import HostTier

REPO = Path(__file__).resolve().parent.parent
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def test_progress_bar_prints_its_description_not_markup() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, markup=False, width=100)
    bar = progress_bar(console, enabled=True)
    with bar:
        advance = progress_factory(bar)(1000)
        advance(500)
    text = buffer.getvalue()
    assert "streaming" in text and "[progress" not in text


def test_an_incomplete_model_is_described_once(tmp_path: Path, settings: Settings) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tokenizer.json").write_text("{}")
    proc = run_cli("prefetch", str(tmp_path / "model"))
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert "missing config.json, *.safetensors" in line
    assert line.count("config.json") == 1 and "Traceback" not in proc.stderr


@NO_CUDA
def test_workers_on_a_missing_gpu_fail_once_and_say_why(settings: Settings) -> None:
    proc = run_cli("workers", "start", "--devices", "cuda:0", timeout=60)
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()  # one line: no traceback, no restart loop
    assert "cuda:0 requested but CUDA is not available" in line
    assert ("CPU-only build" in line if torch.version.cuda is None else "nvidia-smi" in line)
    assert "use device cpu" in line


def test_a_bare_worker_start_says_which_device_it_chose(settings: Settings) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "warmpool.cli", "workers", "start"],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    if torch.cuda.is_available():
        assert first.startswith("starting workers for cuda:0")
    else:
        assert first.startswith("starting workers for cpu:0 (no CUDA GPU visible")


def _make(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The repository's Makefile run in a scratch directory (its rm -rf stays there)."""
    return subprocess.run(["make", "--no-print-directory", "-f", str(REPO / "Makefile"),
                           "-C", str(tmp_path), *args], capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_clean_evicts_the_demo_segment(tmp_path: Path, settings: Settings) -> None:
    demo = tmp_path / "demo-model"
    write_model(demo, shards=1)
    warm = warmpool.prefetch(str(demo))
    assert HostTier(settings.runtime_dir).resident(warm.content_hash) is not None
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    command = venv / "bin" / "warmpool"
    command.write_text(f"#!/bin/sh\nexec {sys.executable} -m warmpool.cli \"$@\"\n")
    command.chmod(0o755)
    proc = _make(tmp_path, "clean", f"VENV={venv}", f"DEMO_DIR={demo}")
    assert proc.returncode == 0, proc.stderr
    assert HostTier(settings.runtime_dir).resident(warm.content_hash) is None
    assert not demo.exists() and not venv.exists()
    assert _make(tmp_path, "clean", f"VENV={venv}", f"DEMO_DIR={demo}").returncode == 0


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_installs_the_package_once_and_only_when_it_changed(tmp_path: Path) -> None:
    for name in ("pyproject.toml", "constraints.txt", "constraints-sglang.txt",
                 "package.json"):
        shutil.copy(REPO / name, tmp_path / name)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / ".torch").touch()
    vllm_venv, sglang_venv = tmp_path / "venv-vllm", tmp_path / "venv-sglang"
    args = ("-n", "test", f"VENV={venv}", f"VLLM_VENV={vllm_venv}",
            f"SGLANG_VENV={sglang_venv}")
    fresh = _make(tmp_path, *args)
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.count(f"{venv}/bin/pip install -q -e") == 1
    assert fresh.stdout.count(f"{sglang_venv}/bin/pip install -q --no-deps") == 1
    vllm_venv.mkdir()
    sglang_venv.mkdir()
    for stamp in (venv / ".installed", venv / ".installed-dev", vllm_venv / ".installed",
                  sglang_venv / ".installed"):
        stamp.touch()
    again = _make(tmp_path, *args)
    assert "pip install" not in again.stdout and "pytest" in again.stdout
