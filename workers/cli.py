"""``warmpool workers …``: run the supervisor in the foreground, and ask the workers.

Mounted by :mod:`warmpool.cli` as a typer sub-app (``app``).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from warmpool.config import Settings, parse_bytes
from warmpool.errors import WarmpoolError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="GPU worker processes: one per device, holding resident buffers.")


def _settings(runtime_dir: Optional[Path]) -> Settings:
    return Settings.load(runtime_dir=str(runtime_dir) if runtime_dir else None)


def _emit(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")


def _fail(exc: WarmpoolError) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1)


RuntimeOpt = typer.Option(None, "--runtime-dir", envvar="WARMPOOL_RUNTIME_DIR",
                          help="Private runtime directory (sockets, registry).")


@app.command()
def start(devices: Optional[str] = typer.Option(
              None, help="Comma-separated: cuda:0,cuda:1 or cpu:0. Default: every visible "
              "GPU, else cpu:0."),
          capacity: Optional[str] = typer.Option(None, help="Per-worker limit, e.g. 60GiB."),
          transport: str = typer.Option("auto", help="auto | cuda-vmm | cuda-ipc | shm-fd"),
          runtime_dir: Optional[Path] = RuntimeOpt,
          log_level: str = typer.Option("INFO", help="Worker and supervisor log level.")) -> None:
    """Start one worker per device and keep them running (foreground; Ctrl-C stops)."""
    import logging

    from warmpool.workers.process import fast_exit
    from warmpool.workers.supervisor import check_devices, describe_choice, parse_devices, supervise

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        chosen = parse_devices(devices)
        check_devices(chosen)
        typer.echo(f"starting workers for {describe_choice(chosen, devices)}", err=True)
        asyncio.run(supervise(chosen, _settings(runtime_dir),
                              capacity=parse_bytes(capacity), transport=transport,
                              log_level=log_level.upper()))
    except WarmpoolError as exc:
        _fail(exc)
    fast_exit(0)  # the workers are stopped; skip a second of interpreter teardown


@app.command()
def status(runtime_dir: Optional[Path] = RuntimeOpt,
           as_json: bool = typer.Option(False, "--json", help="One JSON document.")) -> None:
    """Each running worker: its device, free room and resident models with leases."""
    from warmpool.workers.client import workers_status

    try:
        workers = workers_status(_settings(runtime_dir))
    except WarmpoolError as exc:
        _fail(exc)
        return
    if as_json:
        _emit(workers)
        return
    if not workers:
        typer.echo("no workers are running (start them with `warmpool workers start`)")
    for w in workers:
        if not w.get("ok"):
            typer.echo(f"{w['device']}: pid {w['pid']} not answering: {w['error']}")
            continue
        typer.echo(f"{w['device']} ({w['uuid']}) pid {w['pid']}  room {w['room'] / 1e9:.2f} GB"
                   f"  transport {w['transport']}")
        for r in w["residents"]:
            typer.echo(f"  {r['state']:9} {r['bytes'] / 1e9:8.3f} GB  leases {r['leases']}  "
                       f"{r['content_hash'][:12]}  {r['uri']}  ({r['transport']})")


@app.command()
def evict(ref: str, device: str = typer.Option(..., help="cuda:N or cpu:N"),
          force: bool = typer.Option(False, "--force", help="Free even while leased."),
          grace: float = typer.Option(5.0, help="Seconds holders get to detach."),
          runtime_dir: Optional[Path] = RuntimeOpt) -> None:
    """Ask holders to detach, then free a model's device buffer."""
    from warmpool.workers.client import evict_via_workers

    try:
        entry = evict_via_workers(ref, device=device, settings=_settings(runtime_dir),
                                  force=force, grace_s=grace)
    except WarmpoolError as exc:
        _fail(exc)
        return
    typer.echo(f"evicted {entry['uri']} ({entry['content_hash'][:12]}) from {entry['device']}")
