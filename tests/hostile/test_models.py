"""Corrupt and adversarial checkpoints, prefetched end to end from a local directory.

Every case: ``prefetch`` raises the error class that names the problem (file, tensor,
key), no shared-memory segment and no metadata-cache entry is left behind, and a good
model prefetched afterwards into the same pool still warms bit-exactly.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.models import write_model
from tests.pool_env import segments_of
from warmpool.attachment import attach
from warmpool.config import Settings
from warmpool.errors import (
    IncompleteModelError,
    SafetensorsError,
    StorageError,
    UnsafeKeyError,
    WarmpoolError,
)
from warmpool.model.identity import INDEX_FILE
from warmpool.model.safetensors import parse_header
from warmpool.pool.entries import Pool
from warmpool.pool.registry.base import State
from warmpool.tiers.prefetch import prefetch

CONFIG = b'{"architectures": ["LlamaForCausalLM"]}'


def f32(offsets: tuple[int, int] = (0, 8), shape: list[int] | None = None,
        dtype: str = "F32") -> dict[str, Any]:
    return {"dtype": dtype, "shape": [2] if shape is None else shape,
            "data_offsets": list(offsets)}


def safetensors(header: bytes | dict[str, Any], data: bytes = b"\0" * 8,
                length: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def good() -> bytes:
    return safetensors({"w": f32()})


#: (id, file bytes, error class, what the message must name)
CORRUPT: list[tuple[str, bytes, type[WarmpoolError], str]] = [
    ("empty file", b"", SafetensorsError, "too short"),
    ("truncated in the header", good()[:20], SafetensorsError, "past the end"),
    ("truncated in the data", good()[:-3], SafetensorsError, "run past"),
    ("header length 2**63", safetensors(b"{}", length=2**63), SafetensorsError, "exceeds"),
    ("header length 2**64-1", safetensors(b"{}", length=2**64 - 1), SafetensorsError,
     "exceeds"),
    ("header not JSON", safetensors(b"{nope"), SafetensorsError, "not valid JSON"),
    ("header not UTF-8", safetensors(b'{"\xff": 1}'), SafetensorsError, "not valid JSON"),
    ("header a list", safetensors(b"[]"), SafetensorsError, "not a JSON object"),
    ("10,000-deep header", safetensors(b"[" * 10_000 + b"]" * 10_000, b""),
     SafetensorsError, "header"),
    ("duplicate tensor names",
     safetensors(b'{"w": ' + json.dumps(f32((0, 8))).encode()
                 + b', "w": ' + json.dumps(f32((8, 16))).encode() + b"}", b"\0" * 16),
     SafetensorsError, "names 'w' twice"),
    ("duplicate field in an entry",
     safetensors(b'{"w": {"dtype": "F32", "dtype": "F64", "shape": [2], '
                 b'"data_offsets": [0, 8]}}'), SafetensorsError, "twice"),
    ("overlapping ranges", safetensors({"a": f32((0, 8)), "b": f32((4, 12))}, b"\0" * 12),
     SafetensorsError, "overlaps"),
    ("unknown dtype", safetensors({"w": f32(dtype="F128")}), SafetensorsError,
     "unknown dtype"),
    ("shape not its bytes", safetensors({"w": f32(shape=[3])}), SafetensorsError, "bytes"),
    ("negative dimension", safetensors({"w": f32(shape=[-1, 2])}), SafetensorsError,
     "non-negative"),
    ("range past the data", safetensors({"w": f32((8, 16))}), SafetensorsError, "run past"),
]


def model_dir(root: Path, shard: bytes) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_bytes(CONFIG)
    (root / "model.safetensors").write_bytes(shard)
    return root


async def assert_nothing_left_and_pool_works(settings: Settings, tmp_path: Path) -> None:
    assert segments_of(settings) == []
    cache = Path(settings.cache_dir)
    assert not [p for p in cache.glob("*") if not p.name.startswith(".")], list(cache.glob("*"))
    entries = await Pool(settings).entries()
    assert all(e.state == State.FAILED and e.error for e in entries), entries
    tensors = write_model(tmp_path / "good", shards=1)
    await prefetch(str(tmp_path / "good"), settings=settings)
    with attach(str(tmp_path / "good"), settings=settings) as weights:
        for name, tensor in tensors.items():
            assert torch.equal(weights[name].reshape(-1).view(torch.uint8),
                               tensor.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize(("data", "error", "fragment"),
                         [pytest.param(d, e, f, id=i) for i, d, e, f in CORRUPT])
async def test_a_corrupt_shard_is_refused_and_leaves_nothing(
        tmp_path: Path, settings: Settings, data: bytes, error: type[WarmpoolError],
        fragment: str) -> None:
    """The user gets: the error class of the corruption, naming the file; nothing left."""
    model = model_dir(tmp_path / "bad", data)
    with pytest.raises(error, match=fragment) as caught:
        await prefetch(str(model), settings=settings)
    assert "model.safetensors" in str(caught.value)
    await assert_nothing_left_and_pool_works(settings, tmp_path)


def _index_outside(prefix: str) -> Callable[[Path], None]:
    def write(model: Path) -> None:
        (model / INDEX_FILE).write_text(json.dumps(
            {"metadata": {}, "weight_map": {"w": prefix + "model.safetensors"}}))
    return write


@pytest.mark.parametrize("write_index", [
    _index_outside("../outside/"), _index_outside("/etc/../"),
    _index_outside("sub/../../outside/"),
], ids=["dot-dot", "absolute", "normalised-dot-dot"])
async def test_an_index_naming_shards_outside_the_prefix_reads_nothing_there(
        tmp_path: Path, settings: Settings, write_index: Callable[[Path], None]) -> None:
    """The user gets: :class:`IncompleteModelError` listing the outside name as missing;
    the file outside the model (which exists) is never read or copied."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.safetensors").write_bytes(good())
    model = model_dir(tmp_path / "m", good())
    write_index(model)
    with pytest.raises(IncompleteModelError) as caught:
        await prefetch(str(model), settings=settings)
    assert caught.value.missing and all("model.safetensors" in m and m != "model.safetensors"
                                        for m in caught.value.missing)
    await assert_nothing_left_and_pool_works(settings, tmp_path)


@pytest.mark.parametrize("target", ["/etc/passwd", "../secret.safetensors"])
async def test_a_link_out_of_a_local_model_is_refused(tmp_path: Path, settings: Settings,
                                                      target: str) -> None:
    """The user gets: :class:`UnsafeKeyError` naming the link; the linked file's bytes
    reach neither the cache nor the pool."""
    (tmp_path / "secret.safetensors").write_bytes(good())
    model = model_dir(tmp_path / "m", good())
    (model / "extra.safetensors").symlink_to(target)
    with pytest.raises(UnsafeKeyError, match="extra.safetensors"):
        await prefetch(str(model), settings=settings)
    await assert_nothing_left_and_pool_works(settings, tmp_path)


async def test_a_dangling_link_in_a_local_model_is_a_storage_error(
        tmp_path: Path, settings: Settings) -> None:
    """The user gets: :class:`StorageError` naming the dangling file (not a raw
    ``FileNotFoundError``, which the controller would take for an outage)."""
    model = model_dir(tmp_path / "m", good())
    (model / "tokenizer.json").symlink_to(model / "gone.json")
    with pytest.raises(StorageError, match="tokenizer.json") as caught:
        await prefetch(str(model), settings=settings)
    assert caught.value.key == "tokenizer.json"
    await assert_nothing_left_and_pool_works(settings, tmp_path)


async def test_a_deeply_nested_index_is_malformed(tmp_path: Path, settings: Settings) -> None:
    """The user gets: :class:`IncompleteModelError` saying the index is malformed, not a
    ``RecursionError`` from the JSON parser."""
    model = model_dir(tmp_path / "m", good())
    (model / INDEX_FILE).write_bytes(b"[" * 10_000 + b"]" * 10_000)
    with pytest.raises(IncompleteModelError, match="malformed"):
        await prefetch(str(model), settings=settings)
    await assert_nothing_left_and_pool_works(settings, tmp_path)


@pytest.mark.parametrize("name", ["w\x00x", "\udcff", "\u202e", "../../w"],
                         ids=["NUL", "lone-surrogate", "bidi", "dot-dot"])
async def test_odd_tensor_names_warm_and_attach_bit_exactly(tmp_path: Path, settings: Settings,
                                                           name: str) -> None:
    """The user gets: a tensor whose name holds NUL, a lone surrogate (not UTF-8), a
    bidi control or ``..`` is a name like any other: warm, attached under that exact
    name, its bytes exact (names never become paths)."""
    header = {name: f32((0, 4), shape=[4], dtype="U8"), "v": f32((4, 8), shape=[4], dtype="U8")}
    model = model_dir(tmp_path / "m", safetensors(header, bytes(range(8))))
    await prefetch(str(model), settings=settings)
    with attach(str(model), settings=settings) as weights:
        assert sorted(weights) == sorted([name, "v"])
        assert weights[name].tolist() == [0, 1, 2, 3]
        assert weights["v"].tolist() == [4, 5, 6, 7]


def test_a_header_of_100000_tensors_parses() -> None:
    """The user gets: a mixture-of-experts-sized header (100,000 tensors) parsed, every
    tensor in file order (warming such a model is the streaming path's concern)."""
    n = 100_000
    header = {f"experts.{i}.w": f32((16 * i, 16 * i + 16), shape=[16], dtype="U8")
              for i in range(n)}
    data = safetensors(header, b"\0" * (16 * n))
    parsed = parse_header(data, file="moe.safetensors", file_size=len(data))
    assert len(parsed.tensors) == n
    assert [t.begin for t in parsed.tensors] == [16 * i for i in range(n)]
