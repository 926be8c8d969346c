"""vLLM start-up with torch.compile: eager, cold compile, vLLM's own second start, and a
warmpool serving start given only what ``warmpool engine-env`` prints.

Each measurement is a fresh process of vLLM's Python (``.venv-vllm``) with a fresh HOME
and TMPDIR unless the row says otherwise; it imports vLLM, starts ``LLM()`` and generates
one greedy completion. Rows:

- ``eager``: ``enforce_eager=True``, weights from the files (nothing compiled);
- ``compile-cold``: compile on (vLLM's defaults), empty caches;
- ``compile-second``: compile on, the HOME and TMPDIR of a previous start on this node
  (what a second start of vLLM alone gets: its caches are there, under their defaults);
- ``warmpool``: after ``warmpool export --compile`` (timed once, reported apart), a start
  given only ``warmpool engine-env --json``: load format warmpool (the engine layout),
  the compile cache; a fresh HOME, and nothing left by the rows above.

Phases from vLLM's own log lines: ``import`` (``from vllm import LLM``, timed by the
child), ``weights`` (vLLM's "Loading weights took", or warmpool's "model with weights in
place"), ``engine init`` (vLLM's "init engine (profile, create kv cache, warmup model)":
on a CPU the compilation runs inside it), ``llm`` (the whole ``LLM()`` call) and
``total`` (the process, import to exit). Medians over ``--reps``.

    python bench/engine_start.py                  # tiny Llama, 3 reps
    python bench/engine_start.py --reps 1

Writes ``bench/results/engine_start-<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report import write_report

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"

CHILD = r'''
import json, os, sys, time
t0 = time.perf_counter()

def make(out, repo):
    sys.path.insert(0, repo)
    from tests.tiny_llama import ENGINE_TEST, write_tiny_llama
    from pathlib import Path
    write_tiny_llama(Path(out), ENGINE_TEST, seed=0, std=0.2, shard_size="1MB", tokenizer=True)

def start(kwargs):
    from vllm import LLM, SamplingParams
    imported = time.perf_counter() - t0
    t1 = time.perf_counter()
    llm = LLM(**kwargs)
    llm_s = time.perf_counter() - t1
    out = llm.generate(["the quick brown fox"], SamplingParams(temperature=0.0, max_tokens=8,
                       ignore_eos=True), use_tqdm=False)
    print("RESULT " + json.dumps({"import_s": imported, "llm_s": llm_s,
                                  "tokens": list(out[0].outputs[0].token_ids)}), flush=True)

if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    else:
        start(json.loads(sys.argv[2]))
    sys.stdout.flush()
    os._exit(0)
'''

PATTERNS = {
    "weights": re.compile(r"Loading weights took ([\d.]+) seconds"),
    "in_place": re.compile(r"warmpool: model with weights in place after ([\d.]+) seconds"),
    "engine_init": re.compile(r"init engine \(profile, create kv cache, warmup model\) took "
                              r"([\d.]+) s"),
}
BASE = {"dtype": "bfloat16", "max_model_len": 128}
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}


def clean_env(home: Path, tmp: Path | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one start: no cache variable of ours or the caller's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WARMPOOL_", "TORCHINDUCTOR", "VLLM_", "TRITON", "TMPDIR"))}
    env.update(CPU_ENV)
    env["HOME"] = str(home)
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    env.update(extra or {})
    for path in (home, tmp):
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
    return env


def run(argv: list[str], env: dict[str, str], timeout: float = 1800) -> tuple[str, float]:
    """Output through a file, not a pipe: vLLM's engine processes may outlive the child
    and hold a pipe open."""
    with tempfile.TemporaryFile("w+") as out:
        started = time.perf_counter()
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                              timeout=timeout, cwd=REPO)
        seconds = time.perf_counter() - started
        out.seek(0)
        text = out.read()
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:4]} exited {done.returncode}:\n{text[-4000:]}")
    return text, seconds


def start(child: Path, kwargs: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    text, total = run([str(VLLM_PYTHON), str(child), "start", json.dumps(kwargs)], env)
    [line] = [x for x in text.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    result["total_s"] = total
    for name, pattern in PATTERNS.items():
        found = [float(m.group(1)) for m in map(pattern.search, text.splitlines()) if m]
        result[f"{name}_s"] = found[-1] if found else None
    if result.get("in_place_s") is not None:
        result["weights_s"] = result["in_place_s"]
    return result


def median(rows: list[dict[str, Any]], field: str) -> float | None:
    values = [r[field] for r in rows if r.get(field) is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--name", default=platform.node() or "dev")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    if not VLLM_PYTHON.exists():
        sys.exit(f"{VLLM_PYTHON} is missing: `make vllm-venv` builds it")
    work = Path(tempfile.mkdtemp(prefix="engine-start-", dir="/var/tmp"))
    load_before = os.getloadavg()
    try:
        results = measure(work, args.reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    data = {"reps": args.reps, "load_before": load_before, "load_after": load_after,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            **results}
    lines = render(data)
    print("\n".join(lines))
    print(write_report(args.out, f"engine_start-{args.name}", lines, data))


def measure(work: Path, reps: int) -> dict[str, Any]:
    child = work / "child.py"
    child.write_text(CHILD)
    model = work / "model"
    run([str(VLLM_PYTHON), str(child), "make", str(model), str(REPO)], clean_env(work / "h0", None))
    files = {"model": str(model), **BASE}
    rows: dict[str, list[dict[str, Any]]] = {}

    def fresh(tag: str, i: int) -> tuple[Path, Path]:
        return work / f"{tag}-{i}" / "home", work / f"{tag}-{i}" / "tmp"

    rows["eager"] = [start(child, {**files, "enforce_eager": True},
                           clean_env(*fresh("eager", i))) for i in range(reps)]
    rows["compile-cold"] = [start(child, {**files, "enforce_eager": False},
                                  clean_env(*fresh("cold", i))) for i in range(reps)]
    home, tmp = fresh("second", 0)
    start(child, {**files, "enforce_eager": False}, clean_env(home, tmp))  # the first start
    rows["compile-second"] = [start(child, {**files, "enforce_eager": False},
                                    clean_env(home, tmp)) for _ in range(reps)]

    # warmpool: the pool's own directories; the export (timed apart), then engine-env.
    pool = {"WARMPOOL_RUNTIME_DIR": str(work / "pool" / "runtime"),
            "WARMPOOL_CACHE_DIR": str(work / "pool" / "cache"),
            "WARMPOOL_NODE": "bench"}
    export_env = clean_env(work / "export" / "home", work / "export" / "tmp", pool)
    text, export_s = run([str(VLLM_PYTHON), "-m", "warmpool", "export", str(model),
                          "--compile", "--dtype", "bfloat16", "--max-model-len", "128",
                          "--json"], export_env)
    out, _ = run([sys.executable, "-m", "warmpool", "engine-env", str(model), "--python",
                  str(VLLM_PYTHON), "--dtype", "bfloat16", "--max-model-len", "128", "--json"],
                 {**os.environ, **pool})
    doc = json.loads(out)
    if not doc["compile_cache"]:
        raise RuntimeError(f"the export made no compile cache: {doc['note']}\n{text[-3000:]}")
    rows["warmpool"] = []
    for i in range(reps):
        home = work / f"warmpool-{i}" / "home"
        env = clean_env(home, None, dict(doc["env"]))
        rows["warmpool"].append(start(child, {**doc["llm_kwargs"], "enforce_eager": False}, env))
    tokens = {name: {tuple(r["tokens"]) for r in runs} for name, runs in rows.items()}
    return {"rows": rows, "export_s": export_s, "cache_bytes": _du(Path(doc["compile_cache"])),
            "same_tokens": len(set().union(*tokens.values())) == 1}


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def render(data: dict[str, Any]) -> list[str]:
    rows = data["rows"]
    ref = {name: median(runs, "total_s") for name, runs in rows.items()}
    lines = [f"# vLLM start with torch.compile ({data['reps']} fresh processes a row, medians)",
             "",
             f"{data['machine']['cpus']} CPUs, {data['machine']['platform']}; load average "
             f"{data['load_before'][0]:.2f} before, {data['load_after'][0]:.2f} after; "
             f"tiny Llama (bf16, max_model_len 128); same tokens in every row: "
             f"{data['same_tokens']}", "",
             "| row | import s | weights s | engine init s (compiles) | LLM() s | total s "
             "| total vs eager | vs compile-cold | vs compile-second |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        def cell(field: str) -> str:
            value = median(runs, field)
            return "-" if value is None else f"{value:.2f}"
        total = ref[name] or 0.0
        lines.append(f"| {name} | {cell('import_s')} | {cell('weights_s')} | "
                     f"{cell('engine_init_s')} | {cell('llm_s')} | {cell('total_s')} | "
                     f"{total / ref['eager']:.2f}x | {total / ref['compile-cold']:.2f}x | "
                     f"{total / ref['compile-second']:.2f}x |")
    lines += ["", f"The export that made the warmpool row's cache (`warmpool export --compile`: "
              f"an eager run that writes the engine layout, then a compiling start like a "
              f"serving start) took {data['export_s']:.1f} s, once; the cache holds "
              f"{data['cache_bytes'] / 1e6:.0f} MB."]
    return lines


if __name__ == "__main__":
    main()
