"""Generate a Llama-shaped safetensors checkpoint with random weights.

The embedded default needs a model nobody has to download: ``warmpool generate DIR``
writes one in Hugging Face's layout (config, tokenizer, sharded safetensors, index),
and the benchmarks use the same shapes as Llama-3-8B (291 tensors) at any scale.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    kv_heads: int
    heads: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        out: list[tuple[str, tuple[int, ...]]] = [
            ("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "self_attn.q_proj.weight", (self.hidden, self.hidden)),
                (p + "self_attn.k_proj.weight", (kv, self.hidden)),
                (p + "self_attn.v_proj.weight", (kv, self.hidden)),
                (p + "self_attn.o_proj.weight", (self.hidden, self.hidden)),
                (p + "mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                (p + "mlp.up_proj.weight", (self.intermediate, self.hidden)),
                (p + "mlp.down_proj.weight", (self.hidden, self.intermediate)),
                (p + "input_layernorm.weight", (self.hidden,)),
                (p + "post_attention_layernorm.weight", (self.hidden,)),
            ]
        out += [("model.norm.weight", (self.hidden,)),
                ("lm_head.weight", (self.vocab, self.hidden))]
        return out

    def nbytes(self, element_size: int = 2) -> int:
        return sum(int(np.prod(s)) for _, s in self.tensors()) * element_size


PRESETS: dict[str, Shape] = {
    "tiny": Shape(hidden=256, intermediate=688, layers=2, vocab=2048, kv_heads=2, heads=4),
    "small": Shape(hidden=2048, intermediate=5632, layers=8, vocab=32000, kv_heads=4, heads=16),
    "llama-3-8b": Shape(hidden=4096, intermediate=14336, layers=32, vocab=128256,
                        kv_heads=8, heads=32),
}


def generate_model(directory: Path, shape: Shape, *, shards: int = 2, seed: int = 0,
                   dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Write the checkpoint; returns a summary (bytes, tensors, files)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = shape.tensors()
    shards = max(1, min(shards, len(names)))
    per_shard = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    total = 0
    for index in range(shards):
        chunk = names[index * per_shard : (index + 1) * per_shard]
        if not chunk:
            break
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for name, dims in chunk:
            count = int(np.prod(dims))
            # Random bits reinterpreted as the dtype: fast, and every byte differs, so a
            # misplaced tensor cannot pass a bit-exact comparison by luck.
            raw = rng.integers(0, 1 << 16, size=count, dtype=np.uint16)
            if dtype.itemsize == 2:
                raw &= 0xBFFF  # keep bf16/fp16 values finite (no inf/nan exponents)
            tensors[name] = torch.from_numpy(raw).view(dtype).reshape(dims)
            weight_map[name] = file
            total += count * dtype.itemsize
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab,
        "torch_dtype": str(dtype).removeprefix("torch.")}, indent=1))
    (directory / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8192}))
    return {"path": str(directory), "bytes": total, "tensors": len(names),
            "files": sorted(set(weight_map.values())), "shape": asdict(shape)}
