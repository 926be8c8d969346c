"""Safetensors headers are untrusted input: hostile files are refused by name, and every
file safetensors itself writes parses to exactly what safetensors reads back."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load, save

from tests.models import SAFETENSORS_DTYPES
from warmpool.errors import SafetensorsError
from warmpool.model.safetensors import (
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    parse_header,
    read_header,
)
from warmpool.model.uri import parse_uri
from warmpool.storage.local import LocalStore

FILE = "model-00001-of-00002.safetensors"


def raw(header: Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A file from a header (dict → JSON, or bytes as is), data, and an optional lie."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def entry(dtype: str = "F32", shape: Any = (2,), offsets: Any = (0, 8)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


VALID = save({"a": torch.arange(4, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int16)})

#: (id, file bytes, fragment of the message, tensor the error must name or None)
HOSTILE: list[tuple[str, bytes, str, str | None]] = [
    ("empty file", b"", "too short", None),
    ("shorter than the length prefix", b"\x05\x00\x00", "too short", None),
    ("cut inside the header", VALID[: 8 + 10], "runs past the end", None),
    ("cut inside the data", VALID[:-3], "run past", "b"),
    ("header length past end of file", raw({"a": entry()}, b"\0" * 8, length=500),
     "runs past the end", None),
    ("header length zero", raw(b"", b"\0" * 16, length=0), "header length is 0", None),
    ("header length over the limit", raw(b"{}", length=MAX_HEADER_BYTES + 1),
     "exceeds", None),
    ("header length of 2**64-1", raw(b"{}", length=2**64 - 1), "exceeds", None),
    ("overlapping ranges", raw({"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))},
                               b"\0" * 12), "overlaps tensor 'a'", "b"),
    ("same range twice", raw({"a": entry(), "b": entry()}, b"\0" * 8), "overlaps", "b"),
    ("unknown dtype", raw({"w": entry(dtype="F128")}, b"\0" * 8), "unknown dtype", "w"),
    ("sub-byte dtype", raw({"w": entry(dtype="F4")}, b"\0" * 8), "unknown dtype", "w"),
    ("missing dtype", raw({"w": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
     "unknown dtype", "w"),
    ("shape larger than its bytes", raw({"w": entry(shape=(3,))}, b"\0" * 8), "12 bytes", "w"),
    ("shape smaller than its bytes", raw({"w": entry(shape=(1,))}, b"\0" * 8), "4 bytes", "w"),
    ("non-JSON header", raw(b"{not json", b"\0" * 8), "not valid JSON", None),
    ("header not UTF-8", raw(b'{"\xff\xfe": 1}', b"\0" * 8), "not valid JSON", None),
    ("header JSON a list", raw([1, 2], b""), "not a JSON object", None),
    ("header JSON a string", raw("x", b""), "not a JSON object", None),
    ("entry not an object", raw({"w": [1, 2]}, b""), "not an object", "w"),
    ("negative shape", raw({"w": entry(shape=(-1, 2))}, b"\0" * 8), "non-negative", "w"),
    ("float in shape", raw({"w": entry(shape=[2.0])}, b"\0" * 8), "non-negative", "w"),
    ("string in shape", raw({"w": entry(shape=["2"])}, b"\0" * 8), "non-negative", "w"),
    ("shape not a list", raw({"w": entry(shape=2)}, b"\0" * 8), "non-negative", "w"),
    ("bool in shape", raw({"w": entry(shape=[True, 2])}, b"\0" * 8), "non-negative", "w"),
    ("data_offsets reversed", raw({"w": entry(offsets=(8, 0))}, b"\0" * 8), "not ordered", "w"),
    ("negative data_offsets", raw({"w": entry(offsets=(-8, 0))}, b"\0" * 8), "not ordered", "w"),
    ("data_offsets not a pair", raw({"w": entry(offsets=[0])}, b"\0" * 8), "pair", "w"),
    ("data_offsets of strings", raw({"w": entry(offsets=["0", "8"])}, b"\0" * 8), "pair", "w"),
    ("bool in data_offsets", raw({"w": entry(shape=(0,), offsets=[False, False])}, b""),
     "pair", "w"),
    ("range past the data", raw({"w": entry(offsets=(8, 16))}, b"\0" * 8), "run past", "w"),
    ("__metadata__ with a number", raw({"__metadata__": {"a": 1}, "w": entry()}, b"\0" * 8),
     "__metadata__", None),
    ("__metadata__ a list", raw({"__metadata__": ["a"], "w": entry()}, b"\0" * 8),
     "__metadata__", None),
    ("__metadata__ a string", raw({"__metadata__": "a", "w": entry()}, b"\0" * 8),
     "__metadata__", None),
]


def assert_refused(exc: SafetensorsError, file: str, fragment: str, tensor: str | None) -> None:
    message = str(exc)
    assert file in message and exc.file == file
    assert fragment in message
    assert exc.tensor == tensor
    if tensor is not None:
        assert f"tensor {tensor!r}" in message


@pytest.mark.parametrize(("data", "fragment", "tensor"),
                         [pytest.param(d, f, t, id=i) for i, d, f, t in HOSTILE])
def test_hostile_bytes_are_refused_naming_file_and_tensor(data: bytes, fragment: str,
                                                          tensor: str | None) -> None:
    with pytest.raises(SafetensorsError) as info:
        parse_header(data, file=FILE, file_size=len(data))
    assert_refused(info.value, FILE, fragment, tensor)


@pytest.mark.parametrize(("data", "fragment", "tensor"),
                         [pytest.param(d, f, t, id=i) for i, d, f, t in HOSTILE])
async def test_hostile_files_are_refused_by_read_header(tmp_path: Path, data: bytes,
                                                        fragment: str, tensor: str | None) -> None:
    (tmp_path / FILE).write_bytes(data)
    store = LocalStore(parse_uri(str(tmp_path)))
    with pytest.raises(SafetensorsError) as info:
        await read_header(store, FILE, len(data))
    assert_refused(info.value, store.uri.child(FILE), fragment, tensor)


def test_header_longer_than_the_bytes_given() -> None:
    with pytest.raises(SafetensorsError, match="got 10 of"):
        parse_header(VALID[:18], file=FILE, file_size=len(VALID))


# --- valid files -------------------------------------------------------------------------

ALL_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8,
              torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32,
              torch.uint64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
              torch.complex64]


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's bytes, bit for bit (NaN payloads and -0.0 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_parses_like_safetensors(data: bytes) -> SafetensorsHeader:
    """Our parse of ``data`` names the same tensors, dtypes, shapes and bytes as safetensors."""
    header = parse_header(data, file=FILE, file_size=len(data))
    expected = load(data)
    assert sorted(t.name for t in header.tensors) == sorted(expected)
    for t in header.tensors:
        ref = expected[t.name]
        assert t.dtype == SAFETENSORS_DTYPES[ref.dtype], t.name
        assert t.shape == tuple(ref.shape), t.name
        got = data[header.data_start + t.begin : header.data_start + t.end]
        assert got == tensor_bytes(ref), t.name
    return header


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_torch_writes_parses(dtype: torch.dtype) -> None:
    tensors = {"m": torch.arange(6).reshape(2, 3).to(dtype), "scalar": torch.ones((), dtype=dtype),
               "empty": torch.zeros((0, 3), dtype=dtype)}
    header = assert_parses_like_safetensors(save(tensors))
    assert {t.name: t.nbytes for t in header.tensors}["empty"] == 0


def test_metadata_is_kept_and_zero_tensors_are_fine() -> None:
    header = assert_parses_like_safetensors(save({}, metadata={"format": "pt", "x": "y"}))
    assert header.metadata == {"format": "pt", "x": "y"} and header.tensors == ()


def test_tensors_come_in_file_order_and_round_trip_through_json() -> None:
    data = save({"z": torch.ones(3), "a": torch.zeros(2, 2, dtype=torch.bfloat16),
                 "e": torch.zeros(0)}, metadata={"format": "pt"})
    header = assert_parses_like_safetensors(data)
    assert [t.begin for t in header.tensors] == sorted(t.begin for t in header.tensors)
    assert SafetensorsHeader.from_json(json.loads(json.dumps(header.to_json()))) == header


def test_a_tampered_cached_header_is_revalidated() -> None:
    header = parse_header(VALID, file=FILE, file_size=len(VALID))
    doc = header.to_json()
    doc["tensors"]["a"]["shape"] = [5]
    with pytest.raises(SafetensorsError, match="tensor 'a'"):
        SafetensorsHeader.from_json(doc)


async def test_read_header_uses_two_ranged_reads(tmp_path: Path) -> None:
    data = save({"w": torch.randn(64, 64), "b": torch.zeros(3, dtype=torch.int64)})
    (tmp_path / FILE).write_bytes(data)
    store = LocalStore(parse_uri(str(tmp_path)))
    reads: list[tuple[int, int]] = []
    real = store.read_range

    async def counting(key: str, start: int, length: int) -> bytes:
        reads.append((start, length))
        return await real(key, start, length)

    store.read_range = counting  # type: ignore[method-assign]
    header = await read_header(store, FILE, len(data))
    n = struct.unpack("<Q", data[:8])[0]
    assert reads == [(0, 8), (8, n)]
    assert header == parse_header(data, file=store.uri.child(FILE), file_size=len(data))
    with safe_open(str(tmp_path / FILE), "pt") as f:
        assert sorted(f.keys()) == sorted(t.name for t in header.tensors)


async def test_read_header_of_a_file_that_shrank_after_listing(tmp_path: Path) -> None:
    (tmp_path / FILE).write_bytes(VALID[:20])
    store = LocalStore(parse_uri(str(tmp_path)))
    with pytest.raises(SafetensorsError, match="truncated") as info:
        await read_header(store, FILE, len(VALID))  # the size the listing reported
    assert FILE in str(info.value)


# --- property: whatever safetensors writes, we parse exactly ----------------------------

DTYPES = st.sampled_from(ALL_DTYPES)
SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=3)
NAMES = st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__")


@st.composite
def tensors_strategy(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in draw(st.lists(NAMES, max_size=6, unique=True)):
        dtype, shape = draw(DTYPES), draw(SHAPES)
        count = 1
        for d in shape:
            count *= d
        size = count * torch.empty((), dtype=dtype).element_size()
        if size == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        elif dtype == torch.bool:
            out[name] = torch.tensor(draw(st.lists(st.booleans(), min_size=count,
                                                   max_size=count))).reshape(shape)
        else:  # any bit pattern: NaN payloads, infinities, -0.0
            data = bytearray(draw(st.binary(min_size=size, max_size=size)))
            out[name] = torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors=tensors_strategy(), metadata=st.none() | st.dictionaries(
    st.text(max_size=5), st.text(max_size=5), max_size=3))
def test_whatever_safetensors_writes_parses_exactly(tensors: dict[str, torch.Tensor],
                                                    metadata: dict[str, str] | None) -> None:
    data = save(tensors, metadata=metadata)
    try:
        load(data)
    except Exception:  # noqa: BLE001 - safetensors 0.8 writes `{},"__metadata__":{}}` for
        # no tensors and empty metadata, then refuses it itself: we must refuse it too.
        with pytest.raises(SafetensorsError):
            parse_header(data, file=FILE, file_size=len(data))
        return
    header = assert_parses_like_safetensors(data)
    assert header.metadata == (metadata or {})
    assert header.file_size == len(data)
    for t in header.tensors:  # and bit-exact against what we wrote, not only what it reads
        assert data[header.data_start + t.begin : header.data_start + t.end] == \
            tensor_bytes(tensors[t.name])
