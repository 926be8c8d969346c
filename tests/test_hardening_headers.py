"""Hostile safetensors headers are refused by name, as safetensors' own reader refuses
them; and a model's non-weight files are bounded in the metadata cache."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from safetensors.torch import load

from tests.models import write_model
from warmpool.errors import MetadataLimitError, SafetensorsError
from warmpool.model import cache as cache_module
from warmpool.model.cache import MetadataCache
from warmpool.model.safetensors import parse_header
from warmpool.model.uri import parse_uri

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _file(body: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(body)) + body + data


HOSTILE = [
    ("deep nesting", _file(b'{"__metadata__":' + b"[" * 200_000 + b"]" * 200_000 + b"}", b""),
     "nested too deeply"),
    ("huge integer", _file(b'{"w":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],'
                           b'"data_offsets":[0,8]}}', b"\0" * 8), "integer out of range"),
    ("duplicate tensor name", _file(b'{"w":' + json.dumps(F32x2).encode() + b',"w":'
                                    + json.dumps({**F32x2, "data_offsets": [8, 16]}).encode()
                                    + b"}", b"\0" * 16), "names 'w' twice"),
    ("gap between tensors", _file(json.dumps({
        "a": F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}).encode(),
        b"\0" * 24), "gap"),
    ("bytes after the last tensor", _file(json.dumps({"a": F32x2}).encode(), b"\0" * 12),
     "data area holds 12"),
    ("gap before the first tensor", _file(json.dumps({
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode(), b"\0" * 12),
     "gap"),
]


@pytest.mark.parametrize("data, fragment", [pytest.param(d, f, id=i) for i, d, f in HOSTILE])
def test_hostile_headers_are_refused_like_safetensors_refuses_them(data: bytes,
                                                                   fragment: str) -> None:
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own types
        load(data)
    with pytest.raises(SafetensorsError, match=fragment) as info:
        parse_header(data, file="m.safetensors", file_size=len(data))
    assert "m.safetensors" in str(info.value)


async def test_non_weight_files_have_a_total_cap(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "m"
    write_model(model)
    for i in range(4):
        (model / f"extra-{i}.txt").write_bytes(b"x" * 300_000)
    monkeypatch.setattr(cache_module, "MAX_FILES_TOTAL_BYTES", 1_000_000)
    cache = MetadataCache(tmp_path / "cache")
    with pytest.raises(MetadataLimitError, match="1000000 bytes"):
        await cache.fetch(parse_uri(str(model)))
    assert not list((tmp_path / "cache").glob("*")) or all(
        p.name == ".locks" for p in (tmp_path / "cache").iterdir())

