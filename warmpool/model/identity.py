"""Model identity and completeness, computed from a listing alone.

The content hash is sha256 over the sorted (relative key, size, etag) of every object
under the prefix: the same bytes give the same hash (a cache hit, no download), and a
re-upload that changes any object gives a new one, so a cache entry is never stale.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

from warmpool.storage.base import ObjectInfo

INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIX = ".safetensors"


def content_hash(objects: Iterable[ObjectInfo]) -> str:
    digest = hashlib.sha256()
    for obj in sorted(objects):
        # NUL and newline cannot occur in a validated key, so the encoding is unambiguous.
        digest.update(f"{obj.key}\x00{obj.size}\x00{obj.etag}\n".encode())
    return digest.hexdigest()


def is_weight_file(key: str) -> bool:
    return key.endswith(WEIGHT_SUFFIX)


def shard_files(objects: Iterable[ObjectInfo]) -> list[ObjectInfo]:
    """The safetensors files at the top of the model, in key order.

    Nested ``*.safetensors`` (an ``original/`` copy, a draft model) are not part of the
    checkpoint the index names, so only top-level files count unless an index says so.
    """
    return sorted(o for o in objects if is_weight_file(o.key) and "/" not in o.key)


@dataclass(frozen=True)
class Completeness:
    complete: bool
    shards: tuple[str, ...]  # the weight files of the checkpoint, in key order
    missing: tuple[str, ...] = ()
    reason: str = ""


def check_complete(objects: list[ObjectInfo], index_json: bytes | None) -> Completeness:
    """The completeness rule: an index and every shard it names, or config + a safetensors
    file.

    ``index_json`` is the content of the index when the listing has one (the caller reads
    it; it is small), so this function stays pure.
    """
    keys = {o.key for o in objects}
    if INDEX_FILE in keys:
        if index_json is None:
            return Completeness(False, (), (INDEX_FILE,), "index not read")
        try:
            weight_map = json.loads(index_json)["weight_map"]
            names = sorted({posixpath.normpath(v) for v in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            return Completeness(False, (), (), f"{INDEX_FILE} is malformed: {exc}")
        missing = tuple(n for n in names if n not in keys)
        if missing:
            return Completeness(False, tuple(names), missing,
                                f"{len(missing)} of {len(names)} shards missing")
        return Completeness(True, tuple(names))
    shards = tuple(o.key for o in shard_files(objects))
    missing = tuple(k for k, ok in (("config.json", "config.json" in keys),
                                    ("*.safetensors", bool(shards))) if not ok)
    if missing:
        return Completeness(False, shards, missing, "missing " + ", ".join(missing))
    return Completeness(True, shards)
