"""What rate can the S3 server give, and how close does prefetch come? One run, side by side.

First a sweep of ranged GETs with aiobotocore (concurrency × part size) over the model's
files into preallocated, pre-faulted memory, each point in a fresh process (as prefetch
runs): the best point is the server's rate on this machine. Then prefetch into the host
tier with each loader — runai-model-streamer at several concurrencies, and our native
ranged reads at their defaults and at other settings — and runai's own rate (its
iterator drained, no copy into shared memory). Every figure is a median of fresh
processes, interleaved so that all rows share the machine's load:

    python bench/s3_rate.py                 # 1 GB model, 2 repetitions
    python bench/s3_rate.py --gb 2 --reps 3 --concurrency 4,8,16,32 --parts 8,16,32,64

SeaweedFS runs on loopback (``bench/_seaweed.py``); results go to
``bench/results/s3_rate-<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report import write_report  # bench/report.py: bench/ is first on sys.path

HERE = Path(__file__).resolve().parent
BUCKET = "bench"
PREFIX = "model/"
MARK = "RESULT "


# ----------------------------------------------------------------------------- children
async def _get_sweep(spec: dict[str, Any]) -> dict[str, Any]:
    """Read every file in ranged GETs of ``part`` bytes, ``concurrency`` in flight, into
    one preallocated buffer that was touched beforehand (the server's rate, not ours)."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    files: list[tuple[str, int]] = spec["files"]
    total = sum(size for _, size in files)
    if spec.get("fresh"):  # a fresh shared-memory segment, as prefetch fills: faults count
        import mmap
        path = f"/dev/shm/warmpool-bench-get-{os.getpid()}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.unlink(path)
        os.ftruncate(fd, total)
        memory: Any = mmap.mmap(fd, total)
        os.close(fd)
    else:
        memory = bytearray(total)
        memory[::4096] = b"\1" * len(memory[::4096])  # fault every page in first
    view = memoryview(memory)
    part, concurrency = spec["part"], spec["concurrency"]
    jobs, at = [], 0
    for key, size in files:
        jobs += [(key, start, min(part, size - start), at + start)
                 for start in range(0, size, part)]
        at += size
    gate = asyncio.Semaphore(concurrency)
    config = AioConfig(s3={"addressing_style": "path"}, max_pool_connections=max(concurrency, 10),
                       retries={"total_max_attempts": 1})
    async with get_session().create_client("s3", config=config) as s3:
        await s3.head_bucket(Bucket=BUCKET)  # connection set up before the clock starts

        async def get(key: str, start: int, length: int, dst: int) -> None:
            async with gate:
                resp = await s3.get_object(Bucket=BUCKET, Key=key,
                                           Range=f"bytes={start}-{start + length - 1}")
                async with resp["Body"] as body:
                    data = await body.read()
            view[dst:dst + length] = data

        started = time.perf_counter()
        await asyncio.gather(*(get(*j) for j in jobs))
        seconds = time.perf_counter() - started
    return {"s": seconds, "bytes": total}


def _prefetch(spec: dict[str, Any]) -> dict[str, Any]:
    import torch  # noqa: F401  (imported before the clock, as in a serving process)

    import warmpool.storage.s3  # noqa: F401  (aiobotocore: imported before the clock too)
    from warmpool.config import Settings
    from warmpool.loading import native
    from warmpool.pool.entries import Pool
    from warmpool.tiers.prefetch import prefetch

    if spec["loader"] == "runai":
        import runai_model_streamer  # noqa: F401
    if spec.get("native"):
        native.NATIVE_CONCURRENCY, native.NATIVE_PIECE = spec["native"]
    settings = Settings.load()
    started = time.perf_counter()
    result = asyncio.run(prefetch(spec["uri"], settings=settings, loader=spec["loader"]))
    seconds = time.perf_counter() - started
    if result.already_warm:
        raise SystemExit("entry was already warm: the bench failed to evict it")
    asyncio.run(Pool(settings).evict(result.entry.content_hash, force=True))
    return {"s": seconds, "bytes": result.entry.bytes, "loader": result.loader}


def _runai_own(spec: dict[str, Any]) -> dict[str, Any]:
    """The streamer's own rate: drain its iterator, copy nothing."""
    import torch  # noqa: F401
    from runai_model_streamer import SafetensorsStreamer

    total = 0
    started = time.perf_counter()
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(spec["paths"], owned=False)
        for _name, tensor in streamer.get_tensors():
            total += tensor.numel() * tensor.element_size()
    return {"s": time.perf_counter() - started, "bytes": total}


def child_main(raw: str) -> None:
    spec = json.loads(raw)
    kind = spec["kind"]
    if kind == "get":
        out = asyncio.run(_get_sweep(spec))
    elif kind == "prefetch":
        out = _prefetch(spec)
    else:
        out = _runai_own(spec)
    print(MARK + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- parent
def write_model(directory: Path, total_bytes: int) -> None:
    """A Llama-like mix: a few large matrices per layer plus small norms, random bytes
    (a server that compresses gains nothing), in shards of at most 512 MB."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    hidden = 2048
    layer_bytes = 4 * hidden * hidden * 2 + 2 * hidden * 2
    layers = max(1, total_bytes // layer_bytes)
    per_shard = max(1, (512 << 20) // layer_bytes)
    shards = -(-layers // per_shard)
    gen = torch.Generator().manual_seed(0)
    for s in range(shards):
        tensors = {}
        for i in range(s * per_shard, min(layers, (s + 1) * per_shard)):
            for name in ("q", "k", "v", "o"):
                tensors[f"layers.{i}.{name}.weight"] = torch.randint(
                    -2**15, 2**15, (hidden, hidden), dtype=torch.int16, generator=gen
                ).view(torch.bfloat16)
            for name in ("input_norm", "post_norm"):
                tensors[f"layers.{i}.{name}.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        save_file(tensors, str(directory / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))


def run_child(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                         capture_output=True, text=True, timeout=600)
    for line in out.stdout.splitlines():
        if line.startswith(MARK):
            return dict(json.loads(line[len(MARK):]))
    raise RuntimeError(f"child {spec['kind']} failed ({out.returncode}):\n{out.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--concurrency", default="4,8,16,32,64")
    parser.add_argument("--parts", default="4,8,16,32,64", help="MiB")
    parser.add_argument("--runai-concurrency", default="4,8,16,32")
    parser.add_argument("--native", default="4:16,8:16,16:4,16:64,32:16",
                        help="concurrency:MiB of native prefetch rows besides the default")
    parser.add_argument("--fresh-get", default="8:16",
                        type=lambda v: tuple(map(int, v.split(":"))),
                        help="concurrency:MiB of a GET row into a fresh, unfaulted segment")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--name", default=socket.gethostname() or "dev")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    sys.path[:0] = [str(HERE), str(HERE.parent)]  # this checkout's warmpool, as the children
    from _seaweed import seaweedfs  # type: ignore[import-not-found]

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the server on the way out
    work = Path(tempfile.mkdtemp(prefix="warmpool-s3rate-", dir="/var/tmp"))
    load_start = os.getloadavg()[0]
    try:
        model = work / "model"
        write_model(model, int(args.gb * 1e9))
        with seaweedfs(work / "seaweedfs") as server:
            client = server.client()
            client.create_bucket(Bucket=BUCKET)
            files = []
            for path in sorted(model.iterdir()):
                client.upload_file(str(path), BUCKET, PREFIX + path.name)
                files.append((PREFIX + path.name, path.stat().st_size))
            weights = [(k, n) for k, n in files if k.endswith(".safetensors")]
            args.runtime = str(work / "runtime")
            env = {**os.environ, **server.env(), "PYTHONPATH": str(HERE.parent),
                   "WARMPOOL_RUNTIME_DIR": str(work / "runtime"),
                   "WARMPOOL_CACHE_DIR": str(work / "cache")}
            env.pop("WARMPOOL_REDIS_URL", None)
            uri = f"s3://{BUCKET}/{PREFIX}"
            rows = run_all(args, env, uri, weights)
    finally:
        from warmpool.pool.host import HostTier

        for runtime in ("runtime", "runtime-arena"):  # the arena keeps its pages: free them
            if (work / runtime).is_dir():
                HostTier(work / runtime).remove_all()
        shutil.rmtree(work, ignore_errors=True)
    report(args, rows, load_start, server.version)


def env_runtime(args: argparse.Namespace) -> str:
    return str(args.runtime)


def run_all(args: argparse.Namespace, env: dict[str, str], uri: str,
            weights: list[tuple[str, int]]) -> list[dict[str, Any]]:
    from warmpool.loading import native

    specs: list[tuple[str, dict[str, Any]]] = []
    for c in map(int, args.concurrency.split(",")):
        for p in map(int, args.parts.split(",")):
            specs.append((f"GET c={c} part={p} MiB",
                          {"kind": "get", "files": weights, "concurrency": c, "part": p << 20}))
    best_c, best_p = args.fresh_get
    specs.append((f"GET c={best_c} part={best_p} MiB into a fresh segment (page faults count)",
                  {"kind": "get", "files": weights, "concurrency": best_c,
                   "part": best_p << 20, "fresh": True}))
    default = (native.NATIVE_CONCURRENCY, native.NATIVE_PIECE)
    specs.append((f"prefetch native (default c={default[0]} part={default[1] >> 20} MiB)",
                  {"kind": "prefetch", "uri": uri, "loader": "native"}))
    variants = [tuple(map(int, v.split(":"))) for v in args.native.split(",") if v]
    for c, p in variants:
        if (c, p << 20) != default:
            specs.append((f"prefetch native c={c} part={p} MiB",
                          {"kind": "prefetch", "uri": uri, "loader": "native",
                           "native": [c, p << 20]}))
    # The host arena: its own pool (runtime directory), so that each run reuses the
    # pages the run before it evicted; one untimed run first faults them.
    arena = {"WARMPOOL_HOST_ARENA": "true",
             "WARMPOOL_RUNTIME_DIR": env_runtime(args) + "-arena"}
    arena_rows = [("prefetch native (default), host arena: pages reused after an evict",
                   {"kind": "prefetch", "uri": uri, "loader": "native", "env": arena})]
    specs += arena_rows
    for c in map(int, args.runai_concurrency.split(",")):
        specs.append((f"prefetch runai RUNAI_STREAMER_CONCURRENCY={c}",
                      {"kind": "prefetch", "uri": uri, "loader": "runai", "env": {
                          "RUNAI_STREAMER_CONCURRENCY": str(c)}}))
        specs.append((f"runai own rate (drain, no copy) concurrency={c}",
                      {"kind": "runai", "paths": [f"s3://{BUCKET}/{k}" for k, _ in weights],
                       "env": {"RUNAI_STREAMER_CONCURRENCY": str(c)}}))
    samples: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in specs}
    for _label, spec in arena_rows:
        run_child(spec, {**env, **spec.get("env", {})})  # faults the arena, untimed
    for rep in range(args.reps):  # interleaved: each rep walks every row once
        for label, spec in specs:
            out = run_child(spec, {**env, **spec.get("env", {})})
            samples[label].append(out)
            print(f"[{rep + 1}/{args.reps}] {label}: {out['bytes'] / out['s'] / 1e9:.2f} GB/s",
                  flush=True)
    rows = []
    for label, spec in specs:
        rates = [s["bytes"] / s["s"] / 1e9 for s in samples[label]]
        rows.append({"label": label, "kind": spec["kind"], "spec": {
            k: v for k, v in spec.items() if k not in ("files", "paths")},
            "gbps_median": statistics.median(rates), "gbps_min": min(rates),
            "gbps_max": max(rates), "bytes": samples[label][0]["bytes"],
            "samples": samples[label]})
    return rows


def report(args: argparse.Namespace, rows: list[dict[str, Any]], load_start: float,
           version: str) -> None:
    best = max((r for r in rows if r["kind"] == "get" and not r["spec"].get("fresh")),
               key=lambda r: r["gbps_median"])
    lines = [f"# S3 (SeaweedFS) best GET rate against prefetch — {args.name}", "",
             f"Run {time.strftime('%Y-%m-%dT%H:%M:%S%z')} by `python bench/s3_rate.py --gb "
             f"{args.gb} --reps {args.reps}`; {os.cpu_count()} CPUs shared by server, client "
             f"and other work (load average {load_start:.1f} at start, "
             f"{os.getloadavg()[0]:.1f} at end: absolute rates are noisy, read ratios). "
             f"SeaweedFS {version} on loopback. {rows[0]['bytes'] / 1e9:.2f} GB of weights; "
             f"each row {args.reps} fresh processes, interleaved.", "",
             f"Best GET: **{best['label']}**, {best['gbps_median']:.2f} GB/s (median).", "",
             "| row | GB/s median | min-max | vs best GET |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['gbps_median']:.2f} | {r['gbps_min']:.2f}-"
                     f"{r['gbps_max']:.2f} | {r['gbps_median'] / best['gbps_median']:.0%} |")
    lines += ["", "GET rows: aiobotocore ranged GETs into a pre-faulted buffer (the server's "
              "rate). Prefetch rows: `prefetch()` in a fresh process until the entry is warm "
              "(plan, shared-memory segment creation and its page faults included), then "
              "evicted. runai own rate: `SafetensorsStreamer` drained, nothing copied."]
    write_report(args.out, f"s3_rate-{args.name}", lines, rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
