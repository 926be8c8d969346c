"""Tensor-parallel groups from the worker's side: coordinating one, and being a rank.

A client sends ``group_load`` to the first device's worker, which coordinates in two
phases over the other workers' sockets: ``group_prepare`` (every rank makes room and
allocates — or refuses, and then every prepared rank undoes, so no rank is left holding
half a group), then ``group_stream`` (the ranks that lack the model stream it together,
see :mod:`~warmpool.workers.group`). A rank's prepared buffer belongs to the
coordinator's connection: if the coordinator goes away before streaming, it is freed.

Group loads are serialised node-wide by a file lock: two coordinators forming
overlapping groups at once would each wait on the other's ranks until the timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from warmpool.errors import CapacityError, ProtocolError, WarmpoolError, WorkerError
from warmpool.loading.streaming import choose_loader
from warmpool.locks import async_file_lock
from warmpool.model.uri import parse_uri
from warmpool.threads import to_thread_joined
from warmpool.workers.group import (
    DEFAULT_TIMEOUT_S,
    RankRun,
    backend_for,
    master_store,
    stream_rank,
)
from warmpool.workers.protocol import AsyncChannel, Message, ok
from warmpool.workers.requests import Connection, LoadRequest, Reply
from warmpool.workers.residents import DeviceResident

if TYPE_CHECKING:
    from warmpool.workers.worker import Worker


class Groups:
    """The group operations of one worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.lock = asyncio.Lock()  # torch.distributed has one default group per process

    async def op_group_load(self, conn: Connection, msg: Message) -> Reply:
        """Coordinate a replicated load over this worker (rank 0) and ``peers``."""
        req = LoadRequest.from_message(msg, self.worker.settings.streamer)
        peers = [self._peer_socket(p) for p in msg.get("peers") or []]
        timeout_s = float(msg.get("timeout_s", DEFAULT_TIMEOUT_S))
        started = time.perf_counter()
        # Node-wide: two coordinators forming overlapping groups at once would each wait
        # for the other's ranks until the timeout.
        async with async_file_lock(self.worker.dir / "group.lock"):
            channels = [await AsyncChannel.connect(p) for p in peers]
            try:
                ranks = await self._run_group(req, channels, timeout_s)
            finally:
                for channel in channels:
                    channel.close()
        resident = self.worker.residents[req.content_hash]
        summary = self.worker.load_summary(
            resident, seconds=time.perf_counter() - started, ranks=ranks,
            already_warm=all(r["already_warm"] for r in ranks))
        return Reply(ok(**summary))

    def _peer_socket(self, path: object) -> Path:
        candidate = Path(str(path))
        if candidate.parent != self.worker.dir or candidate.suffix != ".sock":
            raise ProtocolError(f"peer socket {candidate} is not a worker socket in "
                                f"{self.worker.dir}")
        return candidate

    async def _run_group(self, req: LoadRequest, channels: list[AsyncChannel],
                         timeout_s: float) -> list[dict[str, Any]]:
        """Phase 1: every rank makes room and allocates (or refuses: then every rank
        undoes). Phase 2: the ranks that lack the model stream it together."""
        # Decided before anything is allocated: a refusal here leaves nothing to undo.
        # A model already on the host tier is promoted rank by rank instead (no reads).
        loader = choose_loader(parse_uri(req.uri), req.loader,  # type: ignore[arg-type]
                               group=True)
        distribute = loader == "runai" and self.worker.host.resident(req.content_hash) is None
        mine, prepared = await self._prepare_group(req, channels)
        todo = [i for i, ready in enumerate(prepared) if ready]  # the others hold it already
        results = await self._stream_group(req, channels, mine, todo,
                                           distribute and len(todo) > 1, timeout_s)
        return [{"rank": i, "already_warm": i not in results, **results.get(i, {})}
                for i in range(1 + len(channels))]

    async def _prepare_group(self, req: LoadRequest, channels: list[AsyncChannel]
                             ) -> tuple[DeviceResident | None, list[bool]]:
        world = 1 + len(channels)
        prepare = {"op": "group_prepare", **req.to_message(),
                   "backend": backend_for(self.worker.device), "world": world}
        outcomes = await asyncio.gather(
            self._group_prepare_local(req, world),
            *(ch.request(prepare) for ch in channels), return_exceptions=True)
        mine = outcomes[0]
        if any(isinstance(o, BaseException) for o in outcomes):
            await self._abort_group(req, mine, channels, outcomes[1:])
            raise _group_error(list(enumerate(outcomes)))
        peers = [bool(o.get("prepared")) for o in outcomes[1:]]  # type: ignore[union-attr]
        return mine, [mine is not None, *peers]  # type: ignore[return-value]

    async def _stream_group(self, req: LoadRequest, channels: list[AsyncChannel],
                            mine: DeviceResident | None, todo: list[int], distributed: bool,
                            timeout_s: float) -> dict[int, dict[str, Any]]:
        """Stream on the ranks in ``todo``: as one distributed group, or each alone."""
        backend = backend_for(self.worker.device)
        store = master_store(len(todo), timeout_s) if distributed else None
        runs = []
        for new_rank, i in enumerate(todo):
            run = RankRun(new_rank if distributed else 0, len(todo) if distributed else 1,
                          store.port if store is not None else 0, backend, timeout_s)
            if i == 0:
                assert mine is not None
                runs.append(self._group_stream(mine, req, run))
            else:
                runs.append(channels[i - 1].request(
                    {"op": "group_stream", "content_hash": req.content_hash,
                     "rank": run.rank, "world": run.world, "port": run.port,
                     "backend": backend, "timeout_s": timeout_s}))
        results = await asyncio.gather(*runs, return_exceptions=True)
        del store  # the rendezvous outlives every rank's run
        if any(isinstance(r, BaseException) for r in results):
            raise _group_error(list(zip(todo, results, strict=True)))
        return {i: {k: v for k, v in r.items() if k != "ok"}  # type: ignore[union-attr]
                for i, r in zip(todo, results, strict=True)}

    async def _group_prepare_local(self, req: LoadRequest, world: int) -> DeviceResident | None:
        current = self.worker.residents.get(req.content_hash)
        if current is not None and current.warm:
            return None
        if current is not None or req.content_hash in self.worker.inflight:
            raise WorkerError(f"{req.uri} is already streaming on {self.worker.device}")
        return await self.worker.reserve(req, world)

    async def _abort_group(self, req: LoadRequest, mine: object, channels: list[AsyncChannel],
                           outcomes: Sequence[object]) -> None:
        if isinstance(mine, DeviceResident):
            await self.worker.fail(mine,
                                   WorkerError("group load aborted: another rank refused"))
        for channel, outcome in zip(channels, outcomes, strict=True):
            if isinstance(outcome, dict) and outcome.get("prepared"):
                try:
                    await channel.request({"op": "group_abort",
                                           "content_hash": req.content_hash})
                except (WarmpoolError, OSError):
                    pass

    async def _group_stream(self, resident: DeviceResident, req: LoadRequest,
                            run: RankRun) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            if run.world == 1:
                loader, read_bytes = await self.worker.fill(resident, req), None
            else:
                async with self.lock:
                    target = resident.buffer.tensor
                    if target is None:  # evicted between prepare and now
                        raise WorkerError(f"{req.uri}: its buffer was freed before streaming")
                    result = await to_thread_joined(
                        stream_rank, parse_uri(req.uri), req.layout, target,
                        device=self.worker.device, run=run, options=req.options)
                loader, read_bytes = "runai-distributed", result.read_bytes
            await self.worker.finish(resident, loader)
        except BaseException as exc:
            await self.worker.fail(resident, exc)
            raise
        return {"device": str(self.worker.device), "loader": loader,
                "read_bytes": read_bytes, "seconds": round(time.perf_counter() - started, 4)}

    async def op_group_prepare(self, conn: Connection, msg: Message) -> Reply:
        req = LoadRequest.from_message(msg, self.worker.settings.streamer)
        if msg.get("backend") != backend_for(self.worker.device):
            raise WorkerError(f"{self.worker.device} cannot join a {msg.get('backend')} group")
        resident = await self._group_prepare_local(req, int(msg.get("world", 1)))
        if resident is None:
            return Reply(ok(prepared=False, device=str(self.worker.device)))
        conn.prepared[req.content_hash] = (resident, req)
        return Reply(ok(prepared=True, device=str(self.worker.device)))

    async def op_group_stream(self, conn: Connection, msg: Message) -> Reply:
        prepared = conn.prepared.pop(str(msg.get("content_hash")), None)
        if prepared is None:
            raise ProtocolError("group_stream without a prepared rank on this connection")
        run = RankRun(int(msg["rank"]), int(msg["world"]), int(msg["port"]),
                      str(msg["backend"]), float(msg.get("timeout_s", DEFAULT_TIMEOUT_S)))
        return Reply(ok(**await self._group_stream(*prepared, run)))

    async def op_group_abort(self, conn: Connection, msg: Message) -> Reply:
        prepared = conn.prepared.pop(str(msg.get("content_hash")), None)
        if prepared is not None:
            await self.worker.fail(prepared[0],
                                   WorkerError("group load aborted: another rank refused"))
        return Reply(ok())


def _group_error(outcomes: list[tuple[int, object]]) -> WarmpoolError:
    """The first rank failure, with its rank; CapacityError keeps its numbers."""
    for rank, outcome in outcomes:
        if isinstance(outcome, CapacityError):
            return CapacityError(f"rank {rank}: {outcome}", needed=outcome.needed,
                                 free=outcome.free)
    text = "; ".join(f"rank {r}: {o}" for r, o in outcomes if isinstance(o, BaseException))
    return WorkerError(f"group load failed: {text}")
