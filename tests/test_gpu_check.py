"""`make gpu-check`'s dry mode: the harness a lent GPU runs, run here on cpu:0 so that it
cannot rot between GPUs. Every step that does not need CUDA must pass against a real
`cpu:0` worker (the same client, protocol and worker code as on a GPU), the CUDA-only
steps must say so, and the report must hold what the steps measured."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def bench_module(name: str) -> ModuleType:
    """A bench script imported as a module; its directory goes on ``sys.path`` first, as
    when it runs as a script (it imports its sibling ``report``)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def test_the_dry_check_runs_every_step_it_can_and_reports_them(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=480)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu-check-dry.json").read_text())
    prefix = report["segment_prefix"]  # this check's pool: other tests' run beside it
    assert prefix.startswith("warmpool-") and len(prefix) > len("warmpool-")
    assert not list(Path("/dev/shm").glob(f"{prefix}*")), "the check left segments"
    steps = {s["step"]: s for s in report["steps"]}
    check = bench_module("gpu_check")
    assert list(steps) == [s.name for s in check.STEPS]
    for step in check.STEPS:
        want = "skipped" if step.needs_cuda else "passed"
        assert steps[step.name]["status"] == want, steps[step.name]
    assert report["dry"] is True and report["device"] == "cpu:0"

    tests = steps["cuda-tests"]["figures"]  # collected and skipped: none ran, none failed
    assert tests["skipped"] > 0 and "passed" not in tests and "failed" not in tests
    layout = steps["engine-layout"]["figures"]
    assert layout["tensors"] > 0 and layout["transport"] == "shm-fd"
    loaded = steps["load-model"]["figures"]  # zero-copy: every parameter a worker view
    assert loaded["views"] == loaded["parameters"] > 0
    assert steps["exit-attached"]["figures"]["exit_code"] == 0
    profile = steps["attach-profile"]["figures"]
    assert 0 < profile["min_ms"] <= profile["median_ms"] <= profile["max_ms"]
    assert "attach" in profile["profile"]

    table = (tmp_path / "gpu-check-dry.md").read_text()
    for step in check.STEPS:
        assert f"| {step.name} | {steps[step.name]['status']} |" in table


def test_wheels_are_pinned_to_what_the_suite_ran_when_that_fits() -> None:
    wheels = bench_module("gpu_wheels")
    here = metadata.version("redis")
    assert wheels.pinned(Requirement("redis>=1")) == f"redis=={here}"
    assert wheels.pinned(Requirement("redis<1")) == "redis<1"  # ours does not fit: as written
    assert wheels.pinned(Requirement("no-such-package-x>=1")) == "no-such-package-x>=1"
    names = {r.name for r in wheels.requirements()}
    assert "runai-model-streamer" in names and not names & wheels.ON_DEVICE
