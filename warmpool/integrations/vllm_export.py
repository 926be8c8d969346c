"""``warmpool export``: run vLLM's loader once so the pool holds its engine layout.

An engine started with ``model_loader_extra_config={"export": true}`` writes each rank's
processed parameters into the host tier (:mod:`warmpool.integrations.vllm`); this is that
start as an explicit step, for a platform that wants the zero-copy start ready *before*
the first serving engine comes up (the controller runs it for a deploy request that asks
for an engine layout). It warms the checkpoint first when it is cold, starts ``vllm.LLM``
on the metadata cache's files directory with the options that make up the key (TP size,
dtype, maximum length), shuts it down, and reports the engine layouts now warm for the
checkpoint.

It must run in the Python that has vLLM (its own virtualenv, usually not warmpool's):
vLLM is imported only here, and its absence is one clear error. vLLM spawns its engine
core and rank processes, so the caller must be a script with a main guard (the
``warmpool`` console script, ``python -m warmpool``), never ``python -c``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any

from warmpool.config import Settings
from warmpool.engines import layout_engine
from warmpool.errors import ConfigError, ExportError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    """The engine options that decide the key of the layouts written (and so which later
    engines attach them): a serving engine must be started with the same ones."""

    engine: str = "vllm"
    tp: int = 1
    dtype: str = "auto"
    max_model_len: int | None = None
    #: "fail": refuse a checkpoint that is not warm on the host tier instead of warming
    #: it. The controller passes it: warming from inside its own export would go back to
    #: the controller as a plain deploy and replace the request that asked for the layout.
    on_cold: str = "warm"
    #: Let the engine compile (no ``enforce_eager``) with its caches in the pool's compile
    #: cache of this key (:mod:`warmpool.compile`), so serving starts compile nothing.
    compile: bool = False
    #: The engine's compilation config (part of the compile key); None: its default.
    compilation_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        layout_engine(self.engine)  # a ConfigError naming those that can
        if self.tp < 1:
            raise ConfigError(f"--tp {self.tp}: a tensor-parallel size is at least 1")
        if self.on_cold not in ("warm", "fail"):
            raise ConfigError(f"--on-cold {self.on_cold!r}: choose warm or fail")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"--max-model-len {self.max_model_len} must be at least 1")

    def llm_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"tensor_parallel_size": self.tp, "dtype": self.dtype}
        if not self.compile:
            kwargs["enforce_eager"] = True
        elif self.compilation_config:
            kwargs["compilation_config"] = self.compilation_config
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        return kwargs


@dataclass(frozen=True)
class LayoutInfo:
    """One engine-layout entry warm on the host tier."""

    label: str
    content_hash: str
    bytes: int
    tensors: int
    key: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "content_hash": self.content_hash, "bytes": self.bytes,
                "tensors": self.tensors, "key": self.key}


@dataclass(frozen=True)
class ExportReport:
    uri: str
    checkpoint: str  # the checkpoint's content hash
    files_dir: str
    engine: str
    layouts: tuple[LayoutInfo, ...]  # every engine layout warm for the checkpoint
    seconds: float
    compile_cache: dict[str, Any] | None = None  # CompileCache.to_json, with --compile

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "checkpoint": self.checkpoint, "files_dir": self.files_dir,
                "engine": self.engine, "layouts": [x.to_json() for x in self.layouts],
                "seconds": round(self.seconds, 3), "compile_cache": self.compile_cache}


def require_vllm() -> None:
    """vLLM installed here, or one line saying where to run the export instead. Found,
    not imported: importing vLLM imports Inductor, which must not happen before the
    compile cache's variables are set."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            f"vLLM cannot be imported by {sys.executable} (no module named 'vllm'): install "
            "vllm in that "
            "environment and warmpool beside it, and run `warmpool export` (or "
            "`python -m warmpool export`) with that environment's Python") from None


def export(uri: str, options: ExportOptions, settings: Settings) -> ExportReport:
    """Warm ``uri`` if cold, load it once in vLLM with export on, and report the engine
    layouts then warm for its checkpoint."""
    from warmpool.model.uri import parse_uri
    from warmpool.operations import metadata

    require_vllm()
    started = time.perf_counter()
    uri = str(parse_uri(uri))
    cached = metadata(uri, settings=settings)
    _warm_first(uri, cached.content_hash, settings, options.on_cold)
    # vLLM's rank processes read the pool's settings from the environment.
    os.environ.update(settings.pool_environment())
    compiled = None
    if options.compile:
        compiled = _compile_and_export(str(cached.files_dir), uri, cached.content_hash,
                                       options, settings)
    else:
        _run_engine(str(cached.files_dir), uri, options)
    return ExportReport(uri, cached.content_hash, str(cached.files_dir), options.engine,
                        tuple(layouts_of(cached.content_hash, settings)),
                        time.perf_counter() - started, compiled)


def _compile_and_export(files_dir: str, uri: str, checkpoint: str, options: ExportOptions,
                        settings: Settings) -> dict[str, Any] | None:
    """The export's engine run with compilation on and every cache the engine writes
    pointed into the pool's compile cache of the key: the one process that writes it.
    The variables are set before vLLM (or Inductor) is imported: Inductor fixes the
    directory of its precompiled headers when it is imported."""
    from warmpool.compile.key import CompileKey, probe
    from warmpool.compile.serving import rpc_dir
    from warmpool.compile.store import CompileCaches

    key = CompileKey.of(checkpoint, probe(options.engine), dtype=options.dtype, tp=options.tp,
                        max_model_len=options.max_model_len,
                        compilation=options.compilation_config)
    caches = CompileCaches(settings)
    with caches.writing(key) as cache:
        os.environ.update(cache.environment())
        os.environ["VLLM_RPC_BASE_PATH"] = str(rpc_dir(settings))
        tempfile.tempdir = None  # gettempdir() reads TMPDIR again
        codecache = sys.modules.get("torch._inductor.codecache")
        if codecache is not None and not str(getattr(codecache, "_HEADER_DIR", "")).startswith(
                str(cache.path)):
            raise ExportError("Inductor was imported before the compile cache was set up, so "
                              "its precompiled headers would go elsewhere: nothing exported")
        # The layouts first (the copy path, eager); then a start exactly like a serving
        # start (attaching them), which compiles. A model whose parameters are views of
        # one buffer traces to another AOTAutograd graph (its inputs alias) than the copy
        # path's separate tensors, so a cache compiled on the copy path misses in every
        # start that attaches the layout; and vLLM cannot build a second model in the
        # process that built the first (its layer names are global), so it is two runs.
        _run_engine(files_dir, uri, replace(options, compile=False))
        _run_engine(files_dir, uri, options, export=False)
    caches.enforce_limit(keep=key)
    done = caches.find(key)
    if done is None:
        log.warning("the compile cache of %s was not kept (compile_cache_max %s bytes)",
                    key.label(), settings.compile_cache_max)
        return None
    return done.to_json()


def _warm_first(uri: str, content_hash: str, settings: Settings, on_cold: str) -> None:
    """A checkpoint already on the host tier is used as it is: asking a controller would
    deadlock when that controller is the caller, waiting for this export to end."""
    from warmpool.operations import prefetch
    from warmpool.pool.host import HostTier

    if HostTier(settings.runtime_dir).resident(content_hash) is not None:
        return
    if on_cold == "fail":
        raise ExportError(f"{uri} ({content_hash[:12]}) is not warm on the host tier of "
                          f"{settings.node}, and --on-cold is fail: nothing was exported")
    prefetch(uri, "cpu", settings=settings)


def _run_engine(files_dir: str, uri: str, options: ExportOptions, export: bool = True) -> None:
    """One engine start on ``uri``: with ``export``, writing its layouts; without, as a
    serving start given what ``warmpool engine-env`` prints (the same loader config)."""
    from vllm import LLM

    extra: dict[str, Any] = {"uri": uri}
    if export:
        extra.update({"export": True, "on_cold": options.on_cold})
    try:
        llm = LLM(model=files_dir, load_format="warmpool", model_loader_extra_config=extra,
                  **options.llm_kwargs())
    except Exception as exc:  # noqa: BLE001 - vLLM raises many kinds; one clear line
        raise ExportError(f"vLLM could not load {uri}, so nothing was exported: "
                          f"{type(exc).__name__}: {exc}") from exc
    _shutdown(llm)


def _shutdown(llm: Any) -> None:
    """Stop the engine core and its ranks now, not whenever the collector gets to it."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    shutdown = getattr(core, "shutdown", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception as exc:  # noqa: BLE001 - the layouts are written; say, go on
            log.warning("vLLM's shutdown after the export failed: %s", exc)
    del llm
    gc.collect()


def layouts_of(checkpoint: str, settings: Settings) -> list[LayoutInfo]:
    """The engine layouts warm on the host tier for ``checkpoint``, by rank."""
    from warmpool.engine_layouts import engine_layouts
    from warmpool.pool.host import HostTier

    host = HostTier(settings.runtime_dir)
    found = []
    for key in engine_layouts(settings, checkpoint):
        resident = host.resident(key.content_hash)
        if resident is None:
            continue
        found.append(LayoutInfo(key.label(), key.content_hash, resident.layout.total_bytes,
                                len(resident.layout), key.to_json()))
    return sorted(found, key=lambda x: (x.key["engine"], x.label))


def parse_report(output: str) -> dict[str, Any]:
    """The JSON report of ``warmpool export --json`` in the child's output: it is printed
    last on stdout, after whatever the engine logged there, and may be followed by the
    child's stderr. ValueError when there is none."""
    start = 0 if output.startswith("{") else output.rfind("\n{\n") + 1
    if start == 0 and not output.startswith("{"):
        raise ValueError("no JSON report in the output")
    end = output.find("\n}", start)
    if end < 0:
        raise ValueError("the JSON report is cut short")
    report = json.loads(output[start:end + 2])
    if not isinstance(report, dict):
        raise ValueError("the report is not a JSON object")
    return report
