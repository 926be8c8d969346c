"""What the SGLang tests run inside SGLang's own virtualenv (``.venv-sglang``), one process.

``run SPEC_JSON`` starts ``sglang.Engine`` once per entry of the spec, greedy-decodes the
prompts, reads back every parameter the entry names (``get_weights_by_name``, whole) and
prints one ``RESULT {json}`` line per entry: the tokens and a digest of each parameter's
float32 values, or the error. The test process compares the digests with ``safetensors``
reading the same files. SGLang starts its scheduler in a subprocess, so this must be a
script with a main guard, never ``python -c``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import traceback
from typing import Any

PROMPTS = ["the quick brown fox", "warm weights load fast", "hello world"]
#: What runs on a 2-core CPU: torch's attention, no CUDA graphs, a small KV cache.
DEFAULTS: dict[str, Any] = {
    "device": "cpu", "dtype": "bfloat16", "attention_backend": "torch_native",
    "disable_cuda_graph": True, "context_length": 128, "mem_fraction_static": 0.05,
    "random_seed": 0, "log_level": "info",
}


def digest(values: Any) -> str:
    import numpy as np

    return hashlib.sha256(np.asarray(values, dtype=np.float32).tobytes()).hexdigest()


def run(spec: list[dict[str, Any]]) -> None:
    import sglang

    sampling = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}
    for item in spec:
        engine = None
        try:
            engine = sglang.Engine(**{**DEFAULTS, **item["engine"]})
            outs = engine.generate(prompt=PROMPTS, sampling_params=sampling)
            result: dict[str, Any] = {"tokens": [list(o["output_ids"]) for o in outs]}
            result["digests"] = {name: digest(engine.get_weights_by_name(name, 10**9))
                                 for name in item.get("weights", [])}
        except Exception as exc:  # noqa: BLE001 - the test asserts on the message
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            if engine is not None:
                engine.shutdown()
        print("RESULT " + json.dumps({"name": item["name"], **result}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    rn = sub.add_parser("run")
    rn.add_argument("spec")
    args = parser.parse_args()
    run(json.loads(args.spec))
    sys.stdout.flush()
    os._exit(0)  # SGLang's background threads can hold interpreter exit for a long time


if __name__ == "__main__":
    main()
