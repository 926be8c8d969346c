"""What the vLLM tests run inside vLLM's own virtualenv (``.venv-vllm``), one process each.

``make-models SPEC_JSON`` writes tiny Llamas (random weights, several shards), each with
a tokenizer trained offline; ``run SPEC_JSON`` starts ``LLM()`` once per entry of the spec
and prints one ``RESULT {json}`` line each: the greedy tokens, or the error. vLLM spawns
its engine core, so this must be a script with a main guard, never ``python -c``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

# The repository, for tests.tiny_llama: this script runs in vLLM's environment.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.tiny_llama import ENGINE_TEST, write_tiny_llama  # noqa: E402

PROMPTS = ["the quick brown fox", "warm weights load fast", "hello world"]


def run(spec: list[dict[str, Any]]) -> None:
    from vllm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for item in spec:
        kwargs = dict(item["llm"])
        try:
            llm = LLM(**{"dtype": "bfloat16", "enforce_eager": True, "max_model_len": 128,
                         **kwargs})  # an entry may override the defaults (dtype)
            outs = llm.generate(PROMPTS, params, use_tqdm=False)
            result = {"tokens": [list(o.outputs[0].token_ids) for o in outs]}
            del llm
        except Exception as exc:  # noqa: BLE001 - the test asserts on the message
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print("RESULT " + json.dumps({"name": item["name"], **result}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-models", help='[{"out": DIR, "seed": N, "rename": "OLD=NEW"}]')
    mk.add_argument("spec")
    rn = sub.add_parser("run")
    rn.add_argument("spec")
    args = parser.parse_args()
    if args.cmd == "make-models":
        for item in json.loads(args.spec):
            write_tiny_llama(Path(item["out"]), ENGINE_TEST, seed=item.get("seed", 0), std=0.2,
                             shard_size="1MB", tokenizer=True, rename=item.get("rename"))
    else:
        run(json.loads(args.spec))
    sys.stdout.flush()
    os._exit(0)  # vLLM's background threads can hold interpreter exit for a long time


if __name__ == "__main__":
    main()
