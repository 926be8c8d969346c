"""vLLM start-up: engine-layout attach vs copy from the host tier vs vLLM's own load.

Each measurement is a fresh vLLM process (``.venv-vllm``) that starts one ``LLM()`` and
generates one greedy completion. Reported per row (medians over ``--reps``):

- ``weights_s``: the model built with its weights in place (vLLM's loader step: build,
  weights, post-processing). For the warmpool rows the loader logs it; for vLLM's own
  load it is the sum of vLLM's "Initializing model took" and "Loading weights took"
  lines (its post-processing is not logged separately, so that row is slightly low);
- ``llm_s``: the whole ``LLM(...)`` call, which also sets up the KV cache and the engine
  processes (the same for every row).

Rows: ``vllm`` (vLLM reads the safetensors files), ``copy`` (load format warmpool, the
checkpoint attached from the host tier and copied by the model's ``load_weights``),
``attach`` (load format warmpool from an engine-layout entry exported first).

    python bench/vllm_zero_copy.py                       # ~100 MB model, 3 reps
    python bench/vllm_zero_copy.py --hidden 2048 --layers 8 --reps 1

Writes ``bench/results/vllm_zero_copy-<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"

CHILD = r'''
import json, os, sys, time
from pathlib import Path

def make(out, hidden, layers, repo):
    sys.path.insert(0, repo)  # tests.tiny_llama: the one tiny-Llama builder
    from tests.tiny_llama import LlamaShape, write_tiny_llama
    shape = LlamaShape.scaled(hidden, layers, vocab=4096, intermediate=hidden * 11 // 4)
    write_tiny_llama(Path(out), shape, seed=0, shard_size="200MB", tokenizer=True)

def start(kwargs):
    from vllm import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(dtype="bfloat16", enforce_eager=True, max_model_len=128, **kwargs)
    llm_s = time.perf_counter() - t0
    out = llm.generate(["the quick brown fox"], SamplingParams(temperature=0.0, max_tokens=8,
                       ignore_eos=True), use_tqdm=False)
    print("RESULT " + json.dumps({"llm_s": llm_s, "tokens": list(out[0].outputs[0].token_ids)}),
          flush=True)
    del llm  # shuts the engine's processes down before this one exits

if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        start(json.loads(sys.argv[2]))
    sys.stdout.flush()
    os._exit(0)
'''

PATTERNS = {
    "in_place": re.compile(r"warmpool: model with weights in place after ([\d.]+) seconds"),
    "init": re.compile(r"Initializing model took ([\d.]+) seconds"),
    "weights": re.compile(r"Loading weights took ([\d.]+) seconds"),
    "views": re.compile(r"(\d+) of (\d+) parameters \((\d+) of (\d+) bytes\) are views"),
}


def run(argv: list[str], env: dict[str, str], timeout: float = 600) -> str:
    # Output through a file, not a pipe: an engine process that outlives the child would
    # hold a pipe open and the wait would never end.
    with tempfile.TemporaryFile("w+") as log:
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                              timeout=timeout, check=False)
        log.seek(0)
        output = log.read()
    if done.returncode != 0:
        raise SystemExit(f"{argv[:4]} exited {done.returncode}:\n{output[-4000:]}")
    return output


def measure(child: Path, kwargs: dict[str, Any], env: dict[str, str], row: str) -> dict[str, Any]:
    output = run([str(VLLM_PYTHON), str(child), "start", json.dumps(kwargs)], env)
    result = json.loads(next(line for line in output.splitlines()
                             if line.startswith("RESULT "))[len("RESULT "):])
    if row == "vllm":
        init = PATTERNS["init"].search(output)
        weights = PATTERNS["weights"].search(output)
        result["weights_s"] = (float(init.group(1)) if init else 0.0) + (
            float(weights.group(1)) if weights else float("nan"))
    else:
        found = PATTERNS["in_place"].search(output)
        result["weights_s"] = float(found.group(1)) if found else float("nan")
        if row == "attach" and "engine layout path" not in output:
            raise SystemExit("the attach row did not start from the engine layout:\n"
                             + output[-4000:])
    views = PATTERNS["views"].search(output)
    if views:
        result["views"] = [int(v) for v in views.groups()]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--name", default=platform.node() or "dev")
    args = parser.parse_args()
    if not VLLM_PYTHON.exists():
        raise SystemExit(f"{VLLM_PYTHON} is missing: `make vllm-venv` builds it")
    work = Path(tempfile.mkdtemp(prefix="wp-vllm-bench-"))
    env = {**os.environ, "WARMPOOL_RUNTIME_DIR": str(work / "runtime"),
           "WARMPOOL_CACHE_DIR": str(work / "cache"), "VLLM_CPU_KVCACHE_SPACE": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    env.pop("WARMPOOL_REDIS_URL", None)
    child = work / "child.py"
    child.write_text(CHILD)
    model = work / "model"
    run([str(VLLM_PYTHON), str(child), "make", str(model), str(args.hidden), str(args.layers),
         str(REPO)], env)
    cli = [sys.executable, "-m", "warmpool.cli"]
    run([*cli, "prefetch", str(model)], env)
    files_dir = run([*cli, "metadata", str(model), "--files-dir"], env).strip().splitlines()[-1]
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    pool = {"model": files_dir, "load_format": "warmpool"}
    rows = {"vllm": {"model": str(model)},
            "copy": {**pool, "model_loader_extra_config": {"engine_layout": False}},
            "attach": pool}
    export = measure(child, {**pool, "model_loader_extra_config": {"export": True}}, env, "copy")
    results: dict[str, list[dict[str, Any]]] = {row: [] for row in rows}
    for rep in range(args.reps):
        for row, kwargs in rows.items():  # interleaved: drift hits every row alike
            results[row].append(measure(child, kwargs, env, row))
            print(f"rep {rep + 1} {row}: {results[row][-1]}", file=sys.stderr)
    tokens = {row: {tuple(r["tokens"]) for r in rs} for row, rs in results.items()}
    assert len(set.union(*tokens.values())) == 1, f"rows gave different tokens: {tokens}"
    # The segments live in /dev/shm under the runtime dir's prefix: remove them first.
    from warmpool.pool.host import HostTier
    HostTier(work / "runtime").remove_all()
    run(["rm", "-rf", str(work)], env)
    render(args, size, export, results)


def render(args: argparse.Namespace, size: int, export: dict[str, Any],
           results: dict[str, list[dict[str, Any]]]) -> None:
    base = statistics.median(r["weights_s"] for r in results["vllm"])
    lines = ["# vLLM start-up: engine-layout attach vs copy vs vLLM's own load",
             "",
             f"Model: Llama-shaped, hidden {args.hidden}, {args.layers} layers, bf16, "
             f"{size / 1e6:.1f} MB of safetensors; vllm-cpu, TP=1, CPU, "
             f"{os.cpu_count()} cores (shared); medians of {args.reps} fresh processes; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             "",
             "| row | weights in place (s) | vs vLLM's own | whole LLM() (s) |",
             "|---|---|---|---|"]
    for row, rs in results.items():
        weights = statistics.median(r["weights_s"] for r in rs)
        llm = statistics.median(r["llm_s"] for r in rs)
        lines.append(f"| {row} | {weights:.3f} | {weights / base:.2f}x | {llm:.2f} |")
    views = next((r["views"] for r in results["attach"] if "views" in r), None)
    if views:
        lines += ["", f"After attach, {views[0]} of {views[1]} parameters ({views[2] / 1e6:.1f}"
                  f" of {views[3] / 1e6:.1f} MB) are views of the pool; on CPU vLLM packs the "
                  "linear weights into oneDNN copies."]
    lines += ["", f"The export run (copy load, then writing the layout): weights in place "
              f"{export['weights_s']:.3f} s, whole LLM() {export['llm_s']:.2f} s.",
              "", "The vllm row's weight step leaves out vLLM's post-processing (the oneDNN "
              "packing of the linear weights, which vLLM does not log); the copy and attach "
              "rows include it. Whole LLM() times swing by seconds on shared cores."]
    text = "\n".join(lines) + "\n"
    out = REPO / "bench" / "results" / f"vllm_zero_copy-{args.name}"
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {"args": vars(args), "bytes": size, "export": export, "results": results}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
