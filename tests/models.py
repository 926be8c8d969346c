"""Small Hugging Face-shaped checkpoints for the tests, written with safetensors itself.

``write_model`` lays out what a real upload holds (config, tokenizer, generation config,
``model-0000k-of-0000n.safetensors`` shards and their index) with a tensor of every
requested dtype in every shard, plus a 0-d and an empty tensor, so that one fixture
exercises the awkward cases of every consumer: the metadata cache, layouts, streaming.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from warmpool.model.identity import INDEX_FILE

DEFAULT_DTYPES: tuple[torch.dtype, ...] = (
    torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.bool)

#: The safetensors name of each torch dtype (what a parsed header says).
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
    torch.uint16: "U16", torch.int32: "I32", torch.uint32: "U32", torch.int64: "I64",
    torch.uint64: "U64", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float32: "F32", torch.float64: "F64", torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def random_tensor(shape: Sequence[int], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random values of any dtype (integers over a wide range, bools 0/1)."""
    shape = tuple(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**40)), min(info.max, 2**40)
    return torch.randint(low, high + 1, shape, generator=gen, dtype=torch.int64).to(dtype)


def shard_name(index: int, total: int, *, with_index: bool = True) -> str:
    """Hugging Face's names: ``model-00001-of-00002.safetensors``, or ``model.safetensors``."""
    if total == 1 and not with_index:
        return "model.safetensors"
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def make_shards(*, shards: int, dtypes: Sequence[torch.dtype], seed: int
                ) -> list[dict[str, torch.Tensor]]:
    """One dict of tensors per shard: a layer per shard, one tensor of each dtype in it."""
    gen = torch.Generator().manual_seed(seed)
    out: list[dict[str, torch.Tensor]] = []
    for layer in range(shards):
        tensors: dict[str, torch.Tensor] = {}
        for i, dtype in enumerate(dtypes):
            name = f"model.layers.{layer}.w{i}_{str(dtype).removeprefix('torch.')}"
            tensors[name] = random_tensor((3 + i + layer, 5 + (seed % 3)), dtype, gen)
        out.append(tensors)
    # The awkward shapes: a 0-d scalar and a tensor with no elements at all.
    out[0]["model.embed_scale"] = random_tensor((), dtypes[0], gen)
    out[-1]["model.norm.empty"] = torch.zeros((0, 4), dtype=dtypes[-1])
    return out


def write_model(directory: Path, *, shards: int = 2,
                dtypes: Sequence[torch.dtype] = DEFAULT_DTYPES, with_index: bool = True,
                seed: int = 0, extra_files: bool = True) -> dict[str, torch.Tensor]:
    """Write a checkpoint into ``directory``; return every tensor by name."""
    if shards < 1 or not dtypes:
        raise ValueError("a model needs at least one shard and one dtype")
    directory.mkdir(parents=True, exist_ok=True)
    expected: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    for k, tensors in enumerate(make_shards(shards=shards, dtypes=dtypes, seed=seed)):
        name = shard_name(k, shards, with_index=with_index)
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        expected.update(tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    if with_index:
        total = sum(t.numel() * t.element_size() for t in expected.values())
        _write_json(directory / INDEX_FILE, {"metadata": {"total_size": total},
                                             "weight_map": dict(sorted(weight_map.items()))})
    _write_json(directory / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 5 + seed % 3, "num_hidden_layers": shards, "torch_dtype": "bfloat16",
        "warmpool_test_seed": seed})
    if extra_files:
        _write_json(directory / "generation_config.json",
                    {"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.6})
        _write_json(directory / "tokenizer.json", {
            "version": "1.0", "model": {"type": "BPE", "vocab": {"<s>": 1, "</s>": 2, "a": 3},
                                        "merges": []}})
        _write_json(directory / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": "</s>"})
    return expected


def model_files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` by relative key, to upload to a bucket."""
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
