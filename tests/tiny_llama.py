"""The one tiny-Llama builder of the tests and the benches: a Hugging Face Llama
checkpoint (config, safetensors shards and index, optionally a tokenizer trained offline)
that transformers, vLLM and SGLang all load.

It runs in warmpool's environment and in the engines' own (``.venv-vllm``,
``.venv-sglang``); scripts there put the repository on ``sys.path`` to import it. Imports
of torch and transformers are inside the functions, so importing it costs nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: What the offline tokenizer is trained on, and what prompts are made of.
TEXT = ["the quick brown fox jumps over the lazy dog", "warm weights load fast from the pool",
        "hello world, this is a tiny model", "serving engines read safetensors shards"] * 4


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a Llama; the defaults make a 2-layer model of about 300 KB."""

    vocab: int = 256
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 64
    tied: bool = False

    @classmethod
    def scaled(cls, hidden: int, layers: int, *, vocab: int = 32000,
               intermediate: int | None = None) -> LlamaShape:
        """A model of a chosen size for benchmarks: heads of 64 dimensions, one KV head
        per 256."""
        return cls(vocab=vocab, hidden=hidden, intermediate=intermediate or 4 * hidden,
                   layers=layers, heads=hidden // 64, kv_heads=max(1, hidden // 256),
                   max_positions=256)

    def config(self) -> Any:
        from transformers import LlamaConfig

        config = LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden,
                             intermediate_size=self.intermediate,
                             num_hidden_layers=self.layers, num_attention_heads=self.heads,
                             num_key_value_heads=self.kv_heads,
                             max_position_embeddings=self.max_positions,
                             tie_word_embeddings=self.tied, bos_token_id=1, eos_token_id=2,
                             torch_dtype="bfloat16")
        config.architectures = ["LlamaForCausalLM"]  # SGLang picks its model class by it
        return config


#: The engines' test model: big enough for TP=2 and distinct greedy tokens.
ENGINE_TEST = LlamaShape(vocab=320, hidden=256, intermediate=512, max_positions=256)


def write_tokenizer(out: Path) -> None:
    """A byte-level BPE tokenizer trained on :data:`TEXT` (nothing from the hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(out)


def write_tiny_llama(out: Path, shape: LlamaShape = LlamaShape(), *, seed: int = 0,
                     dtype: str = "bfloat16", std: float | None = None,
                     shard_size: str = "60KB", tokenizer: bool = False,
                     rename: str | None = None) -> int:
    """A random Llama saved by transformers in shards of ``shard_size``; the number of
    shards. ``std`` draws every parameter from N(0, std) (larger than the default
    init: distinct greedy tokens); ``rename`` (``OLD=NEW``) renames one tensor in its
    shard and the index, for a checkpoint whose names do not match the module."""
    import torch
    from transformers import LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        write_tokenizer(out)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(shape.config()).to(getattr(torch, dtype))
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, std)
    model.save_pretrained(out, max_shard_size=shard_size)
    if rename:
        _rename(out, *rename.split("="))
    return len(list(out.glob("*.safetensors")))


def write_random_llama(out: Path, shape: LlamaShape, *, seed: int = 0, std: float = 0.05,
                       shard_bytes: int = 256 << 20) -> None:
    """A bf16 Llama of random tensors written shard by shard, without building the
    module (fast and lean at any size: benchmarks write gigabytes)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out)
    config = shape.config()
    config.save_pretrained(out)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    shard: dict[str, Any] = {}
    size, files, weight_map = 0, [], {}

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, dims in shapes.items():
        shard[name] = (torch.randn(dims, generator=gen) * std).to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    total = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))


def _rename(out: Path, old: str, new: str) -> None:
    from safetensors.torch import load_file, save_file

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = index["weight_map"].pop(old)
    index["weight_map"][new] = shard
    tensors = load_file(out / shard)
    tensors[new] = tensors.pop(old)
    save_file(tensors, out / shard, metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps(index))



