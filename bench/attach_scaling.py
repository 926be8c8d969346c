"""Does attach stay flat as the model grows? Attach time against bytes and tensor count.

The promise is "milliseconds, whatever the size": attach maps one segment and builds one
view per tensor, so its cost should follow the number of tensors, not the bytes. This
script measures both axes on the host tier, each attach in a fresh process (torch already
imported, as in a serving engine), and prints a table:

    python bench/attach_scaling.py  # 0.25, 1, 4 GB x 128 tensors; 1 GB x 32..100,000
    python bench/attach_scaling.py --sizes 0.5,2 --counts 64,512 --reps 7
    python bench/attach_scaling.py --baseline /work/main  # the same rows with another checkout
    python bench/attach_scaling.py --chunked 16  # 16 GB: one segment against arena chunks

Besides attach (the mapping and the names ready), each child times the first view and
then building every view, so a lazy attach cannot hide a slow first access. With
``--baseline DIR`` every row is also warmed and attached by the code in DIR (its own
runtime directory, fresh processes interleaved with ours), for ratios from one run.

Models are generated (zeros: attach never reads the bytes, and the pool is private to
the run), warmed with ``warmpool.tiers.prefetch`` and evicted afterwards. Results go to
``bench/results/attach_scaling-<name>.md``.

``--chunked GB`` measures what the host arena adds to attach instead: one model of that
size as a segment of its own, as 64 MiB arena chunks in one run (consecutive), and as
the same number of chunks scattered (none adjacent, in reverse order: one ``mmap`` each,
the worst case). Those models are *planted*: their records, layout index and a sparse
segment or arena file are written directly, no byte filled, since attach touches no page
and a 16 GB fill would only measure the fill. Results: ``attach_chunks-<name>.md``.
"""

from __future__ import annotations

import argparse
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

from report import write_report  # bench/report.py: bench/ is first on sys.path

CHILD = """
import json, sys, time
import torch  # a serving process has it loaded before it attaches
from warmpool import attach
c0, t0 = time.process_time(), time.perf_counter()
model = attach(sys.argv[1])
t1, c1 = time.perf_counter(), time.process_time()
names = list(model)
first = model[names[len(names) // 2]]
t2 = time.perf_counter()
tensors = model.tensors
if hasattr(tensors, "materialize"):
    views = tensors.materialize()
else:  # a checkout whose attach builds every view up front
    views = dict(tensors)
t3 = time.perf_counter()
# The floor: one bare as_strided per tensor (what any view costs), in the same process.
import gc
gc.disable()
whole = torch.zeros(1024, dtype=torch.uint8)
t4 = time.perf_counter()
floor = [whole.as_strided((4, 2), (2, 1), i % 512) for i in range(len(names))]
t5 = time.perf_counter()
gc.enable()
count = len(model.tensors)
model.close()
print(json.dumps({"ms": (t1 - t0) * 1e3, "cpu_ms": (c1 - c0) * 1e3, "first_ms": (t2 - t1) * 1e3,
                  "all_ms": (t3 - t2) * 1e3, "floor_ms": (t5 - t4) * 1e3, "tensors": count}))
"""

WARM = """
import asyncio, json, sys
from warmpool.config import Settings
from warmpool.tiers.prefetch import prefetch
warm = asyncio.run(prefetch(sys.argv[1], settings=Settings.load(), loader="native"))
print(json.dumps({"hash": warm.entry.content_hash, "bytes": warm.entry.bytes,
                  "tensors": warm.entry.tensors}))
"""

EVICT = """
import asyncio, sys
from warmpool.config import Settings
from warmpool.pool.entries import Pool

asyncio.run(Pool(Settings.load()).evict(sys.argv[1], force=True))
print("{}")
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


def child(script: str, arg: str, env: dict[str, str]) -> dict[str, float]:
    # cwd: with ``-c`` the working directory comes first on sys.path, before PYTHONPATH,
    # and would decide which checkout is imported
    out = subprocess.run([sys.executable, "-c", script, arg], env=env, check=True, cwd="/",
                         capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))  # after any log lines


def summary(samples: list[dict[str, float]], key: str) -> dict[str, float]:
    values = [s[key] for s in samples]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def plant(runtime: Path, total: int, tensors: int, chunks: list[int] | None) -> str:
    """Publish a model of ``tensors`` bf16 tensors, ``total`` bytes, without filling it:
    a sparse segment of its own (``chunks`` None) or the arena chunks ``chunks``."""
    import hashlib

    from warmpool.pool.arena import DEFAULT_CHUNK, ArenaPlace
    from warmpool.pool.host import SHM_DIR, HostResident, HostTier
    from warmpool.pool.layout import Layout, Slot
    from warmpool.pool.layout_index import LayoutIndex, encode
    from warmpool.pool.registry.files import atomic_write

    host = HostTier(runtime, DEFAULT_CHUNK)
    per = total // tensors // 256 * 256
    content_hash = hashlib.sha256(f"{total}-{tensors}-{chunks}".encode()).hexdigest()
    layout = Layout(content_hash, per * tensors, tuple(
        Slot(f"layers.{i}.weight", "BF16", (per // 2,), i * per, per, "m.safetensors", 0)
        for i in range(tensors)))
    place = None
    if chunks is None:
        name = host.new_segment_name(content_hash)
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, layout.total_bytes)
    else:
        opened = host.arena._open(create=True)  # noqa: SLF001 - planting, not filling
        assert opened is not None
        fd, name = opened
        os.ftruncate(fd, max(os.fstat(fd).st_size, (max(chunks) + 1) * DEFAULT_CHUNK))
        place = ArenaPlace(name, DEFAULT_CHUNK, tuple(chunks))
    os.close(fd)
    index = encode(layout)
    atomic_write(host._index_path(content_hash), index)  # noqa: SLF001
    resident = HostResident(f"planted://{content_hash[:12]}", content_hash, name,
                            LayoutIndex(index), time.time(), arena=place)
    atomic_write(host._record_path(content_hash),  # noqa: SLF001
                 json.dumps(resident.to_json()).encode())
    return content_hash


def chunked(args: argparse.Namespace) -> None:
    from warmpool.pool.arena import DEFAULT_CHUNK
    from warmpool.pool.host import HostTier

    total = int(args.chunked * 1e9) // DEFAULT_CHUNK * DEFAULT_CHUNK
    n = total // DEFAULT_CHUNK
    work = Path(tempfile.mkdtemp(prefix="warmpool-attach-chunks-", dir="/var/tmp"))
    runtime = work / "runtime"
    env = {**os.environ, "WARMPOOL_RUNTIME_DIR": str(runtime),
           "WARMPOOL_CACHE_DIR": str(work / "cache"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("WARMPOOL_REDIS_URL", None)
    kinds = [("a segment of its own", None),
             (f"{n} arena chunks, consecutive (1 mmap)", list(range(n))),
             (f"{n} arena chunks, scattered ({n} mmaps)",
              [n + 2 * i for i in reversed(range(n))])]
    rows = []
    try:
        hashes = [plant(runtime, total, args.base_count, chunks) for _, chunks in kinds]
        samples: list[list[dict[str, float]]] = [[] for _ in kinds]
        for _ in range(args.reps):  # interleaved
            for i, content_hash in enumerate(hashes):
                samples[i].append(child(CHILD, content_hash, env))
        base = statistics.median(s["ms"] for s in samples[0])
        for (label, chunks), got in zip(kinds, samples):
            row = {"label": label, "chunks": len(chunks) if chunks else 0, "bytes": total,
                   "tensors": args.base_count,
                   **{k: summary(got, k) for k in ("ms", "cpu_ms", "first_ms")},
                   "samples": got}
            row["vs_segment"] = row["ms"]["median"] / base
            rows.append(row)
            print(f"{label}: attach {row['ms']['median']:.2f} ms "
                  f"({row['vs_segment']:.2f}x a segment)", flush=True)
    finally:
        HostTier(runtime).remove_all()
        shutil.rmtree(work, ignore_errors=True)
    lines = [f"# attach of one model: a segment of its own against arena chunks — {args.name}",
             "", f"Run {time.strftime('%Y-%m-%dT%H:%M:%S%z')} by `python bench/attach_scaling.py"
             f" --chunked {args.chunked:g}` ({os.cpu_count()} CPUs, load average "
             f"{os.getloadavg()[0]:.1f} at the end). {total / 1e9:.1f} GB, {args.base_count} "
             f"tensors, chunks of {DEFAULT_CHUNK >> 20} MiB; each row {args.reps} fresh "
             "processes (torch imported before the clock), interleaved; planted models "
             "(no page touched).", "",
             "| model's memory | attach (median) | min-max | attach CPU | first view |"
             " vs a segment |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['ms']['median']:.2f} ms | {r['ms']['min']:.2f}-"
                     f"{r['ms']['max']:.2f} ms | {r['cpu_ms']['median']:.2f} ms | "
                     f"{r['first_ms']['median']:.2f} ms | {r['vs_segment']:.2f}x |")
    write_report(args.out, f"attach_chunks-{args.name}", lines, rows)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.25,1,4", help="GB, at --base-count tensors")
    parser.add_argument("--base-count", type=int, default=128)
    parser.add_argument("--counts", default="32,128,512,2048,10000,100000",
                        help="tensors, at 1 GB")
    parser.add_argument("--baseline", default="", help="another checkout to compare with")
    parser.add_argument("--reps", type=int, default=5, help="fresh processes per row")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default=socket.gethostname() or "dev")
    parser.add_argument("--chunked", type=float, default=0.0,
                        help="GB: attach a segment against arena chunks instead")
    args = parser.parse_args()
    if args.chunked:
        chunked(args)
        return

    rows = [(float(gb), args.base_count) for gb in args.sizes.split(",")]
    rows += [(1.0, int(n)) for n in args.counts.split(",") if (1.0, int(n)) not in rows]
    work = Path(tempfile.mkdtemp(prefix="warmpool-attach-", dir="/var/tmp"))
    codes = {"this": str(Path(__file__).resolve().parents[1])}
    if args.baseline:
        codes["baseline"] = str(Path(args.baseline).resolve())
    envs = {}
    for code, tree in codes.items():
        env = {**os.environ, "WARMPOOL_RUNTIME_DIR": str(work / code / "runtime"),
               "WARMPOOL_CACHE_DIR": str(work / code / "cache"), "PYTHONPATH": tree}
        env.pop("WARMPOOL_REDIS_URL", None)
        envs[code] = env
    results = []
    try:
        for gb, count in rows:
            model = work / f"m-{gb:g}gb-{count}"
            write_model(model, int(gb * 1e9), count)
            warm = {code: child(WARM, str(model), env) for code, env in envs.items()}
            samples: dict[str, list[dict[str, float]]] = {code: [] for code in envs}
            for _ in range(args.reps):  # interleaved: both codes see the same load
                for code, env in envs.items():
                    samples[code].append(child(CHILD, str(model), env))
            for code, env in envs.items():
                child(EVICT, str(warm[code]["hash"]), env)
            shutil.rmtree(model)
            for code in envs:
                row = {"code": code, "gb": warm[code]["bytes"] / 1e9,
                       "tensors": int(warm[code]["tensors"]),
                       **{k: summary(samples[code], k)
                          for k in ("ms", "cpu_ms", "first_ms", "all_ms", "floor_ms")},
                       "samples": samples[code]}
                results.append(row)
                print(f"{code:8s} {row['gb']:6.2f} GB {row['tensors']:6d} tensors: attach "
                      f"{row['ms']['median']:7.2f} ms ({row['ms']['min']:.2f}-"
                      f"{row['ms']['max']:.2f}), first view {row['first_ms']['median']:.2f} ms,"
                      f" every view {row['all_ms']['median']:.1f} ms", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0]
    lines = [f"# attach against model size and tensor count — {args.name}", "",
             f"Run {time.strftime('%Y-%m-%dT%H:%M:%S%z')} by `python bench/attach_scaling.py"
             f"{' --baseline ' + args.baseline if args.baseline else ''}` ({os.cpu_count()} "
             f"CPUs, load average {load:.1f} at the end: the machine was shared, read ratios)."
             f" Each row: {args.reps} fresh processes (torch imported before the clock starts),"
             " median and range. 'attach': `attach()` until the mapping and its names are"
             " ready (wall; 'attach CPU': this process's CPU time, which a loaded machine"
             " does not inflate); 'first view': one lookup after that; 'every view': all the rest"
             " (`materialize()`; a baseline that builds views up front: `dict()` of them);"
             " 'bare as_strided': the same count of plain `as_strided` calls in the same"
             " process, the floor any view pays.", "",
             "| code | GB | tensors | attach (median) | min-max | vs baseline | attach CPU |"
             " first view | every view | per tensor | bare as_strided per tensor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = {(r["gb"], r["tensors"]): r for r in results if r["code"] == "baseline"}
    for r in results:
        b = base.get((r["gb"], r["tensors"]))
        ratio = f"{b['ms']['median'] / r['ms']['median']:.1f}x faster" if b and b is not r else ""
        lines.append(f"| {r['code']} | {r['gb']:.2f} | {r['tensors']} | {r['ms']['median']:.2f} ms"
                     f" | {r['ms']['min']:.2f}-{r['ms']['max']:.2f} ms | {ratio} |"
                     f" {r['cpu_ms']['median']:.2f} ms |"
                     f" {r['first_ms']['median']:.2f} ms | {r['all_ms']['median']:.1f} ms |"
                     f" {r['all_ms']['median'] * 1e3 / max(r['tensors'], 1):.2f} µs |"
                     f" {r['floor_ms']['median'] * 1e3 / max(r['tensors'], 1):.2f} µs |")
    write_report(args.out, f"attach_scaling-{args.name}", lines, results)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
