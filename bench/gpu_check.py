"""The GPU tier in one prepared call: every GPU check, each bounded, one report.

A lent GPU comes bare and for minutes: this script spends them measuring. It installs the
wheels that ``make gpu-wheels`` carried (no network), then runs each step in a fresh
process under its own time bound, all inside eight minutes, and writes one report, a
markdown table and a JSON file, under ``$OUT`` (else ``bench/results/``):

    make gpu-check                      # on the GPU machine (python bench/gpu_check.py)
    python bench/gpu_check.py --dry     # here: cpu:0 workers stand in for cuda:0

The dry mode runs every step that does not need CUDA against a ``cpu:0`` worker (the
same client, protocol and worker code; shared memory in place of CUDA memory) and reports
the CUDA-only ones as skipped; the suite runs it (tests/test_gpu_check.py), so the harness
cannot rot between lent GPUs. A step that fails or times out is reported with the tail
of its output, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from report import write_report  # bench/report.py: bench/ is first on sys.path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 8 * 60  # the whole check, installs excluded
#: The requirements of the steps, installed from the carried wheels (the device's own
#: Python has torch and transformers, which stay as they are).
REQUIREMENTS = ROOT / "bench" / "gpu-requirements.txt"
PROMPT = [[1, 17, 42, 99, 5, 250, 3, 77]]


@dataclass
class Step:
    name: str
    seconds: float  # its own bound
    needs_cuda: bool  # skipped in the dry mode
    workers: bool  # runs against the check's worker on the device
    what: str  # one line for the report


@dataclass
class Outcome:
    step: str
    status: str  # passed | failed | timed out | skipped
    seconds: float
    figures: dict[str, Any] = field(default_factory=dict)
    detail: str = ""


STEPS = [
    Step("cuda-tests", 100, False, False, "pytest -m cuda (GPU tier, engine-layout export)"),
    Step("engine-layout", 40, False, True,
         "transformers model exported into the worker, attached back as views"),
    Step("load-model", 30, False, True,
         "load_model(device=D) from the worker: logits equal from_pretrained's on D"),
    Step("exit-attached", 25, False, True,
         "a process exits holding attachments: exit 0, no 'terminate called'"),
    Step("generate", 110, True, False, "the 16 GB Llama-3-8B-shaped checkpoint, once"),
    Step("attach-profile", 50, False, True,
         "attach in one process, 20 times, and a cProfile of one"),
    Step("arena-promotion", 45, False, True,
         "promotion from the host arena, twice: the arena page-locked once, not per model"),
    Step("bench-gpu", 200, True, False, "bench/gpu.py on the 16 GB checkpoint"),
]


# --- the steps (each runs in a child process: `--step NAME`) -----------------------------

def _cli(*args: str, timeout: float = 300) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "warmpool.cli", *args, "--json"],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"warmpool {' '.join(args)}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def _torch_device(device: str) -> str:
    """Where a plain torch model lives beside a worker on ``device`` (cpu:N is the host)."""
    return "cpu" if device.startswith("cpu") else device


def _tiny_llama(work: Path) -> Path:
    """A random 2-layer bf16 Llama saved by transformers (written once per check)."""
    from tests.tiny_llama import write_tiny_llama

    path = work / "tiny-llama"
    if not (path / "config.json").exists():
        write_tiny_llama(path, seed=1234)
    return path


def _logits(model: Any, device: str) -> Any:
    import torch

    with torch.no_grad():
        return model(torch.tensor(PROMPT, device=_torch_device(device))).logits.float().cpu()


def step_cuda_tests(device: str, work: Path) -> dict[str, Any]:
    files = ["tests/test_gpu_tier.py", "tests/test_engine_layout_worker.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs",
                           "-p", "no:cacheprovider", f"--basetemp={work / 'pytest'}", *files],
                          cwd=ROOT, capture_output=True, text=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {word: int(n) for n, word in
              (part.split()[:2] for part in summary.strip("= ").split(" in ")[0].split(", ")
               if part.split()[:1] and part.split()[0].isdigit())}
    if proc.returncode:
        raise RuntimeError(f"pytest -m cuda exited {proc.returncode}:\n{proc.stdout[-3000:]}"
                           f"{proc.stderr[-1000:]}")
    if device.startswith("cuda") and counts.get("passed", 0) == 0:
        raise RuntimeError(f"no CUDA test ran on a CUDA machine: {summary}")
    return {"summary": summary, **counts}


def step_engine_layout(device: str, work: Path) -> dict[str, Any]:
    """The device-to-device export written blind: a transformers model's parameters into
    the worker's allocation, attached back as views that a fresh model runs on."""
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    from tests.workers_env import same_bits  # the suite's own bit-for-bit comparison
    from warmpool.config import Settings
    from warmpool.engine_layouts import attach_engine_layout, export_sync
    from warmpool.pool.engine_key import EngineKey

    settings = Settings.load()
    src = _tiny_llama(work)
    warm = _cli("prefetch", str(src))  # the checkpoint's content hash names the layout
    model = LlamaForCausalLM.from_pretrained(src).eval().to(_torch_device(device))
    want = _logits(model, device)
    params = dict(model.named_parameters())
    key = EngineKey(checkpoint=warm["content_hash"], engine="transformers",
                    engine_version=f"{transformers.__version__}/{device.split(':')[0]}",
                    dtype="bfloat16")
    t0 = time.perf_counter()
    result = export_sync(key, params.items(), checkpoint_uri=warm["uri"], settings=settings,
                         device=device)
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    attached = attach_engine_layout(key, settings, holder="gpu-check", device=device)
    attach_ms = (time.perf_counter() - t0) * 1e3
    if attached is None:
        raise RuntimeError(f"the export of {key} is not attachable from {device}")
    with attached:
        first = attached.layout.slots[0]
        start = attached[first.name].data_ptr() - first.offset
        end = start + attached.layout.total_bytes
        for name, tensor in params.items():
            view = attached[name]
            if not same_bits(view, tensor):
                raise RuntimeError(f"{name}: the exported bytes differ from the model's")
            if view.numel() and not start <= view.data_ptr() < end:
                raise RuntimeError(f"{name}: not a view of the worker's allocation")
        # Built for real (its rotary buffers are computed, not loaded), then every
        # parameter replaced by the attached view: the way an engine would use them.
        fresh = LlamaForCausalLM(model.config).to(_torch_device(device))
        fresh.load_state_dict(dict(attached.items()), assign=True, strict=False)
        fresh.tie_weights()
        placed = sum(1 for n, p in fresh.named_parameters() if n in attached
                     and p.data_ptr() == attached[n].data_ptr())
        if placed != len(params):
            raise RuntimeError(f"{placed} of {len(params)} parameters are views of the export")
        got = _logits(fresh.eval(), device)
        if not torch.equal(got, want):
            raise RuntimeError(f"logits differ by {float((got - want).abs().max())}")
        transport = attached.transport
    return {"export_s": round(export_s, 4), "attach_ms": round(attach_ms, 2),
            "tensors": len(params), "bytes": attached.layout.total_bytes,
            "transport": transport, "already_warm": result.already_warm}


def step_load_model(device: str, work: Path) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    from warmpool.integrations.transformers import attachment_of, load_model, release

    src = _tiny_llama(work)
    _cli("prefetch", str(src), "--device", device)
    t0 = time.perf_counter()
    model = load_model(str(src), device=device)
    load_ms = (time.perf_counter() - t0) * 1e3
    weights = attachment_of(model)
    if weights is None or weights.device != device:
        raise RuntimeError(f"load_model did not attach the tier on {device}: {weights}")
    shared = {t.data_ptr() for t in weights.values()}
    views = sum(1 for p in model.parameters() if p.data_ptr() in shared)
    got = _logits(model, device)
    want = _logits(LlamaForCausalLM.from_pretrained(src).eval().to(_torch_device(device)),
                   device)
    if not torch.equal(got, want):
        raise RuntimeError(f"logits differ by {float((got - want).abs().max())}")
    transport = weights.transport
    release(model)
    return {"load_ms": round(load_ms, 2), "parameters": len(list(model.parameters())),
            "views": views, "transport": transport}


CHILD_EXIT = """
import sys
from warmpool import attach
from warmpool.integrations.transformers import load_model
held = [attach(sys.argv[1], device=sys.argv[2]), load_model(sys.argv[1], device=sys.argv[2])]
print("attached", flush=True)
sys.exit(0)
"""


def step_exit_attached(device: str, work: Path) -> dict[str, Any]:
    src = _tiny_llama(work)
    _cli("prefetch", str(src), "--device", device)
    proc = subprocess.run([sys.executable, "-c", CHILD_EXIT, str(src), device],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode or "attached" not in proc.stdout or "terminate called" in proc.stderr:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
    # The worker saw both leases end with the process: nothing stays leased.
    deadline = time.monotonic() + 10
    while True:
        leases = sum(r["leases"] for w in _cli("workers", "status") if w.get("device") == device
                     for r in w.get("residents", []))
        if leases == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if leases:
        raise RuntimeError(f"{leases} leases outlived the process that held them")
    return {"exit_code": proc.returncode, "stderr_lines": len(proc.stderr.splitlines())}


def _big_model(work: Path, dry: bool) -> Path:
    return work / ("small-model" if dry else "llama-3-8b")


def step_generate(device: str, work: Path) -> dict[str, Any]:
    from warmpool.model.generate import PRESETS, generate_model

    summary = generate_model(_big_model(work, False), PRESETS["llama-3-8b"], shards=4)
    return {"bytes": summary["bytes"], "tensors": summary["tensors"]}


PROFILE = """
import cProfile, io, json, pstats, statistics, sys, time
import torch
from warmpool import attach

if sys.argv[2].startswith("cuda"):
    torch.empty(1, device=sys.argv[2])  # a serving process has its CUDA context already
times = []
for _ in range(20):
    t0 = time.perf_counter()
    w = attach(sys.argv[1], device=sys.argv[2])
    times.append((time.perf_counter() - t0) * 1e3)
    w.close()
profile = cProfile.Profile()
profile.enable()
w = attach(sys.argv[1], device=sys.argv[2])
profile.disable()
text = io.StringIO()
pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(12)
print(json.dumps({"first_ms": round(times[0], 3), "median_ms": round(statistics.median(times), 3),
                  "min_ms": round(min(times), 3), "max_ms": round(max(times), 3),
                  "bytes": w.layout.total_bytes, "tensors": len(w), "transport": w.transport,
                  "profile": text.getvalue()[-4000:]}))
w.close()
"""


def _model_for(device: str, work: Path) -> Path:
    """The 16 GB checkpoint (the generate step's); in the dry mode a small one of the
    same shape, made by whichever step asks first."""
    model = _big_model(work, device.startswith("cpu"))
    if device.startswith("cpu") and not model.exists():
        from warmpool.model.generate import PRESETS, generate_model

        generate_model(model, PRESETS["tiny"], shards=2)
    return model


def step_attach_profile(device: str, work: Path) -> dict[str, Any]:
    model = _model_for(device, work)
    warm = _cli("prefetch", str(model), "--device", device)
    proc = subprocess.run([sys.executable, "-c", PROFILE, str(model), device],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    figures["prefetch_s"] = warm["seconds"]
    _cli("evict", str(model), "--device", device, "--force")  # room for bench/gpu.py
    return figures


def step_arena_promotion(device: str, work: Path) -> dict[str, Any]:
    """Warm the model into the host arena, promote it to the device, evict it there,
    promote it again: the second copy runs from pages the worker locked once for the
    whole arena (docs/performance.md: the goal is 50 GB/s on an H100's Gen5 link)."""
    model = _model_for(device, work)
    os.environ["WARMPOOL_HOST_ARENA"] = "true"  # for the CLI children: the host fill
    host = _cli("prefetch", str(model))
    figures: dict[str, Any] = {"bytes": host["bytes"], "host_fill_s": host["seconds"]}
    try:
        for attempt in ("first", "second"):
            promoted = _cli("prefetch", str(model), "--device", device)
            if promoted.get("loader") != "host":
                raise RuntimeError(f"the {attempt} promotion did not come from the host "
                                   f"tier: {promoted}")
            figures[f"{attempt}_s"] = promoted["seconds"]
            figures[f"{attempt}_gbps"] = round(host["bytes"] / promoted["seconds"] / 1e9, 2)
            _cli("evict", str(model), "--device", device, "--force")
    finally:
        _cli("evict", str(model), "--force")
        figures["trimmed"] = subprocess.run(
            [sys.executable, "-m", "warmpool.cli", "trim", "--json"], capture_output=True,
            text=True, timeout=60).returncode == 0
    return figures


def step_bench_gpu(device: str, work: Path) -> dict[str, Any]:
    out = work / "bench-gpu"
    # With under three minutes left (its full run is not timed on a GPU yet), the quick
    # rows (load_file, runai tuned, prefetch, attach, pread) still give the ratios.
    quick = {"BENCH_QUICK": "1"} if float(os.environ.get("GPU_CHECK_LEFT_S", "0")) < 180 else {}
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--model", str(_big_model(work, False)),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OUT": str(out), **quick})
    if proc.returncode:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    tables = sorted(out.glob("*.md"))
    return {"table": tables[0].read_text() if tables else proc.stdout[-4000:]}


RUNNERS: dict[str, Callable[[str, Path], dict[str, Any]]] = {
    "cuda-tests": step_cuda_tests, "engine-layout": step_engine_layout,
    "load-model": step_load_model, "exit-attached": step_exit_attached,
    "generate": step_generate, "attach-profile": step_attach_profile,
    "arena-promotion": step_arena_promotion, "bench-gpu": step_bench_gpu,
}


# --- the parent: installs, workers, bounds, the report -----------------------------------

def install(wheels: Path, env_dir: Path) -> tuple[str, str]:
    """A private environment over the device's own Python (its torch and transformers
    stay), filled from the carried wheels with no index. Returns the python to run the
    steps with and a directory to put on their PYTHONPATH ("" for none).

    A virtualenv that sees the device's site-packages through a ``.pth`` file (not
    ``--system-site-packages``: when that Python is itself a virtualenv, the flag would
    show the base interpreter's packages instead of its own), so pip installs only what is
    missing. Without ``ensurepip`` there, the wheels go into a directory of their own."""
    if not any(wheels.glob("*.whl")):
        raise SystemExit(f"no wheels in {wheels}: run `make gpu-wheels` before the device call")
    import site
    import sysconfig

    theirs = [p for p in (*site.getsitepackages(), sysconfig.get_paths()["purelib"])
              if Path(p).is_dir()]
    made = subprocess.run([sys.executable, "-m", "venv", str(env_dir)], capture_output=True,
                          text=True)
    python = env_dir / "bin" / "python"
    if made.returncode == 0:
        purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                                  "print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        (Path(purelib) / "_device_site.pth").write_text("\n".join(dict.fromkeys(theirs)) + "\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index",
                        "--disable-pip-version-check", "--find-links", str(wheels),
                        "-r", str(REQUIREMENTS)], check=True)
        return str(python), ""
    print(f"no virtualenv here ({made.stderr.strip()[-200:]}): installing into a directory",
          flush=True)
    target = env_dir / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--disable-pip-version-check", "--target", str(target),
                    *map(str, sorted(wheels.glob("*.whl")))], check=True)
    return sys.executable, str(target)


def run_step(step: Step, python: str, device: str, work: Path, bound: float,
             env: dict[str, str]) -> Outcome:
    started = time.monotonic()
    proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--step", step.name,
                             "--device", device, "--work", str(work)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the step and whatever it started
        stdout, stderr = proc.communicate()
        return Outcome(step.name, "timed out", time.monotonic() - started,
                       detail=f"over its bound of {bound:.0f} s\n{stderr[-1500:]}")
    seconds = time.monotonic() - started
    lines = stdout.strip().splitlines()
    if proc.returncode or not lines:
        return Outcome(step.name, "failed", seconds, detail=(stdout + stderr)[-3000:])
    return Outcome(step.name, "passed", seconds, figures=json.loads(lines[-1]))


class Workers:
    """The check's own worker on the device, for the steps that talk to one."""

    def __init__(self, python: str, device: str, env: dict[str, str]) -> None:
        self.python, self.device, self.env = python, device, env
        self.proc: subprocess.Popen[str] | None = None
        self.log = ""

    def __enter__(self) -> Workers:
        transport = ["--transport", "cuda-vmm"] if self.device.startswith("cuda") else []
        self.proc = subprocess.Popen([self.python, "-m", "warmpool.cli", "workers", "start",
                                      "--devices", self.device, *transport],
                                     cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            probe = subprocess.run([self.python, "-m", "warmpool.cli", "workers", "status",
                                    "--json"], env=self.env, capture_output=True, text=True)
            if probe.returncode == 0 and any(w.get("ok") and w.get("device") == self.device
                                             for w in json.loads(probe.stdout or "[]")):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"the worker on {self.device} did not start:\n{self.log[-3000:]}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log = self.proc.stdout.read() if self.proc.stdout else ""
        self.proc = None


def environment(work: Path, extra_path: str = "") -> dict[str, str]:
    """The steps' environment: a pool private to this check, warmpool from this tree."""
    path = os.pathsep.join(p for p in (str(ROOT), extra_path, os.environ.get("PYTHONPATH"))
                           if p)
    return {**os.environ, "PYTHONPATH": path, "WARMPOOL_RUNTIME_DIR": str(work / "runtime"),
            "WARMPOOL_CACHE_DIR": str(work / "cache"), "WARMPOOL_NODE": "gpu-check"}


def check(*, dry: bool, python: str, device: str, work: Path, extra_path: str = "",
          only: list[str] | None = None) -> list[Outcome]:
    env = environment(work, extra_path)
    deadline = time.monotonic() + BUDGET_S
    outcomes: list[Outcome] = []
    workers: Workers | None = None
    try:
        for step in STEPS:
            if only and step.name not in only:
                continue
            if dry and step.needs_cuda:
                outcomes.append(Outcome(step.name, "skipped", 0.0, detail="needs CUDA"))
                continue
            left = deadline - time.monotonic()
            if left < 5:
                outcomes.append(Outcome(step.name, "skipped", 0.0, detail="no time left"))
                continue
            if step.workers and workers is None:
                workers = Workers(python, device, env).__enter__()
            if not step.workers and workers is not None:
                workers.__exit__()
                workers = None
            bound = min(step.seconds, left)
            outcome = run_step(step, python, device, work, bound,
                               {**env, "GPU_CHECK_LEFT_S": f"{bound:.0f}"})
            outcomes.append(outcome)
            print(f"{outcome.step:<15} {outcome.status:<9} {outcome.seconds:6.1f} s", flush=True)
    finally:
        if workers is not None:
            workers.__exit__()
    return outcomes


def _segment_prefix(work: Path) -> str:
    """The names of the host segments this check's pool makes (the test of the dry mode
    checks that none is left, without counting other pools' segments)."""
    from warmpool.pool.host import HostTier

    return HostTier(work / "runtime").prefix


def report(outcomes: list[Outcome], *, dry: bool, device: str, out: Path,
           work: Path) -> Path:
    """One markdown table and one JSON file of the same outcomes; returns the markdown."""
    import torch

    name = "gpu-check-dry" if dry else "gpu-check"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    meta = {"when": when, "host": socket.gethostname(), "gpu": gpu, "device": device,
            "dry": dry, "torch": torch.__version__, "python": sys.version.split()[0],
            "segment_prefix": _segment_prefix(work)}
    lines = [f"# GPU check{' (dry: cpu:0 in place of cuda:0)' if dry else ''}", "",
             f"{when}, {gpu}, torch {meta['torch']}, Python {meta['python']}, device "
             f"{device}.", "", "| step | status | seconds | what | figures |",
             "|---|---|---|---|---|"]
    whats = {s.name: s.what for s in STEPS}
    for o in outcomes:
        shown = {k: v for k, v in o.figures.items() if k not in ("profile", "table")}
        cell = ", ".join(f"{k} {v}" for k, v in shown.items()) or \
            next(iter(o.detail.splitlines()), "")
        lines.append(f"| {o.step} | {o.status} | {o.seconds:.1f} | {whats[o.step]} | "
                     f"{cell.replace('|', '/')} |")
    for o in outcomes:
        for label, text in (("details", o.detail), ("profile", o.figures.get("profile")),
                            ("table", o.figures.get("table"))):
            if text and o.status != "skipped":
                lines += ["", f"## {o.step}: {label}", "", "```", str(text).rstrip(), "```"]
    return write_report(out, name, lines, {**meta, "steps": [asdict(o) for o in outcomes]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true",
                        help="cpu:0 in place of cuda:0; the steps that need CUDA are skipped")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels",
                        help="install these wheels into a private virtualenv first")
    parser.add_argument("--only", default="", help="comma-separated step names")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:  # a child: one step, its figures as the last line
        print(json.dumps(RUNNERS[args.step](args.device, args.work)), flush=True)
        return
    device = "cpu:0" if args.dry else "cuda:0"
    default_out = ROOT / "bench" / ("out" if args.dry else "results")
    out = args.out or Path(os.environ.get("OUT") or default_out)
    work = Path(tempfile.mkdtemp(prefix="wp-gpu-check-"))
    python, extra = sys.executable, ""
    try:
        if not args.dry:
            python, extra = install(args.wheels, work / "env")
        outcomes = check(dry=args.dry, python=python, device=device, work=work,
                         extra_path=extra,
                         only=[s for s in args.only.split(",") if s] or None)
        md = report(outcomes, dry=args.dry, device=device, out=out, work=work)
    finally:
        # The host tier's segments live in /dev/shm, outside the work directory.
        subprocess.run([python, "-c", "import sys; from pathlib import Path; "
                        "from warmpool.pool.host import HostTier; "
                        "HostTier(Path(sys.argv[1])).remove_all()", str(work / "runtime")],
                       env=environment(work, extra), cwd=ROOT, check=False)
        shutil.rmtree(work, ignore_errors=True)
    print(md.read_text())
    print(f"report: {md} and {md.with_suffix('.json')}")
    sys.exit(0 if all(o.status in ("passed", "skipped") for o in outcomes) else 1)


if __name__ == "__main__":
    main()
