"""Talking to running workers from the CLI or a controller: prefetch, status, evict.

Every call resolves a device name to its identity in *this* process (a GPU UUID, see
:mod:`~warmpool.workers.devices`), finds the worker serving it, and speaks the framed
protocol of :mod:`~warmpool.workers.protocol`. Attaching, which serving processes do,
lives in :mod:`warmpool.workers.gpu_attach`.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from warmpool.config import Settings
from warmpool.errors import ConfigError, WarmpoolError, WorkerError
from warmpool.model.uri import parse_uri
from warmpool.pool.refs import ModelRef
from warmpool.threads import run_sync
from warmpool.workers.devices import DeviceSpec, device_uuid, parse_device
from warmpool.workers.discovery import WorkerRecord, find_worker, read_records
from warmpool.workers.plan import DEFAULT_SHARD_PATTERN, ModelPlan, plan_model
from warmpool.workers.protocol import AsyncChannel, Channel, Message

#: Loads stream whole models: no deadline by default (Ctrl-C still works).
LOAD_TIMEOUT: float | None = None
QUICK_TIMEOUT = 30.0


def worker_for(settings: Settings, device: str) -> WorkerRecord:
    """The live worker serving ``device`` as this process names it."""
    spec = parse_device(device)
    return find_worker(settings.runtime_dir, device_uuid(spec), str(spec))


def call(record: WorkerRecord, message: Message, timeout: float | None = QUICK_TIMEOUT
         ) -> Message:
    """One request, one reply, on a fresh connection (closed afterwards)."""
    channel = Channel.connect(Path(record.socket))
    try:
        reply, fds = channel.request(message, timeout=timeout)
    except OSError as exc:  # a timeout, or the worker dying mid-request
        raise WorkerError(f"worker {record.device} (pid {record.pid}): {exc}") from exc
    finally:
        channel.close()
    for fd in fds:
        os.close(fd)
    return reply


def group_devices(device: str, tp: int) -> list[str]:
    """``cuda:2`` with ``tp=2`` → ``cuda:2, cuda:3``: a group is consecutive devices."""
    if tp < 1:
        raise ConfigError(f"--tp must be at least 1, not {tp}")
    spec = parse_device(device)
    return [str(DeviceSpec(spec.kind, spec.index + r)) for r in range(tp)]


async def acall(record: WorkerRecord, message: Message,
                timeout: float | None = QUICK_TIMEOUT) -> Message:
    """:func:`call` on the caller's event loop: one request, one reply, on a fresh
    connection. Cancelling closes the connection (the worker sees its client gone)."""
    path = Path(record.socket)
    try:
        # asyncio.timeout, not wait_for: wait_for runs the connect as a task of its own,
        # and a cancel that lands just as it completes drops the connected channel
        # unclosed (a worker that never answers then held a test's process for ever).
        async with asyncio.timeout(10.0):
            channel = await AsyncChannel.connect(path)
    except (OSError, TimeoutError) as exc:
        raise WorkerError(f"cannot reach the worker at {path}: "
                          f"{getattr(exc, 'strerror', None) or exc or 'timed out'} "
                          "(is it running? `warmpool workers status`)") from exc
    try:
        async with asyncio.timeout(timeout):
            return await channel.request(message)
    except (OSError, TimeoutError) as exc:  # a timeout, or the worker dying mid-request
        raise WorkerError(f"worker {record.device} (pid {record.pid}): "
                          f"{exc or 'timed out'}") from exc
    finally:
        channel.close()


async def load_on_workers(uri: str, *, device: str = "cuda:0", tp: int = 1,
                          sharding: str = "replicated", loader: str = "auto",
                          settings: Settings, plan: ModelPlan | None = None,
                          shard_pattern: str = DEFAULT_SHARD_PATTERN,
                          timeout: float | None = LOAD_TIMEOUT) -> dict[str, Any]:
    """Make ``uri`` warm on ``device`` (and the next ``tp - 1`` devices); a summary dict
    (uri, content hash, devices, bytes, tensors, loader, seconds, ranks). ``plan``: the
    caller's plan of the model, so that it is not listed a second time."""
    started = time.perf_counter()
    plan = plan or await plan_model(parse_uri(uri), settings.cache_dir)
    devices = group_devices(device, tp)
    records = [worker_for(settings, d) for d in devices]
    layouts = plan.rank_layouts(len(devices), sharding, shard_pattern)
    base = {"uri": str(plan.uri), "content_hash": plan.content_hash, "loader": loader,
            "streamer": {"concurrency": settings.streamer.concurrency,
                         "memory_limit": settings.streamer.memory_limit}}
    if sharding == "replicated" and len(records) > 1:
        reply = await acall(records[0], {"op": "group_load", **base,
                                         "layout": layouts[0].to_json(),
                                         "peers": [r.socket for r in records[1:]]}, timeout)
        ranks = [{**_fields(r), "device": devices[r["rank"]]} for r in reply.pop("ranks")]
    else:
        replies = await asyncio.gather(*(
            acall(record, {"op": "load", **base, "layout": layout.to_json()}, timeout)
            for record, layout in zip(records, layouts)))
        reply = replies[0]
        ranks = [{"rank": i, **_fields(r)} for i, r in enumerate(replies)]
    return _summary(reply, ranks, devices, sharding, time.perf_counter() - started)


def prefetch_via_workers(uri: str, *, device: str = "cuda:0", tp: int = 1,
                         sharding: str = "replicated", loader: str = "auto",
                         settings: Settings, plan: ModelPlan | None = None,
                         shard_pattern: str = DEFAULT_SHARD_PATTERN,
                         timeout: float | None = LOAD_TIMEOUT) -> dict[str, Any]:
    """:func:`load_on_workers`, for synchronous callers (the CLI, tests)."""
    return run_sync(load_on_workers(uri, device=device, tp=tp, sharding=sharding,
                                    loader=loader, settings=settings, plan=plan,
                                    shard_pattern=shard_pattern, timeout=timeout))


def _fields(reply: Message) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k != "ok"}


def _summary(reply: Message, ranks: list[dict[str, Any]], devices: list[str], sharding: str,
             seconds: float) -> dict[str, Any]:
    already = all(r.get("already_warm") for r in ranks)
    # sharded: each rank holds only its own files, so the model is the sum of the ranks
    sizes = ([int(r["bytes"] if "bytes" in r else reply["bytes"]) for r in ranks]
             if sharding == "sharded" else [int(reply["bytes"])])
    total = sum(sizes)
    return {"uri": reply["uri"], "content_hash": reply["content_hash"], "state": "warm",
            "device": devices[0] if len(devices) == 1 else ",".join(devices),
            "devices": devices, "sharding": sharding, "bytes": total,
            "tensors": reply["tensors"], "transport": reply.get("transport", ""),
            "loader": reply.get("loader", ""), "already_warm": already,
            "seconds": round(seconds, 4), "ranks": ranks,
            "gb_per_s": round(total / seconds / 1e9, 3) if seconds and not already else None}


def workers_status(settings: Settings) -> list[dict[str, Any]]:
    """Every live worker's own account: device, room, residents and their leases."""
    out = []
    for record in read_records(settings.runtime_dir):
        try:
            out.append(call(record, {"op": "status"}, timeout=5.0))
        except (WarmpoolError, OSError) as exc:
            out.append({"ok": False, "name": record.name, "device": record.device,
                        "pid": record.pid, "error": str(exc)})
    return out


async def evict_on_worker(ref: str, *, device: str, settings: Settings,
                          force: bool = False, grace_s: float = 5.0) -> dict[str, Any]:
    """Ask ``device``'s worker to free ``ref``: holders get a detach notice and
    ``grace_s`` seconds; refused while a lease remains unless ``force``. The entry."""
    reply = await acall(worker_for(settings, device),
                        {"op": "evict", "ref": ModelRef.parse(ref).text, "force": force,
                         "grace_s": grace_s}, timeout=grace_s + QUICK_TIMEOUT)
    return dict(reply["entry"])


def evict_via_workers(ref: str, *, device: str, settings: Settings, force: bool = False,
                      grace_s: float = 5.0) -> dict[str, Any]:
    """:func:`evict_on_worker`, for synchronous callers (the CLI, tests)."""
    return run_sync(evict_on_worker(ref, device=device, settings=settings, force=force,
                                    grace_s=grace_s))
