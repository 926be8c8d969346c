"""GPU benchmark: time to usable weights on cuda:0, warmpool against the alternatives.

Run on a machine with a GPU (the lent H100 here): every measurement is a fresh process,
the checkpoint is a generated Llama-3-8B-shaped one (291 bf16 tensors, ~16 GB, 4 shards)
in the page cache, and the table prints each method's seconds, GB/s and ratio against
``safetensors.torch.load_file(device="cuda")``.

    python bench/gpu.py [--preset llama-3-8b] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD_LOAD_FILE = """
import sys, time, json, glob
t0 = time.perf_counter()
import torch
from safetensors.torch import load_file
torch.cuda.init()
t1 = time.perf_counter()
n = 0
for f in sorted(glob.glob(sys.argv[1] + "/*.safetensors")):
    for t in load_file(f, device="cuda").values():
        n += t.numel() * t.element_size()
torch.cuda.synchronize()
print(json.dumps({"seconds": time.perf_counter() - t1, "bytes": n}))
"""

CHILD_RUNAI = """
import sys, time, json, glob, os
import torch
from runai_model_streamer import SafetensorsStreamer
torch.cuda.init()
t1 = time.perf_counter()
n = 0
out = {}
with SafetensorsStreamer() as s:
    s.stream_files(sorted(glob.glob(sys.argv[1] + "/*.safetensors")), device="cpu")
    for name, t in s.get_tensors():
        out[name] = t.to("cuda", non_blocking=False)
        n += t.numel() * t.element_size()
torch.cuda.synchronize()
print(json.dumps({"seconds": time.perf_counter() - t1, "bytes": n}))
"""

CHILD_ATTACH = """
import sys, time, json
t0 = time.perf_counter()
import torch
from warmpool import attach
if sys.argv[2] != "cpu":
    torch.empty(1, device=sys.argv[2])  # the engine's CUDA context exists before it attaches
t1 = time.perf_counter()
w = attach(sys.argv[1], device=sys.argv[2])
t2 = time.perf_counter()
x = sum(1 for _ in w.values())
first = next(iter(w.values()))
s = float(first.reshape(-1)[:1024].float().sum())  # a kernel actually reads the memory
torch.cuda.synchronize()
t3 = time.perf_counter()
print(json.dumps({"attach_s": t2 - t1, "usable_s": t3 - t1, "process_s": t3 - t0,
                  "transport": w.transport, "tensors": len(w), "bytes": w.layout.total_bytes}))
w.close()
"""


def child(code: str, *args: str, env: dict[str, str] | None = None) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data.setdefault("process_s", time.perf_counter() - start)
    return data


def cli(*args: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "warmpool.cli", *args, "--json"],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    data = json.loads(proc.stdout)
    data["process_s"] = time.perf_counter() - start
    return data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama-3-8b")
    parser.add_argument("--model", type=Path, help="use an existing checkpoint")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--transport", default="auto")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="wp-gpu-bench-"))
    os.environ["WARMPOOL_RUNTIME_DIR"] = str(work / "runtime")
    os.environ["WARMPOOL_CACHE_DIR"] = str(work / "cache")
    model = args.model
    if model is None:
        from warmpool.model.generate import PRESETS, generate_model

        model = work / "model"
        t = time.perf_counter()
        summary = generate_model(model, PRESETS[args.preset], shards=4)
        print(f"generated {summary['tensors']} tensors, {summary['bytes'] / 1e9:.1f} GB "
              f"in {time.perf_counter() - t:.0f} s", flush=True)
    rows: list[tuple[str, float, float, str]] = []

    def row(name: str, seconds: float, nbytes: int, note: str = "") -> None:
        rows.append((name, seconds, nbytes, note))
        rate = nbytes / seconds / 1e9 if seconds else 0
        print(f"{name:<52} {seconds:8.3f} s  {rate:7.2f} GB/s  {note}",
              flush=True)

    r = child(CHILD_LOAD_FILE, str(model))
    row("safetensors load_file(device='cuda')", r["seconds"], r["bytes"], "page cache")
    quick = bool(os.environ.get("BENCH_QUICK"))
    if not quick:
        r = child(CHILD_RUNAI, str(model))
        row("runai-model-streamer 0.17 (defaults) + .to('cuda')", r["seconds"], r["bytes"], "")
    r = child(CHILD_RUNAI, str(model), env={"RUNAI_STREAMER_FS_STRATEGY": "io_uring_buffered",
                                            "RUNAI_STREAMER_CONCURRENCY": "16"})
    row("runai-model-streamer (io_uring_buffered, 16) + .to('cuda')", r["seconds"], r["bytes"], "")

    supervisor = subprocess.Popen([sys.executable, "-m", "warmpool.cli", "workers", "start",
                                   "--devices", "cuda:0", "--transport", args.transport],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if subprocess.run([sys.executable, "-m", "warmpool.cli", "workers", "status", "--json"],
                              capture_output=True, text=True).returncode == 0:
                break
            time.sleep(1)
        warm = cli("prefetch", str(model), "--device", "cuda:0")
        row("warmpool prefetch --device cuda:0 (time to warm)", warm["seconds"], warm["bytes"],
            f"loader {warm.get('loader')}")
        a = child(CHILD_ATTACH, str(model), "cuda:0")
        row("warmpool attach cuda:0 (call → views; CUDA context already up)", a["attach_s"],
            a["bytes"], a["transport"])
        row("warmpool attach cuda:0 (call → first kernel done)", a["usable_s"], a["bytes"], "")
        row("warmpool attach cuda:0, whole fresh process", a["process_s"], a["bytes"],
            "python + torch import included")
        if quick:
            cli("evict", str(model), "--device", "cuda:0", "--force")
            r = cli("prefetch", str(model), "--device", "cuda:0", "--loader", "pread")
            row("warmpool prefetch --device cuda:0 --loader pread", r["seconds"], r["bytes"],
                "preadv → pinned staging → async H2D")
            v = cli("attach", str(model), "--device", "cuda:0", "--verify")
            print("pread on cuda:0 verified bit-exact:", v.get("verified"), flush=True)
            a = child(CHILD_ATTACH, str(model), "cuda:0")
            row("warmpool attach cuda:0 (call → views; CUDA context already up)",
                a["attach_s"], a["bytes"], a["transport"])
            return
        host = cli("prefetch", str(model))
        row("warmpool prefetch (host tier, shm)", host["seconds"], host["bytes"],
            host.get("loader", ""))
        for label in ("first: page-locks the segment", "again: segment stays locked"):
            cli("evict", str(model), "--device", "cuda:0", "--force")
            promo = cli("prefetch", str(model), "--device", "cuda:0")
            row(f"warmpool prefetch cuda:0 from the host tier ({label})", promo["seconds"],
                promo["bytes"], f"loader {promo.get('loader')}")
        a = child(CHILD_ATTACH, str(model), "cuda:0")
        row("warmpool attach cuda:0 again (call → views)", a["attach_s"], a["bytes"],
            a["transport"])
        for loader in ("native", "pread"):
            cli("evict", str(model), "--force")
            r = cli("prefetch", str(model), "--loader", loader)
            row(f"warmpool prefetch (host tier, --loader {loader})", r["seconds"], r["bytes"],
                "async ranged reads" if loader == "native" else "threads of preadv")
        cli("evict", str(model), "--device", "cuda:0", "--force")
        r = cli("prefetch", str(model), "--device", "cuda:0", "--loader", "pread")
        row("warmpool prefetch --device cuda:0 --loader pread", r["seconds"], r["bytes"],
            "preadv → pinned staging → async H2D")
        v = cli("attach", str(model), "--device", "cuda:0", "--verify")
        print("pread on cuda:0 verified bit-exact:", v.get("verified"), flush=True)
        h = child(CHILD_ATTACH.replace("torch.cuda.synchronize()", "pass"), str(model), "cpu")
        row("warmpool attach cpu (host tier, call → views)", h["attach_s"], h["bytes"], "shm")
    finally:
        supervisor.terminate()
        try:
            supervisor.wait(30)
        except subprocess.TimeoutExpired:
            supervisor.kill()
        print((supervisor.stdout.read() if supervisor.stdout else "")[-2000:])

    base = rows[0][1]
    import torch

    lines = [f"# GPU benchmark ({torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')})", "",
             f"Checkpoint: {model.name}, {rows[0][2] / 1e9:.2f} GB bf16, in the page cache. "
             "Each row is a fresh process.", "",
             "| method | seconds | GB/s | vs load_file | note |", "|---|---|---|---|---|"]
    for name, seconds, nbytes, note in rows:
        lines.append(f"| {name} | {seconds:.3f} | {nbytes / seconds / 1e9:.2f} | "
                     f"{base / seconds:.1f}x | {note} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(os.environ.get("OUT", args.out))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu-h100-{args.transport}.md").write_text(text)
    if args.model is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
