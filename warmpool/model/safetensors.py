"""Reading and validating safetensors headers: untrusted input, checked before use.

A safetensors file is ``u64 little-endian header length N`` + ``N bytes of JSON`` +
the data area. The JSON maps tensor names to ``{"dtype", "shape", "data_offsets":
[begin, end]}`` (offsets relative to the data area) plus an optional ``__metadata__``
of string → string. We read the header with two ranged reads (8 bytes, then N) and
never the weights, and we refuse anything that could make a later copy read or write
outside its tensor: every error names the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

from warmpool.errors import SafetensorsError

#: safetensors' own reader refuses headers over 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000

#: Bytes per element of every dtype the format defines. Sub-byte types (F4, F6_*) are
#: left out on purpose: their byte length is not shape × size, and no streamer here
#: handles them.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of one file; ``begin``/``end`` are offsets inside the data area."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape),
                "data_offsets": [self.begin, self.end]}


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: where the data starts, and every tensor in file order."""

    file: str
    file_size: int
    header_size: int
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return 8 + self.header_size

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "file_size": self.file_size,
            "header_size": self.header_size,
            "metadata": self.metadata,
            "tensors": {t.name: t.to_json() for t in self.tensors},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SafetensorsHeader:
        """Rebuild from :meth:`to_json` (a cached manifest); re-validated, never trusted."""
        header = {"__metadata__": data.get("metadata") or {}, **data["tensors"]}
        raw = json.dumps(header).encode()
        parsed = parse_header_json(raw, file=data["file"], file_size=data["file_size"],
                                   header_size=data["header_size"])
        return parsed


def parse_length_prefix(prefix: bytes, *, file: str, file_size: int) -> int:
    """The header length from the first 8 bytes, bounded by the file and our limit."""
    if len(prefix) < 8:
        raise SafetensorsError(f"file is {file_size} bytes, too short for a header", file=file)
    (n,) = struct.unpack("<Q", prefix[:8])
    if n == 0:
        raise SafetensorsError("header length is 0", file=file)
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit",
                               file=file)
    if 8 + n > file_size:
        raise SafetensorsError(f"header length {n} runs past the end of the "
                               f"{file_size}-byte file (truncated?)", file=file)
    return n


def parse_header_json(raw: bytes, *, file: str, file_size: int,
                      header_size: int | None = None) -> SafetensorsHeader:
    """Validate the JSON header ``raw`` of a file of ``file_size`` bytes."""
    header_size = len(raw) if header_size is None else header_size
    try:
        obj = json.loads(raw, object_pairs_hook=_unique_keys, parse_int=_bounded_int)
    except _HostileJSON as exc:
        # Readers disagree on which of two entries wins (ours kept the last): a tensor
        # named twice could stream one byte range and be described by the other.
        raise SafetensorsError(f"header {exc}", file=file) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, Python's digit limit
        raise SafetensorsError(f"header is not valid JSON ({exc})", file=file) from None
    except RecursionError:  # nesting deeper than the interpreter's stack
        raise SafetensorsError("header JSON is nested too deeply", file=file) from None
    if not isinstance(obj, dict):
        raise SafetensorsError("header is not a JSON object", file=file)
    metadata = _metadata(obj.pop("__metadata__", None), file)
    data_size = file_size - 8 - header_size
    tensors = [_tensor(name, spec, file, data_size) for name, spec in obj.items()]
    tensors.sort(key=lambda t: (t.begin, t.end))
    _check_no_overlap(tensors, file, data_size)
    return SafetensorsHeader(file, file_size, header_size, tuple(tensors), metadata)


class _HostileJSON(ValueError):
    """A header that parses as JSON but that safetensors' own reader refuses."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys are all distinct: json.loads would keep the last of two
    tensors of the same name, and which bytes that is differs between readers."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _HostileJSON(f"names {duplicate!r} twice")
    return obj


def _bounded_int(text: str) -> int:
    """Integers of the header are u64 in safetensors; anything longer is refused before
    Python converts thousands of digits."""
    if len(text.lstrip("-")) > 20 or not -(1 << 64) < (value := int(text)) < 1 << 64:
        raise _HostileJSON(f"holds an integer out of range ({text[:24]}...)")
    return value


def parse_header(data: bytes, *, file: str, file_size: int) -> SafetensorsHeader:
    """Parse a header from bytes holding at least the prefix and the whole header."""
    n = parse_length_prefix(data[:8], file=file, file_size=file_size)
    if len(data) < 8 + n:
        raise SafetensorsError(f"got {len(data) - 8} of {n} header bytes", file=file)
    return parse_header_json(data[8 : 8 + n], file=file, file_size=file_size)


def _metadata(value: Any, file: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise SafetensorsError("__metadata__ must map strings to strings", file=file)
    return value


def _tensor(name: str, spec: Any, file: str, data_size: int) -> TensorInfo:
    def bad(why: str) -> SafetensorsError:
        return SafetensorsError(why, file=file, tensor=name)

    if not isinstance(spec, dict):
        raise bad("entry is not an object")
    dtype = spec.get("dtype")
    if dtype not in DTYPE_SIZES:
        raise bad(f"unknown dtype {dtype!r}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    offsets = spec.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(
            isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise bad(f"data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"data_offsets [{begin}, {end}] are not ordered")
    if end > data_size:
        raise bad(f"data_offsets [{begin}, {end}] run past the {data_size}-byte data area")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise bad(f"shape {shape} × {dtype} is {expected} bytes but the range holds "
                  f"{end - begin}")
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _check_no_overlap(tensors: list[TensorInfo], file: str, data_size: int) -> None:
    """Ranges sorted by start must tile the data area exactly, as safetensors requires:
    no overlap, no gap, nothing after the last tensor (an empty tensor sits where the
    previous one ends).
    Bytes that no tensor owns would be streamed and counted for nothing, or hide data."""
    reach, owner = 0, None
    for t in tensors:
        if t.begin < reach:
            raise SafetensorsError(f"byte range [{t.begin}, {t.end}] overlaps tensor {owner!r}",
                                   file=file, tensor=t.name)
        if t.begin > reach:
            raise SafetensorsError(f"byte range [{t.begin}, {t.end}] leaves a gap after "
                                   f"offset {reach}", file=file, tensor=t.name)
        reach, owner = t.end, t.name
    if reach != data_size:
        raise SafetensorsError(f"the tensors end at {reach} but the data area holds "
                               f"{data_size} bytes", file=file)


async def read_header(store: Any, key: str, size: int) -> SafetensorsHeader:
    """Read and validate the header of ``key`` (``size`` bytes) with two ranged reads."""
    file = store.uri.child(key)
    prefix = await store.read_range(key, 0, 8)
    n = parse_length_prefix(prefix, file=file, file_size=size)
    raw = await store.read_range(key, 8, n)
    if len(raw) != n:
        raise SafetensorsError(f"got {len(raw)} of {n} header bytes (truncated?)", file=file)
    return parse_header_json(raw, file=file, file_size=size)
