"""The ``warmpool`` command.

Every subcommand prints a human summary by default and one JSON document with
``--json``; any :class:`~warmpool.errors.WarmpoolError` becomes one clear line on stderr
and exit code 1 (2 for a bad argument), never a traceback.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from warmpool.config import Settings
from warmpool.console import err, guard, out, shown
from warmpool.errors import ConfigError
from warmpool.loading.loaders import LOADERS

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Keep LLM weights warm: prefetch, stream, attach in milliseconds.")
T = TypeVar("T")

JsonOpt = typer.Option(False, "--json", help="Print one JSON document for scripts.")
ConfigOpt = typer.Option(None, "--config", envvar="WARMPOOL_CONFIG", help="Config file.")
RedisOpt = typer.Option(None, "--redis", help="Redis URL of a running controller "
                        "(default: WARMPOOL_REDIS_URL, or the config's redis_url).")
CompilationOpt = typer.Option(None, "--compilation-config", help="The engine's compilation "
                              "config as JSON (part of the compile cache's key).")


def _settings(config: Optional[Path], **overrides: Any) -> Settings:
    return Settings.load(config, **overrides)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _emit(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")


def _print_version(value: bool) -> None:
    if value:
        from warmpool import __version__

        out.print(f"warmpool {__version__}")
        raise typer.Exit()


@app.callback()
def _main(verbose: bool = typer.Option(False, "-v", "--verbose", help="Log debug lines."),
          version: bool = typer.Option(False, "--version", callback=_print_version,
                                       is_eager=True, help="Print the version and exit.")
          ) -> None:
    # runai-model-streamer sets its own logger's level from this variable at import.
    os.environ.setdefault("RUNAI_STREAMER_LOG_LEVEL", "DEBUG" if verbose else "WARNING")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
@guard
def generate(directory: Path = typer.Argument(..., help="Where to write the model."),
             preset: str = typer.Option("tiny", help="tiny | small | llama-3-8b"),
             layers: Optional[int] = typer.Option(None, help="Override the layer count."),
             shards: int = typer.Option(2, help="Number of safetensors shards."),
             seed: int = typer.Option(0),
             as_json: bool = JsonOpt) -> None:
    """Write a Llama-shaped checkpoint with random weights (no download needed)."""
    from dataclasses import replace

    from warmpool.model.generate import PRESETS, generate_model

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    shape = PRESETS[preset] if layers is None else replace(PRESETS[preset], layers=layers)
    summary = generate_model(directory, shape, shards=shards, seed=seed)
    if as_json:
        _emit(summary)
    else:
        out.print(f"wrote {summary['tensors']} tensors, {summary['bytes'] / 1e9:.2f} GB "
                  f"in {len(summary['files'])} shards to {directory}")


@app.command()
@guard
def metadata(uri: str, as_json: bool = JsonOpt, config: Optional[Path] = ConfigOpt,
             files_dir: bool = typer.Option(
                 False, "--files-dir", help="Print only the cached files directory (config "
                 "and tokenizer, no weights): the model path to give vLLM or SGLang with "
                 "load format warmpool.")) -> None:
    """Fetch a model's small files and safetensors headers into the local cache."""
    from warmpool.operations import metadata as fetch_metadata

    data = fetch_metadata(uri, settings=_settings(config)).to_json()
    if files_dir:
        sys.stdout.write(f"{data['files_dir']}\n")
        return
    if as_json:
        _emit(data)
        return
    out.print(f"[bold]{escape(data['uri'])}[/]  complete={data['complete']}", markup=True)
    out.print(f"  content hash  {data['content_hash']}")
    out.print(f"  files dir     {data['files_dir']}")
    out.print(f"  files         {', '.join(data['files'])}")
    out.print(f"  shards        {len(data['shards'])} ({data['tensors']} tensors, "
              f"{data['bytes'] / 1e9:.3f} GB)")


@app.command()
@guard
def prefetch(uri: str,
             device: str = typer.Option("cpu", help="cpu, or cuda:N (needs running workers)."),
             tp: int = typer.Option(1, help="Tensor-parallel group size (GPU workers)."),
             sharding: str = typer.Option("replicated", "--sharding", "--layout",
                                          help="replicated | sharded (GPU workers; "
                                               "--layout is its old name)."),
             loader: str = typer.Option("auto", help=" | ".join(LOADERS)
                                        + " (not with a running controller)."),
             concurrency: Optional[int] = typer.Option(
                 None, help="Streamer concurrency (not with a running controller)."),
             memory_limit: Optional[str] = typer.Option(
                 None, help="Streamer host buffer, e.g. 2GiB (not with a running controller)."),
             distributed: Optional[bool] = typer.Option(
                 None, help="Distributed streaming (not with a running controller)."),
             as_json: bool = JsonOpt, config: Optional[Path] = ConfigOpt,
             redis: Optional[str] = RedisOpt) -> None:
    """Make a model warm (metadata, then weights); exit 0 only when it is."""
    from warmpool.operations import prefetch as do_prefetch

    progress = progress_bar(err, enabled=not as_json and err.is_terminal)
    with progress:
        result = do_prefetch(uri, device, tp=tp, sharding=sharding, loader=loader,
                             concurrency=concurrency, memory_limit=memory_limit,
                             distributed=distributed, settings=_settings(config),
                             redis_url=redis, progress=progress_factory(progress))
    if as_json:
        _emit(result.to_json())
        return
    rate = result.gb_per_s
    out.print(f"{'already warm' if result.already_warm else 'warm'}: {result.uri} on "
              f"{','.join(result.devices)}  {result.bytes / 1e9:.3f} GB, {result.tensors} "
              f"tensors in {result.seconds:.2f} s"
              + (f" ({rate:.2f} GB/s, {result.loader})" if rate is not None else "")
              + (f"; the same bytes as {', '.join(result.aliases)}" if result.aliases else ""))


def progress_bar(console: Console, *, enabled: bool) -> Progress:
    """The prefetch progress bar. Its columns carry their style themselves: the console
    has markup off, so markup in a column's text would print as it is."""
    return Progress(TextColumn("{task.description}", style="progress.description",
                               markup=False),
                    BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=not enabled)


def progress_factory(progress: Progress) -> Callable[[int], Callable[[int], None]]:
    def factory(total: int) -> Callable[[int], None]:
        task = progress.add_task("streaming", total=total)
        return lambda n: progress.update(task, advance=n)

    return factory


@app.command()
@guard
def status(history: bool = typer.Option(False, "--history", help="Also the evicted, failed "
                                        "and lost entries of the last days."),
           cluster: bool = typer.Option(False, "--cluster", help="Per model, every "
                                        "node's state of it and what the fleet wants."),
           as_json: bool = JsonOpt, config: Optional[Path] = ConfigOpt,
           redis: Optional[str] = RedisOpt) -> None:
    """List the pool's entries that are warm or on their way (--history: all)."""
    from warmpool.operations import failing as pool_failing
    from warmpool.operations import status as pool_status

    settings = _settings(config)
    if cluster:
        _cluster_status(settings, redis, as_json)
        return
    entries = pool_status(history=history, settings=settings, redis_url=redis)
    failing = pool_failing(settings=settings, redis_url=redis)
    if as_json:
        _emit([{**e.to_json(), "leases": e.leases} for e in entries]
              + [{**f.to_json(), "state": "failed", "desired": True, "node": settings.node}
                 for f in failing])
        return
    if failing:
        rows = Table("desired", "device", "failures", "next try", "uri", "error")
        for f in failing:
            rows.add_row("given up" if f.given_up else "backing off", shown(f.device),
                         str(f.failures), "when asked again" if f.given_up else
                         time.strftime("%H:%M:%S", time.localtime(f.retry_at)),
                         shown(f.uri), shown(f.error))
        out.print(rows)
    table = Table("state", "device", "GB", "tensors", "leases", "hash", "engine", "uri",
                  "updated")
    for e in entries:
        table.add_row(e.state.value, shown(e.device), f"{e.bytes / 1e9:.3f}", str(e.tensors),
                      str(e.leases), shown(e.content_hash[:12]), shown(_engine_label(e)),
                      "\n".join(shown(uri) for uri in _checkpoint_uris(e)),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.updated_at)))
    empty = "nothing is warm" + ("" if history else " (--history shows what was)")
    out.print(table if entries else empty)
    from warmpool.operations import arena

    held = arena(settings=settings)
    if held is not None:
        out.print(f"host arena: {_gb(held.size)} GB in chunks of {held.chunk_bytes >> 20} MiB"
                  f", {_gb(held.used)} used, {_gb(held.free)} free ({_gb(held.faulted)} of "
                  "it faulted, reused by the next fills; `warmpool trim` gives it back)"
                  + (f", {_gb(held.locked)} page-locked by a GPU worker" if held.locked else ""))
    from warmpool.operations import compile_caches

    caches = compile_caches(settings=settings)
    if caches:
        rows = Table("compile cache", "MB", "model", "state", "last used")
        for c in caches:
            rows.add_row(shown(c.key.label()), f"{c.bytes / 1e6:.1f}",
                         shown(c.key.checkpoint[:12]),
                         "complete" if c.complete else "being written (or left by a killed "
                         "export)", time.strftime("%Y-%m-%d %H:%M:%S",
                                                  time.localtime(c.used_at))
                         if c.used_at else "")
        out.print(rows)


def _cluster_status(settings: Settings, redis: Optional[str], as_json: bool) -> None:
    from warmpool.operations import cluster

    models = cluster(settings=settings, redis_url=redis)
    if as_json:
        _emit([m.to_json() for m in models])
        return
    table = Table("uri", "device", "wanted on", "nodes", "GB", "GB read from store",
                  "GB from peers")
    for m in models:
        table.add_row(shown(m.uri), shown(m.device), shown(m.wanted or "one node"),
                      "\n".join(f"{shown(n)}: {shown(s)}" for n, s in m.nodes.items())
                      or "none yet", _gb(m.bytes), _gb(m.store_bytes), _gb(m.peer_bytes))
    out.print(table if models else "nothing is warm or wanted in the fleet")


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f}"


@app.command()
@guard
def trim(keep: str = typer.Option("0", "--keep", help="Free faulted bytes to keep for the "
                                  "next fills (e.g. 8GiB)."),
         as_json: bool = JsonOpt, config: Optional[Path] = ConfigOpt) -> None:
    """Give the host arena's free pages back to the kernel (warm models keep theirs)."""
    from warmpool.operations import arena
    from warmpool.operations import trim as do_trim

    settings = _settings(config)
    given = do_trim(keep, settings=settings)
    held = arena(settings=settings)
    if as_json:
        _emit({"given_back": given, "arena": held.to_json() if held else None})
    else:
        out.print(f"gave {_gb(given)} GB back to the kernel" + (
            f"; the arena keeps {_gb(held.size)} GB ({_gb(held.used)} used, "
            f"{_gb(held.faulted)} free and faulted)" if held else " (no host arena here)"))


def _engine_label(entry: Any) -> str:
    """An engine-layout entry's key in short (blank for a checkpoint's entry)."""
    from warmpool.pool.engine_key import EngineKey

    if entry.engine is None:
        return ""
    try:
        return EngineKey.from_json(entry.engine).label()
    except (TypeError, ValueError):
        return "(unreadable key)"


def _checkpoint_uris(entry: Any) -> list[str]:
    """An engine layout's URI is its checkpoint's with the key after a ``#``: the key has
    its own column, so the URI column shows the checkpoint's. No URI string holds a
    ``#`` of its own (a local path's is percent-encoded, an object store's is refused),
    so the first one is the separator."""
    if entry.engine is None:
        return list(entry.uris)
    return [uri.partition("#")[0] for uri in entry.uris]


@app.command()
@guard
def evict(ref: str = typer.Argument(..., help="Model URI or content hash."),
          device: str = typer.Option("cpu"),
          force: bool = typer.Option(False, "--force", help="Evict even while leased."),
          as_json: bool = JsonOpt, config: Optional[Path] = ConfigOpt,
          redis: Optional[str] = RedisOpt) -> None:
    """Free a model's resident memory (refused while a lease is live, unless --force).

    With a controller running, it asks the controller, which also stops wanting the model
    warm; a leased model is then evicted when its last lease ends."""
    from warmpool.operations import evict as do_evict

    result = do_evict(ref, device, force=force, settings=_settings(config), redis_url=redis)
    if as_json:
        _emit(result.to_json())
    else:
        verb = ("leased, evicted when its leases end:" if result.state == "retiring"
                else "released (its bytes stay for the URIs that still name them)"
                if result.state == "warm" else "evicted")
        version = f" ({result.content_hash[:12]})" if result.content_hash else ""
        name = ref if result.state == "warm" else result.uri
        out.print(f"{verb} {name}{version} from {result.device}")


@app.command("attach")
@guard
def attach_cmd(ref: str, device: str = typer.Option("cpu"),
               verify: bool = typer.Option(False, help="Compare every tensor with the source "
                                           "files (reads them: slow)."),
               as_json: bool = JsonOpt, config: Optional[Path] = ConfigOpt) -> None:
    """Attach to a warm model, as a serving process would, and report the cost."""
    import torch  # noqa: F401  (a serving process has it loaded before it attaches)

    from warmpool.attachment import attach

    settings = _settings(config)
    start = time.perf_counter()
    with attach(ref, device, settings=settings, holder="warmpool attach") as model:
        seconds = time.perf_counter() - start
        data: dict[str, Any] = {
            "uri": model.uri, "content_hash": model.content_hash, "device": device,
            "tensors": len(model), "bytes": model.layout.total_bytes,
            "transport": model.transport, "attach_ms": round(seconds * 1e3, 3)}
        if verify:
            data["verified"] = _verify(model)
    if as_json:
        _emit(data)
    else:
        out.print(f"attached {data['uri']}: {data['tensors']} tensors, "
                  f"{data['bytes'] / 1e9:.3f} GB via {data['transport']} in "
                  f"{data['attach_ms']:.2f} ms" + (" — verified bit-exact" if verify else ""))


def _verify(model: Any) -> bool:
    """Bit-exact comparison against safetensors reading the same (local) files."""
    from safetensors import safe_open

    from warmpool.errors import StreamError
    from warmpool.model.uri import parse_uri

    root = parse_uri(model.uri).path
    for file in model.layout.files:
        with safe_open(str(root / file), framework="pt") as f:
            for name in f.keys():
                expected = f.get_tensor(name)
                got = model[name].cpu()
                if got.dtype != expected.dtype or not _same_bytes(got, expected):
                    raise StreamError(f"tensor {name!r} differs from {root / file}")
    return True


def _same_bytes(a: Any, b: Any) -> bool:
    return a.shape == b.shape and bool(
        (a.reshape(-1).view(__import__("torch").uint8) ==
         b.reshape(-1).view(__import__("torch").uint8)).all())


@app.command("export")
@guard
def export_cmd(uri: str,
               engine: str = typer.Option("vllm", "--engine", help="The engine whose layout "
                                          "to write (vllm).", show_default=True),
               tp: int = typer.Option(1, "--tp", help="Tensor-parallel size of the engines "
                                      "that will attach it."),
               dtype: str = typer.Option("auto", "--dtype", help="The engine's model dtype."),
               max_model_len: Optional[int] = typer.Option(None, "--max-model-len"),
               on_cold: str = typer.Option("warm", "--on-cold", help="A checkpoint not warm "
                                           "on the host tier: warm it, or fail."),
               compile_: bool = typer.Option(False, "--compile", help="Let the engine "
                                             "compile, into the pool's compile cache of the "
                                             "key, so serving starts compile nothing."),
               compilation_config: Optional[str] = CompilationOpt,
               as_json: bool = JsonOpt, config: Optional[Path] = ConfigOpt) -> None:
    """Run the engine's loader once so the pool holds the model as the engine does
    (engine layouts, one per rank): later engines of the same key attach it zero-copy.
    With --compile, its compiled code too (`warmpool engine-env` tells a start how).

    Run it with the Python that has the engine installed (with warmpool beside it)."""
    from warmpool.engines import layout_engine

    exporter = importlib.import_module(str(layout_engine(engine).export))
    options = exporter.ExportOptions(engine=engine, tp=tp, dtype=dtype,
                                     max_model_len=max_model_len, on_cold=on_cold,
                                     compile=compile_,
                                     compilation_config=_compilation(compilation_config))
    if as_json:  # vLLM logs to stdout by default: keep stdout for the one JSON document
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    if config is not None:  # the engine's rank processes load the settings themselves
        os.environ["WARMPOOL_CONFIG"] = str(config)
    report = exporter.export(uri, options, _settings(config))
    if as_json:
        _emit(report.to_json())
    else:
        out.print(f"engine layouts of {report.uri} ({report.checkpoint[:12]}), "
                  f"{report.seconds:.1f} s:")
        for layout in report.layouts:
            out.print(f"  {layout.label}  {layout.bytes / 1e9:.3f} GB  {layout.tensors} "
                      f"tensors  {layout.content_hash}")
        if report.compile_cache:
            out.print(f"compile cache {report.compile_cache['label']}: "
                      f"{report.compile_cache['bytes'] / 1e6:.1f} MB in "
                      f"{report.compile_cache['path']}")
    # vLLM's background threads can hold up the interpreter's exit for a long time; the
    # layouts are published and the report is out, so nothing is left to finish.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command("engine-env")
@guard
def engine_env_cmd(uri: str,
                   engine: str = typer.Option("vllm", "--engine", help="The serving engine."),
                   tp: int = typer.Option(1, "--tp", help="Its tensor-parallel size."),
                   dtype: str = typer.Option("auto", "--dtype", help="Its model dtype."),
                   max_model_len: Optional[int] = typer.Option(None, "--max-model-len"),
                   compilation_config: Optional[str] = CompilationOpt,
                   python: Optional[Path] = typer.Option(
                       None, "--python", help="The engine's Python (default: the configured "
                       "export Python, else this one)."),
                   as_json: bool = JsonOpt, config: Optional[Path] = ConfigOpt) -> None:
    """Print what a serving start needs to start from the pool: the model directory, the
    variables (the compile cache of its key) and the engine's arguments.

        eval "$(warmpool engine-env s3://b/llama/ --dtype bfloat16)"
        vllm serve "$WARMPOOL_MODEL" $WARMPOOL_SERVE_ARGS
    """
    from warmpool.operations import engine_env

    start = engine_env(uri, engine=engine, tp=tp, dtype=dtype, max_model_len=max_model_len,
                       compilation=_compilation(compilation_config), python=python,
                       settings=_settings(config))
    if as_json:
        _emit(start.to_json())
        return
    if start.note:
        print(f"warmpool: {start.note}", file=sys.stderr)
    print(start.shell())


def _compilation(text: Optional[str]) -> Optional[dict[str, Any]]:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"--compilation-config is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("--compilation-config must be a JSON object")
    return value


@app.command()
@guard
def serve(redis: Optional[str] = typer.Option(
              None, "--redis", help="Redis URL (default: WARMPOOL_REDIS_URL or the config's "
              "redis_url; without one, an embedded Redis is started)."),
          config: Optional[Path] = ConfigOpt,
          metrics_port: Optional[int] = typer.Option(
              None, "--metrics-port", help="Prometheus port on loopback (0: any, -1: off)."),
          node: Optional[str] = typer.Option(None, "--node",
                                             help="Node name (default: host name)."),
          log_level: str = typer.Option("info", "--log-level")) -> None:
    """Run this node's controller: Redis events in, warm models out (SIGTERM stops it)."""
    from warmpool.logs import configure_logging
    from warmpool.node import serve as run_controller

    settings = _settings(config, redis_url=redis, metrics_port=metrics_port, node=node)
    configure_logging(log_level)
    raise typer.Exit(_run(run_controller(settings)))


def _mount_optional(name: str, module: str) -> None:
    """A sub-app whose extra may be missing (``relay`` needs aiohttp, ``workers`` the
    worker package): without it, the command is not offered. The sub-apps import
    :mod:`warmpool.console`, never this module."""
    try:
        sub = importlib.import_module(module).app
    except ImportError:
        return
    app.add_typer(sub, name=name)


_mount_optional("workers", "warmpool.workers.cli")
_mount_optional("relay", "warmpool.relay.cli")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
