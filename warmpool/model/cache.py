"""The content-hashed metadata cache: a model's small files and shard headers, on disk.

Layout of the cache root::

    <root>/<hash>/manifest.json     objects, shards, skipped files, parsed headers
    <root>/<hash>/files/<key>       every non-weight file, byte for byte
    <root>/.locks/<hash>.lock       flock: one builder per hash, across processes
    <root>/.tmp-<hash>-<random>/    a build in progress

A ``<hash>/`` directory only ever appears through one ``rename`` of a finished, fsynced
temporary directory on the same filesystem, so whatever exists there is complete; a
build that fails (or is killed) leaves only a ``.tmp-*`` directory, removed at once or
swept later. The files live under ``files/`` so that no object key (even one named
``manifest.json``) can collide with our own bookkeeping, and ``files/`` looks like a
Hugging Face model directory without its weights, which serving engines can read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from warmpool.config import Settings
from warmpool.errors import (
    IncompleteModelError,
    MetadataLimitError,
    StorageError,
    TransientStorageError,
    UnsafeKeyError,
)
from warmpool.locks import async_file_lock, is_locked
from warmpool.model.identity import (
    INDEX_FILE,
    Completeness,
    check_complete,
    content_hash,
    is_weight_file,
)
from warmpool.model.safetensors import SafetensorsHeader, read_header
from warmpool.model.uri import ModelURI, parse_uri
from warmpool.storage import Store, open_store
from warmpool.storage.base import ObjectInfo, validate_relative_key
from warmpool.threads import to_thread_joined

log = logging.getLogger(__name__)
T = TypeVar("T")

MANIFEST = "manifest.json"
FILES_DIR = "files"
LOCKS_DIR = ".locks"
MANIFEST_VERSION = 1
#: Non-weight files above this size are not metadata (legacy weights, datasets): skipped.
#: The largest tokenizers are tens of MB; a node may raise it (``cache_max_file``).
MAX_FILE_BYTES = 64 << 20
#: Files that are code: never downloaded unless the node caches code (``cache_code``),
#: so nothing in a bucket can put a module where transformers would import it.
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".dylib", ".dll")
#: All non-weight files of one model together: configs and tokenizers are tens of MB.
MAX_FILES_TOTAL_BYTES = 2 << 30
#: Non-weight files of one model: a real one has a few dozen.
MAX_FILES = 10_000
#: An index lists tensor names; tens of MB would already be absurd.
MAX_INDEX_BYTES = 64 << 20
#: Weights in formats we never stream; skipped whatever their size.
LEGACY_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack")
#: Downloads and header reads in flight at once for one model.
CONCURRENCY = 16
#: A temporary directory this old whose builder holds no lock died mid-build.
STALE_TMP_SECONDS = 3600
_HASH = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Listing:
    """What one listing says about a model: its objects, identity and completeness."""

    uri: ModelURI
    objects: tuple[ObjectInfo, ...]
    content_hash: str
    completeness: Completeness

    @property
    def complete(self) -> bool:
        return self.completeness.complete


@dataclass(frozen=True)
class CachedModel:
    """A complete model's metadata in the cache: its files on disk and parsed headers."""

    uri: ModelURI
    content_hash: str
    cache_dir: Path
    complete: bool
    objects: tuple[ObjectInfo, ...]  # the full listing
    shards: tuple[str, ...]  # weight files of the checkpoint (relative keys)
    headers: dict[str, SafetensorsHeader]  # by relative key, one per shard
    files: tuple[str, ...]  # non-weight files now under files_dir
    skipped: tuple[str, ...] = ()  # non-weight files too large or legacy weights
    created_at: float = 0.0

    @property
    def files_dir(self) -> Path:
        return self.cache_dir / FILES_DIR

    def path(self, key: str) -> Path:
        """The local copy of the non-weight file ``key``."""
        if key not in self.files:
            raise KeyError(f"{key!r} is not a cached file of {self.uri}")
        return self.files_dir / key

    @property
    def nbytes(self) -> int:
        return sum(h.data_bytes for h in self.headers.values())

    @property
    def tensor_count(self) -> int:
        return sum(len(h.tensors) for h in self.headers.values())

    def to_json(self) -> dict[str, Any]:
        return {"uri": str(self.uri), "content_hash": self.content_hash,
                "cache_dir": str(self.cache_dir), "files_dir": str(self.files_dir),
                "complete": self.complete, "files": list(self.files),
                "skipped": list(self.skipped), "shards": list(self.shards),
                "bytes": self.nbytes, "tensors": self.tensor_count,
                "created_at": self.created_at}


class MetadataCache:
    """``code``: download code files (``*.py``...) too, for ``trust_remote_code`` models
    (the node's ``cache_code``); ``max_file_bytes``: larger non-weight files are skipped."""

    def __init__(self, root: Path, *, code: bool = False,
                 max_file_bytes: int = MAX_FILE_BYTES) -> None:
        self.root = Path(root)
        self.code = code
        self.max_file_bytes = max_file_bytes
        self._sweep_stale()

    def dir_for(self, content_hash: str) -> Path:
        return self.root / content_hash

    async def inspect(self, uri: ModelURI, store: Store | None = None) -> Listing:
        """List the prefix and judge completeness; reads at most the index, never weights."""
        async with _opened(uri, store) as s:
            objects = await _list(s)
            digest = content_hash(objects)
            completeness, _ = await self._completeness(s, objects, digest)
            return Listing(uri, objects, digest, completeness)

    async def fetch(self, uri: ModelURI, store: Store | None = None) -> CachedModel:
        """The cached metadata of ``uri``, built on first use; one listing when cached."""
        async with _opened(uri, store) as s:
            objects = await _list(s)
            digest = content_hash(objects)
            cached = self.load(digest)
            if cached is None:
                async with self._build_lock(digest):
                    # Whoever held the lock before us may have built it meanwhile.
                    cached = self.load(digest) or await self._build(uri, s, objects, digest)
            _mark_used(self.dir_for(digest))
            return replace(cached, uri=uri)

    def load(self, content_hash: str) -> CachedModel | None:
        """The cached model of ``content_hash``, or None if absent or not valid."""
        if not _HASH.fullmatch(content_hash):
            return None
        directory = self.dir_for(content_hash)
        try:
            data = json.loads((directory / MANIFEST).read_bytes())
            return _from_manifest(data, directory)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring invalid metadata cache entry %s: %s", directory, exc)
            return None

    def prune(self, keep: Iterable[str], *, max_models: int | None = None,
              max_age_s: float | None = None) -> list[str]:
        """Remove cached models not in ``keep`` and not being built; returns their hashes.

        Without bounds every such model goes. With them, only those unused (neither
        built nor fetched) for more than ``max_age_s``, and then the least recently used
        beyond ``max_models``. A hash in ``keep`` is never removed, so the cache can hold
        more than ``max_models`` when that many are in use."""
        keep = set(keep)
        now = time.time()
        unkept = []
        for path in self.root.glob("*"):
            if _HASH.fullmatch(path.name) and path.name not in keep:
                unkept.append((_last_used(path), path))
        unkept.sort(reverse=True)  # most recently used first
        room = None if max_models is None else max(0, max_models - len(keep & self._hashes()))
        removed = []
        for rank, (used, path) in enumerate(unkept):
            bounded = max_models is not None or max_age_s is not None
            expired = max_age_s is not None and now - used > max_age_s
            beyond = room is not None and rank >= room
            if bounded and not (expired or beyond):
                continue
            if self._building(path.name):
                continue
            _remove_dir(path, self.root, path.name)
            removed.append(path.name)
        return removed

    async def bound(self, keep: Iterable[str], settings: Settings) -> list[str]:
        """:meth:`prune` to the settings' bounds (``cache_max_models``,
        ``cache_max_age_s``), in a thread: every re-upload adds a directory, and removing
        them is disk work."""
        removed = await asyncio.to_thread(self.prune, set(keep),
                                          max_models=settings.cache_max_models,
                                          max_age_s=settings.cache_max_age_s)
        if removed:
            log.info("metadata cache: removed %d unused model(s)", len(removed),
                     extra={"event": "cache_pruned", "count": len(removed)})
        return removed

    def _hashes(self) -> set[str]:
        return {p.name for p in self.root.glob("*") if _HASH.fullmatch(p.name)}

    # --- building ---------------------------------------------------------------------

    async def _completeness(self, store: Store, objects: tuple[ObjectInfo, ...],
                            digest: str) -> tuple[Completeness, bytes | None]:
        """The completeness rule (:func:`~warmpool.model.identity.check_complete`),
        reading the index (from the cache when it holds this hash)."""
        index = next((o for o in objects if o.key == INDEX_FILE), None)
        if index is None:
            return check_complete(list(objects), None), None
        if index.size > MAX_INDEX_BYTES:
            return Completeness(False, (), (), f"{INDEX_FILE} is {index.size} bytes, over "
                                               f"the {MAX_INDEX_BYTES}-byte limit"), None
        cached = self.dir_for(digest) / FILES_DIR / INDEX_FILE
        if (self.dir_for(digest) / MANIFEST).is_file() and cached.is_file():
            data = cached.read_bytes()
        else:
            data = await store.read_range(INDEX_FILE, 0, index.size)
        return check_complete(list(objects), data), data

    async def _build(self, uri: ModelURI, store: Store, objects: tuple[ObjectInfo, ...],
                     digest: str) -> CachedModel:
        completeness, index_json = await self._completeness(store, objects, digest)
        if not completeness.complete:
            missing = ", ".join(completeness.missing)
            named = not missing or missing in completeness.reason  # said once is enough
            raise IncompleteModelError(
                f"{uri} is not a complete model yet: {completeness.reason}"
                + ("" if named else f" (missing: {missing})"),
                missing=list(completeness.missing))
        files, skipped = _plan_files(objects, code=self.code,
                                     max_file_bytes=self.max_file_bytes)
        shards = [o for o in objects if o.key in set(completeness.shards)]
        final = self.dir_for(digest)
        if final.exists():  # a corrupt entry that load() refused: replace it
            _remove_dir(final, self.root, digest)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{digest}-", dir=self.root))
        try:
            store.pin(objects)  # headers and files of this listing's version, or a failure
            headers = await _download_all(store, tmp / FILES_DIR, files, shards, index_json)
            if content_hash(await _list(store)) != digest:
                raise TransientStorageError(f"{uri} changed while its metadata was being "
                                            "fetched; try again")
            manifest = {
                "version": MANIFEST_VERSION, "uri": str(uri), "content_hash": digest,
                "created_at": time.time(),
                "objects": [{"key": o.key, "size": o.size, "etag": o.etag} for o in objects],
                "shards": list(completeness.shards), "files": [o.key for o in files],
                "skipped": [o.key for o in skipped],
                "headers": {key: h.to_json() for key, h in headers.items()},
            }
            await to_thread_joined(_commit, tmp, manifest, final)
        except BaseException:
            await to_thread_joined(_discard, tmp)  # rmtree and retries: off the loop
            raise
        return _from_manifest(manifest, final)

    # --- locking and cleanup ------------------------------------------------------------

    def _lock_path(self, digest: str) -> Path:
        return self.root / LOCKS_DIR / f"{digest}.lock"

    @asynccontextmanager
    async def _build_lock(self, digest: str) -> AsyncIterator[None]:
        """Exclusive right to build ``digest``, across coroutines and processes."""
        path = self._lock_path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        async with async_file_lock(path):
            yield

    def _building(self, digest: str) -> bool:
        """True while some coroutine or process holds ``digest``'s build lock."""
        path = self._lock_path(digest)
        try:
            return path.exists() and is_locked(path)
        except OSError:
            return False

    def _sweep_stale(self) -> None:
        """Remove temporary directories of builds that died (crash, SIGKILL) long ago."""
        cutoff = time.time() - STALE_TMP_SECONDS
        try:
            candidates = list(self.root.glob(".tmp-*"))
        except OSError:
            return
        for path in candidates:
            digest = path.name.split("-")[1] if path.name.count("-") >= 2 else ""
            try:
                old = path.lstat().st_mtime < cutoff
            except OSError:
                continue
            if old and not (_HASH.fullmatch(digest) and self._building(digest)):
                log.info("removing stale temporary directory %s", path)
                shutil.rmtree(path, ignore_errors=True)


def default_cache(settings: Settings) -> MetadataCache:
    """The node's cache, with the node's rules for code and file sizes."""
    return MetadataCache(settings.cache_dir, code=settings.cache_code,
                         max_file_bytes=settings.cache_max_file)


# --- listing and downloading ----------------------------------------------------------


@asynccontextmanager
async def _opened(uri: ModelURI, store: Store | None) -> AsyncIterator[Store]:
    """The caller's store, or one opened (and closed) for this call."""
    if store is not None:
        yield store
        return
    async with open_store(uri) as opened:
        yield opened


async def _list(store: Store) -> tuple[ObjectInfo, ...]:
    """The listing, every key checked before it can become a path under the cache."""
    objects = tuple(sorted(await store.list()))
    for o in objects:
        validate_relative_key(o.key)
    return objects


def _plan_files(objects: Iterable[ObjectInfo], *, code: bool = False,
                max_file_bytes: int = MAX_FILE_BYTES
                ) -> tuple[list[ObjectInfo], list[ObjectInfo]]:
    """(non-weight files to download, files skipped: too large, legacy weights, or code
    when the node does not cache code)."""
    files: list[ObjectInfo] = []
    skipped: list[ObjectInfo] = []
    for o in objects:
        if is_weight_file(o.key):
            continue
        key = o.key.lower()
        refused = key.endswith(LEGACY_WEIGHT_SUFFIXES) or (
            not code and key.endswith(CODE_SUFFIXES))
        (skipped if refused or o.size > max_file_bytes else files).append(o)
    total = sum(o.size for o in files)
    if total > MAX_FILES_TOTAL_BYTES or len(files) > MAX_FILES:
        raise MetadataLimitError(
            f"the model's {len(files)} non-weight files hold {total} bytes; the metadata "
            f"cache takes at most {MAX_FILES} files and {MAX_FILES_TOTAL_BYTES} bytes per "
            "model (move datasets and extra files out of the model prefix)")
    keys = {o.key for o in files}
    for o in files:
        parts = o.key.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in keys:
                raise UnsafeKeyError(f"object key {'/'.join(parts[:i])!r} is both a file and "
                                     f"a directory (of {o.key!r})", key=o.key)
    return files, skipped


async def _download_all(store: Store, dest: Path, files: list[ObjectInfo],
                        shards: list[ObjectInfo], index_json: bytes | None
                        ) -> dict[str, SafetensorsHeader]:
    """Download ``files`` into ``dest`` and read the shards' headers, all concurrently."""
    for o in files:
        (dest / o.key).parent.mkdir(parents=True, exist_ok=True)
    if index_json is not None:
        # The index was read (and judged) already; writing those very bytes keeps the
        # cached copy consistent with the completeness decision and saves a request.
        (dest / INDEX_FILE).write_bytes(index_json)
    sem = asyncio.Semaphore(CONCURRENCY)

    async def limited(fn: Callable[[], Awaitable[T]]) -> T:
        async with sem:
            return await fn()

    jobs: list[Callable[[], Awaitable[Any]]] = [
        partial(_download, store, o, dest / o.key)
        for o in files if not (o.key == INDEX_FILE and index_json is not None)]
    jobs += [partial(read_header, store, o.key, o.size) for o in shards]
    results = await _all([partial(limited, fn) for fn in jobs])
    headers = results[len(results) - len(shards):]
    return {o.key: h for o, h in zip(shards, headers, strict=True)}


async def _download(store: Store, obj: ObjectInfo, dest: Path) -> None:
    """Download ``obj``, checking its size against the listing; one retry on a mismatch."""
    got = -1
    for attempt in (1, 2):
        await store.download(obj.key, dest)
        got = await asyncio.to_thread(_size_or_missing, dest)
        if got == obj.size:
            return
        log.warning("%s: downloaded %d bytes, listing says %d (attempt %d)",
                    store.uri.child(obj.key), got, obj.size, attempt)
    raise StorageError(f"{store.uri.child(obj.key)}: downloaded {got} bytes but the listing "
                       f"says {obj.size}", key=obj.key)


async def _all(factories: list[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run all concurrently; on the first failure cancel the rest, wait for them, raise.

    Unlike ``gather``, nothing is left running after an error, so the caller may remove
    the directory the others were writing into.
    """
    if not factories:
        return []
    tasks = [asyncio.ensure_future(f()) for f in factories]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:
        if not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    return [t.result() for t in tasks]


# --- the manifest -----------------------------------------------------------------------


def _commit(tmp: Path, manifest: dict[str, Any], final: Path) -> None:
    """Write the manifest, make everything durable, then publish with one rename."""
    with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for dirpath, _dirs, names in os.walk(tmp):
        for name in names:
            _fsync(Path(dirpath, name), os.O_RDONLY)
        _fsync(Path(dirpath), os.O_RDONLY | os.O_DIRECTORY)
    os.rename(tmp, final)
    _fsync(final.parent, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _from_manifest(data: dict[str, Any], directory: Path) -> CachedModel:
    """Rebuild and re-validate a cached model; raise ValueError on any inconsistency."""
    if data.get("version") != MANIFEST_VERSION:
        raise ValueError(f"manifest version {data.get('version')!r}, want {MANIFEST_VERSION}")
    digest = data["content_hash"]
    objects = tuple(sorted(ObjectInfo(validate_relative_key(o["key"]), int(o["size"]),
                                      str(o["etag"])) for o in data["objects"]))
    if digest != directory.name or content_hash(objects) != digest:
        raise ValueError(f"manifest of {digest!r} does not hash to its directory's name")
    sizes = {o.key: o.size for o in objects}
    shards = tuple(data["shards"])
    files = tuple(data["files"])
    if not set(shards) <= sizes.keys() or set(data["headers"]) != set(shards):
        raise ValueError("manifest's shards, headers and objects disagree")
    headers = {key: SafetensorsHeader.from_json(data["headers"][key]) for key in shards}
    for key, header in headers.items():
        if header.file_size != sizes[key]:
            raise ValueError(f"header of {key} is for a {header.file_size}-byte file, "
                             f"the object has {sizes[key]}")
    for key in files:
        path = directory / FILES_DIR / validate_relative_key(key)
        if key not in sizes or path.stat().st_size != sizes[key]:
            raise ValueError(f"cached file {key} is missing or has the wrong size")
    return CachedModel(parse_uri(data["uri"]), digest, directory, True, objects, shards,
                       headers, files, tuple(data.get("skipped", ())),
                       float(data.get("created_at", 0.0)))


# --- helpers ----------------------------------------------------------------------------

def _size_or_missing(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def _discard(tmp: Path) -> None:
    """Delete a failed build's directory, even while a download thread finishes in it.

    Cancelling a task does not stop a thread it started (``to_thread`` copies): one may
    create a file between rmtree's listing and its rmdir. Nothing creates directories
    once downloads run, so after a few rounds the directory is gone for good.
    """
    for _ in range(100):
        shutil.rmtree(tmp, ignore_errors=True)
        if not tmp.exists():
            return
        time.sleep(0.01)
    log.warning("could not remove %s; it will be swept later", tmp)


def _mark_used(directory: Path) -> None:
    """Stamp a cached model as used now (its directory's mtime): pruning keeps the
    recently used ones."""
    try:
        os.utime(directory)
    except OSError:
        pass  # pruned meanwhile: the next fetch builds it again


def _last_used(directory: Path) -> float:
    try:
        return directory.stat().st_mtime
    except OSError:
        return 0.0


def _remove_dir(path: Path, root: Path, digest: str) -> None:
    """Take ``path`` out of sight with one rename, then delete it."""
    doomed = Path(tempfile.mkdtemp(prefix=f".tmp-{digest}-removed-", dir=root))
    try:
        os.rename(path, doomed / "entry")
    except FileNotFoundError:
        pass
    shutil.rmtree(doomed, ignore_errors=True)
