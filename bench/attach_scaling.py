"""Does attach stay flat as the model grows? Attach time against bytes and tensor count.

The promise is "milliseconds, whatever the size": attach maps one segment and builds one
view per tensor, so its cost should follow the number of tensors, not the bytes. This
script measures both axes on the host tier, each attach in a fresh process (torch already
imported, as in a serving engine), and prints a table:

    python bench/attach_scaling.py                      # 0.25, 1, 4 GB x 128 tensors; 1 GB x 32..2048
    python bench/attach_scaling.py --sizes 0.5,2 --counts 64,512 --reps 7

Models are generated (zeros: attach never reads the bytes, and the pool is private to
the run), warmed with ``warmpool.pool.prefetch`` and evicted afterwards. Results go to
``bench/results/attach_scaling-<name>.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
import torch  # a serving process has it loaded before it attaches
from warmpool import attach
t0 = time.perf_counter()
model = attach(sys.argv[1])
t1 = time.perf_counter()
count = len(model.tensors)
model.close()
print(json.dumps({"ms": (t1 - t0) * 1e3, "tensors": count}))
"""


def write_model(directory: Path, total_bytes: int, tensors: int) -> None:
    """``tensors`` bf16 tensors of equal size adding up to about ``total_bytes``, in
    shards of at most 2 GB (as checkpoints are written)."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    numel = max(1, total_bytes // tensors // 2)
    per_shard = max(1, min(tensors, (2 << 30) // (numel * 2)))
    shards = -(-tensors // per_shard)
    for s in range(shards):
        names = range(s * per_shard, min(tensors, (s + 1) * per_shard))
        save_file({f"layers.{i}.weight": torch.zeros(numel, dtype=torch.bfloat16)
                   for i in names},
                  str(directory / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))


def measure(uri: str, reps: int, env: dict[str, str]) -> list[float]:
    times = []
    for _ in range(reps):
        out = subprocess.run([sys.executable, "-c", CHILD, uri], env=env, check=True,
                             capture_output=True, text=True)
        times.append(float(json.loads(out.stdout)["ms"]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.25,1,4", help="GB, at --base-count tensors")
    parser.add_argument("--base-count", type=int, default=128)
    parser.add_argument("--counts", default="32,128,512,2048", help="tensors, at 1 GB")
    parser.add_argument("--reps", type=int, default=5, help="fresh processes per row")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default=socket.gethostname() or "dev")
    args = parser.parse_args()

    rows = [(float(gb), args.base_count) for gb in args.sizes.split(",")]
    rows += [(1.0, int(n)) for n in args.counts.split(",") if (1.0, int(n)) not in rows]
    work = Path(tempfile.mkdtemp(prefix="warmpool-attach-", dir="/var/tmp"))
    env = {**os.environ, "WARMPOOL_RUNTIME_DIR": str(work / "runtime"),
           "WARMPOOL_CACHE_DIR": str(work / "cache")}
    env.pop("WARMPOOL_REDIS_URL", None)
    os.environ.update({k: env[k] for k in ("WARMPOOL_RUNTIME_DIR", "WARMPOOL_CACHE_DIR")})
    from warmpool.config import Settings
    from warmpool.pool.entries import Pool
    from warmpool.pool.prefetch import prefetch

    settings = Settings.load()
    results = []
    try:
        for gb, count in rows:
            model = work / f"m-{gb:g}gb-{count}"
            write_model(model, int(gb * 1e9), count)
            warm = asyncio.run(prefetch(str(model), settings=settings))
            times = measure(str(model), args.reps, env)
            asyncio.run(Pool(settings).evict(warm.entry.content_hash, force=True))
            shutil.rmtree(model)
            results.append({"gb": warm.entry.bytes / 1e9, "tensors": warm.entry.tensors,
                            "median_ms": statistics.median(times), "min_ms": min(times),
                            "max_ms": max(times), "reps": times})
            print(f"{warm.entry.bytes / 1e9:6.2f} GB {warm.entry.tensors:5d} tensors: "
                  f"attach {statistics.median(times):6.2f} ms (min {min(times):.2f}, "
                  f"max {max(times):.2f})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"# attach against model size and tensor count — {args.name}", "",
             f"Run {time.strftime('%Y-%m-%dT%H:%M:%S%z')} by `python bench/attach_scaling.py`"
             f" ({os.cpu_count()} CPUs). Each row: {args.reps} fresh processes (torch imported"
             " before the clock starts), median and range of the time from `attach()` to"
             " usable views on the host tier.", "",
             "| GB | tensors | attach (median) | min-max |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['gb']:.2f} | {r['tensors']} | {r['median_ms']:.2f} ms | "
              f"{r['min_ms']:.2f}-{r['max_ms']:.2f} ms |" for r in results]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"attach_scaling-{args.name}.md").write_text("\n".join(lines) + "\n")
    (out / f"attach_scaling-{args.name}.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
