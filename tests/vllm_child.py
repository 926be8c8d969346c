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

PROMPTS = ["the quick brown fox", "warm weights load fast", "hello world"]
TEXT = ["the quick brown fox jumps over the lazy dog", "warm weights load fast from the pool",
        "hello world, this is a tiny model", "serving engines read safetensors shards"] * 4


def make_model(out: Path, seed: int, rename: str | None) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():  # larger weights than the default init: distinct greedy tokens
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(out, max_shard_size="1MB")
    if rename:  # a checkpoint whose names do not match the module
        old, new = rename.split("=")
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shard = index["weight_map"].pop(old)
        index["weight_map"][new] = shard
        tensors = load_file(out / shard)
        tensors[new] = tensors.pop(old)
        save_file(tensors, out / shard, metadata={"format": "pt"})
        (out / "model.safetensors.index.json").write_text(json.dumps(index))


def run(spec: list[dict[str, Any]]) -> None:
    from vllm import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for item in spec:
        kwargs = dict(item["llm"])
        try:
            llm = LLM(dtype="bfloat16", enforce_eager=True, max_model_len=128,
                      **kwargs)
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
            make_model(Path(item["out"]), item.get("seed", 0), item.get("rename"))
    else:
        run(json.loads(args.spec))
    sys.stdout.flush()
    os._exit(0)  # vLLM's background threads can hold interpreter exit for a long time


if __name__ == "__main__":
    main()
