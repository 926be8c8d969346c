"""What a serving start needs to use the pool: ``warmpool engine-env``.

A serving engine started with the pool's weights (load format ``warmpool``, the engine
layout of its key) and the compile cache of its key starts as fast as a second start of
the same engine on the same node, the first start included: the export paid for both.
:func:`serving_start` says how, in three forms: variables and arguments for ``vllm
serve`` (shell lines to ``eval``), and the keyword arguments of ``vllm.LLM``.

The model path the engine sees is the metadata cache's files directory, named by the
model's content hash, so it is the same in the export and in every start, and on every
node with the same ``cache_dir`` (vLLM keys some of its caches by it).

A start whose key has no cache still works: the variables are left out (the engine
compiles in its own default places, never into the pool's caches, which only an export
writes) and :attr:`ServingStart.note` says which export would make one.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmpool.compile.key import CompileKey, EngineRuntime
from warmpool.compile.store import CACHE_ENV, CACHE_VARIABLES, CompileCaches, check_private
from warmpool.config import Settings
from warmpool.errors import UnsafeCacheError

#: vLLM's ZeroMQ sockets go under ``VLLM_RPC_BASE_PATH`` (default: the temporary
#: directory, which a cached start points into its cache): a private directory of the
#: runtime instead, so a start leaves nothing in the cache.
RPC_DIR = "engine-rpc"


@dataclass(frozen=True)
class ServingStart:
    model: str  # the directory the engine is given
    env: dict[str, str]
    llm_kwargs: dict[str, Any]
    serve_args: list[str]
    key: CompileKey
    compile_cache: str | None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "env": self.env, "llm_kwargs": self.llm_kwargs,
                "serve_args": self.serve_args, "compile_cache": self.compile_cache,
                "compile_key": self.key.to_json(), "note": self.note}

    def shell(self) -> str:
        """Lines for ``eval "$(warmpool engine-env ...)"``, then
        ``vllm serve "$WARMPOOL_MODEL" $WARMPOOL_SERVE_ARGS``."""
        lines = [f"export {name}={shlex.quote(value)}" for name, value in self.env.items()]
        lines.append(f"export WARMPOOL_MODEL={shlex.quote(self.model)}")
        # Word-split by the shell where it is used: no argument holds a space.
        lines.append(f"export WARMPOOL_SERVE_ARGS={shlex.quote(' '.join(self.serve_args))}")
        if self.note:
            lines.insert(0, "# " + self.note)
        return "\n".join(lines)


def serving_start(uri: str, files_dir: Path, checkpoint: str, runtime: EngineRuntime, *,
                  dtype: str, tp: int, max_model_len: int | None,
                  compilation: dict[str, Any] | None, settings: Settings) -> ServingStart:
    """How to start ``runtime``'s engine on ``uri`` (metadata in ``files_dir``, content
    hash ``checkpoint``) with these options from the pool."""
    key = CompileKey.of(checkpoint, runtime, dtype=dtype, tp=tp, max_model_len=max_model_len,
                        compilation=compilation)
    caches = CompileCaches(settings)
    cache = caches.find(key)  # UnsafeCacheError for one that is not private: said, not used
    env = dict(settings.pool_environment())
    note = None
    if cache is not None:
        caches.mark_used(cache)
        env.update(cache.environment())
        env["VLLM_RPC_BASE_PATH"] = str(rpc_dir(settings))
    else:
        note = _no_cache_note(uri, key, caches, dtype, tp, max_model_len)
    extra = {"uri": uri}
    kwargs: dict[str, Any] = {"model": str(files_dir), "load_format": "warmpool",
                              "model_loader_extra_config": extra, "tensor_parallel_size": tp,
                              "dtype": dtype}
    args = ["--load-format", "warmpool",
            "--model-loader-extra-config", json.dumps(extra, separators=(",", ":")),
            "--tensor-parallel-size", str(tp), "--dtype", dtype]
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
        args += ["--max-model-len", str(max_model_len)]
    if compilation:
        kwargs["compilation_config"] = compilation
        args += ["--compilation-config", json.dumps(compilation, separators=(",", ":"))]
    if any(" " in a for a in args):
        raise UnsafeCacheError(f"an engine argument holds a space ({args}): it could not be "
                               "passed through $WARMPOOL_SERVE_ARGS")
    return ServingStart(str(files_dir), env, kwargs, args, key,
                        str(cache.path) if cache else None, note)


def check_serving_environment(environ: Mapping[str, str] = os.environ) -> None:
    """In a serving engine's process, before it compiles or loads compiled code: a
    compile cache it was pointed at (``WARMPOOL_COMPILE_CACHE``) is private and ours, and
    the engine's cache variables point into it. :class:`UnsafeCacheError` otherwise."""
    given = environ.get(CACHE_ENV)
    if not given:
        return
    path = Path(given)
    check_private(path.parent)
    check_private(path)
    for var, sub in CACHE_VARIABLES.items():
        value = environ.get(var)
        if value is None:
            continue
        if Path(value) != path / sub:
            raise UnsafeCacheError(f"{var}={value} is not the compile cache's {path / sub}: "
                                   "start from what `warmpool engine-env` prints")
        check_private(Path(value))


def rpc_dir(settings: Settings) -> Path:
    path = settings.runtime_dir / RPC_DIR
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private(path)
    return path


def _no_cache_note(uri: str, key: CompileKey, caches: CompileCaches, dtype: str, tp: int,
                   max_model_len: int | None) -> str:
    length = f" --max-model-len {max_model_len}" if max_model_len else ""
    others = [c.key for c in caches.all() if c.complete and c.key.checkpoint == key.checkpoint
              and c.key.engine == key.engine]
    seen = "; caches of this model here: " + "; ".join(
        f"{o.label()} ({_diff(key, o)})" for o in others) if others else ""
    return (f"no compile cache for {key.label()} on this node: this start compiles. "
            f"`warmpool export {uri} --engine {key.engine} --compile --dtype {dtype} "
            f"--tp {tp}{length}` (in the engine's Python) makes one{seen}")


def _diff(key: CompileKey, other: CompileKey) -> str:
    return ", ".join(f"{k} {a!r} != {b!r}" for k, (a, b) in key.differences(other).items())
