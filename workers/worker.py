"""One worker process per device: it owns the device's resident buffers and serves them.

``python -m warmpool.workers.worker --device cuda:0`` listens on
``<runtime>/workers/cuda0.sock`` and answers framed msgpack requests
(:mod:`~warmpool.workers.protocol`):

- ``load``: stream a model (or copy it from the host tier) into ONE new buffer;
- ``attach``: the layout and a handle to that buffer (descriptors ride along). The open
  connection IS the lease: when the holder closes it or dies, the kernel closes it and
  the worker sees end-of-file — no heartbeat, no lease file to sweep;
- ``evict``: ask holders to detach (a ``detach`` notice on their connection), wait a
  bounded time, then free — or refuse while a lease remains, unless forced;
- ``status``, ``ping``; ``group_load`` / ``group_prepare`` / ``group_stream`` /
  ``group_abort`` for tensor-parallel groups (:mod:`~warmpool.workers.coordinator`); and
  ``export_begin`` / ``export_commit`` / ``export_abort``: an engine writing its processed
  parameters into a buffer of the worker (:mod:`~warmpool.workers.export`).

Every state change goes to the registry (injectable; a FileRegistry in the runtime dir by
default), with the transport in ``PoolEntry.transport``, so ``warmpool status`` sees GPU
entries beside host-tier ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from warmpool.config import Settings, parse_bytes
from warmpool.contract.keys import RedisKeys
from warmpool.contract.redis_client import connect
from warmpool.errors import LeaseHeldError, NotWarmError, ProtocolError, WarmpoolError, WorkerError
from warmpool.loading.peers import PeerSource, fill_with_peers
from warmpool.loading.seeder import Seeder, seed_forever
from warmpool.loading.streaming import fill_buffer
from warmpool.locks import try_lock
from warmpool.model.cache import MetadataCache
from warmpool.model.uri import parse_uri
from warmpool.pool.host import HostTier
from warmpool.pool.refs import ModelRef
from warmpool.pool.registry.base import PoolEntry, Registry, State
from warmpool.pool.registry.files import FileRegistry
from warmpool.threads import to_thread_joined
from warmpool.workers import discovery
from warmpool.workers.buffers import allocate
from warmpool.workers.coordinator import Groups
from warmpool.workers.devices import (
    DeviceSpec,
    cuda_free_bytes,
    device_uuid,
    normalise_uuid,
    parse_device,
)
from warmpool.workers.export import Exports
from warmpool.workers.group import staging_bytes
from warmpool.workers.process import die_with_parent, fast_exit
from warmpool.workers.promote import ARENA, PINNED, promote
from warmpool.workers.protocol import (
    AsyncChannel,
    Message,
    check_peer,
    check_socket_path,
    error_reply,
    ok,
    socket_dir,
)
from warmpool.workers.requests import Connection, LoadRequest, Reply
from warmpool.workers.residents import DeviceResident, choose_victims
from warmpool.workers.seeding import WorkerHoldings

log = logging.getLogger("warmpool.worker")

#: Kept free on the device for the CUDA context, cuBLAS workspaces and the like.
DEFAULT_HEADROOM = 512 << 20
#: GPU workers page-lock host-tier segments in the background (WARMPOOL_PIN_HOST=0: don't).
#: A worker's seeds expire this long after its last renewal (every second): a worker that
#: died stops being offered to readers within it.
SEED_TTL_S = 15.0
PIN_HOST_SEGMENTS = os.environ.get("WARMPOOL_PIN_HOST", "1") != "0"
#: How long eviction waits for holders to act on a ``detach`` notice.
DEFAULT_GRACE_S = 5.0


class Worker:
    def __init__(self, device: DeviceSpec, runtime_dir: Path, *,
                 registry: Registry | None = None, settings: Settings | None = None,
                 capacity: int | None = None, transport: str = "auto",
                 headroom: int | None = None) -> None:
        self.device = device
        self.settings = settings or Settings.load(runtime_dir=str(runtime_dir))
        self.runtime_dir = runtime_dir
        self.dir = socket_dir(runtime_dir)
        self.name = device.name
        self.uuid = device_uuid(device)
        self.socket_path = check_socket_path(self.dir / f"{self.name}.sock")
        self.registry = registry or FileRegistry(runtime_dir)
        self.host = HostTier(runtime_dir)
        self.capacity = capacity
        self.transport = transport
        self.headroom = DEFAULT_HEADROOM if headroom is None else headroom
        self.residents: dict[str, DeviceResident] = {}
        self.conns: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self.inflight: dict[str, asyncio.Future[DeviceResident]] = {}
        self._reserve_lock = asyncio.Lock()
        self.groups = Groups(self)
        self.exports = Exports(self)
        self._stop = asyncio.Event()
        self.record: discovery.WorkerRecord | None = None
        self.seeder: Seeder | None = None

    # --- lifecycle -------------------------------------------------------------------
    async def serve(self) -> None:
        """Listen until :meth:`stop`; on the way out free every buffer."""
        lock_fd = try_lock(self.dir / f"{self.name}.lock")
        if lock_fd is None:
            raise WorkerError(f"another worker already serves {self.device} in {self.dir}")
        listener = None
        try:
            await self._mark_lost("the worker serving it restarted")
            listener = self._listen()
            self.record = discovery.WorkerRecord(
                self.name, str(self.device), self.uuid, os.getpid(), str(self.socket_path),
                self.transport, self.capacity)
            discovery.write_record(self.runtime_dir, self.record)
            log.info("worker %s (%s) listening on %s", self.device, self.uuid, self.socket_path)
            locker = (asyncio.create_task(self._keep_host_segments_locked())
                      if self.device.kind == "cuda" and PIN_HOST_SEGMENTS else None)
            seeding = await self._start_seeding()
            try:
                await self._accept_until_stopped(listener)
            finally:
                if locker is not None:
                    locker.cancel()
                if seeding is not None:
                    seeding.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await seeding
                if self.seeder is not None:
                    await self.seeder.close()  # deregistered before the buffers go
                    await self.seeder.redis.aclose()
        finally:
            if listener is not None:
                listener.close()
                self.socket_path.unlink(missing_ok=True)
            if self.record is not None:
                discovery.remove_record(self.runtime_dir, self.record)
            for resident in list(self.residents.values()):
                await self._free(resident, error="the worker stopped")
            os.close(lock_fd)

    def stop(self) -> None:
        self._stop.set()

    async def _start_seeding(self) -> asyncio.Task[None] | None:
        """With peers on, ``seed_devices`` set and the fleet's Redis known, serve this
        device's warm models to other nodes: GPU to GPU where the NIC allows."""
        peers = self.settings.peers
        if not peers.enabled or not peers.seed_devices or not self.settings.redis_url:
            return None
        redis = connect(self.settings.redis_url, name=f"warmpool-worker-{self.name}")
        self.seeder = Seeder(self.settings, redis, RedisKeys(), ttl_s=SEED_TTL_S,
                             holdings=WorkerHoldings(self),
                             name=f"{self.settings.node}@{self.device}")
        await self.seeder.start()
        return asyncio.create_task(seed_forever(self.seeder, self._stop))

    async def _keep_host_segments_locked(self, every_s: float = 10.0) -> None:
        """Page-lock what the host tier holds, ahead of any promotion (see promote.py)."""
        while not self._stop.is_set():
            try:
                residents = self.host.residents()
                await asyncio.to_thread(PINNED.sync, residents, True)
                places = [r.arena for r in residents if r.arena is not None]
                if places:  # the whole arena, once (the largest place covers the rest)
                    widest = max(places, key=lambda p: max(p.chunks))
                    await asyncio.to_thread(ARENA.get, widest, True,
                                            self.host.runtime_dir)
            except Exception:  # noqa: BLE001 - best effort; promotion pins on demand anyway
                log.exception("could not page-lock the host tier's segments")
            await asyncio.sleep(every_s)

    def _listen(self) -> socket.socket:
        self.socket_path.unlink(missing_ok=True)  # a dead predecessor's; we hold the lock
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        listener.listen(128)
        listener.setblocking(False)
        return listener

    async def _accept_until_stopped(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.ensure_future(self._stop.wait())
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                accept = asyncio.ensure_future(loop.sock_accept(listener))
                done, _ = await asyncio.wait({accept, stopping},
                                             return_when=asyncio.FIRST_COMPLETED)
                if accept not in done:
                    accept.cancel()
                    return
                sock, _ = accept.result()
                task = asyncio.ensure_future(self._handle(sock))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            stopping.cancel()
            for task in tasks:
                task.cancel()
            # Let each connection release its leases before the buffers are freed.
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _mark_lost(self, why: str) -> None:
        for entry in await self.registry.list():
            if entry.device == str(self.device) and (entry.state.active or
                                                     entry.state == State.WARM):
                await self.registry.transition(entry, State.LOST, error=why, leases=0)

    # --- connections -----------------------------------------------------------------
    async def _handle(self, sock: socket.socket) -> None:
        channel = AsyncChannel(sock)
        try:
            cred = check_peer(sock)
        except ProtocolError as exc:
            log.warning("%s", exc)
            await self._send_quietly(channel, error_reply(exc))
            channel.close()
            return
        conn = Connection(next(self._ids), channel, cred.pid)
        self.conns[conn.id] = conn
        try:
            while True:
                got = await channel.recv()
                if got is None:
                    return
                message, fds = got
                for fd in fds:  # workers accept no descriptors
                    os.close(fd)
                reply = await self._dispatch(conn, message)
                try:
                    await channel.send(reply.message, reply.fds)
                finally:
                    for fd in reply.fds:
                        os.close(fd)
                if reply.after is not None:
                    await reply.after()
        except ProtocolError as exc:
            log.warning("connection from pid %d: %s", conn.pid, exc)
            await self._send_quietly(channel, error_reply(exc))
        except (ConnectionError, OSError) as exc:
            log.debug("connection from pid %d dropped: %s", conn.pid, exc)
        finally:
            await self._drop_connection(conn)
            channel.close()

    async def _send_quietly(self, channel: AsyncChannel, message: Message) -> None:
        try:
            await channel.send(message)
        except OSError:
            pass

    async def _drop_connection(self, conn: Connection) -> None:
        """The lease ends with the connection: release it and record it."""
        self.conns.pop(conn.id, None)
        for content_hash in conn.leases:
            resident = self.residents.get(content_hash)
            if resident is not None:
                resident.drop_lease(conn.id)
                await self._record_leases(resident)
        for resident, _ in conn.prepared.values():
            await self.fail(resident, WorkerError("the group's coordinator went away"))
        await self.exports.drop(conn)

    async def _dispatch(self, conn: Connection, msg: Message) -> Reply:
        handlers: dict[str, Callable[[Connection, Message], Awaitable[Reply]]] = {
            "ping": self.op_ping, "status": self.op_status, "load": self.op_load,
            "attach": self.op_attach, "evict": self.op_evict,
            "group_load": self.groups.op_group_load,
            "group_prepare": self.groups.op_group_prepare,
            "group_stream": self.groups.op_group_stream,
            "group_abort": self.groups.op_group_abort,
            "export_begin": self.exports.op_export_begin,
            "export_commit": self.exports.op_export_commit,
            "export_abort": self.exports.op_export_abort,
        }
        handler = handlers.get(str(msg.get("op")))
        try:
            if handler is None:
                raise ProtocolError(f"unknown op {msg.get('op')!r}")
            return await handler(conn, msg)
        except WarmpoolError as exc:
            return Reply(error_reply(exc))
        except Exception as exc:  # noqa: BLE001 - one bad request must not kill the worker
            log.exception("op %s failed", msg.get("op"))
            return Reply(error_reply(WorkerError(f"{type(exc).__name__}: {exc}")))

    # --- simple ops ------------------------------------------------------------------
    async def op_ping(self, conn: Connection, msg: Message) -> Reply:
        return Reply(ok(pid=os.getpid(), device=str(self.device), uuid=self.uuid))

    async def op_status(self, conn: Connection, msg: Message) -> Reply:
        return Reply(ok(pid=os.getpid(), name=self.name, device=str(self.device),
                        uuid=self.uuid, transport=self.transport, capacity=self.capacity,
                        room=self.room(), connections=len(self.conns),
                        residents=[r.summary() for r in self.residents.values()]))

    # --- loading ---------------------------------------------------------------------
    async def op_load(self, conn: Connection, msg: Message) -> Reply:
        req = LoadRequest.from_message(msg, self.settings.streamer)
        started = time.perf_counter()
        resident, fresh = await self._load_once(req)
        return Reply(ok(**self.load_summary(resident, already_warm=not fresh,
                                             seconds=time.perf_counter() - started)))

    def load_summary(self, resident: DeviceResident, **extra: Any) -> dict[str, Any]:
        return {"uri": resident.uri, "content_hash": resident.content_hash,
                "device": str(self.device), "state": "warm", "bytes": resident.nbytes,
                "tensors": len(resident.layout.slots), "transport": resident.buffer.transport,
                "loader": resident.loader, **extra}

    async def _load_once(self, req: LoadRequest) -> tuple[DeviceResident, bool]:
        """Load ``req`` unless it is warm or already loading; (resident, loaded_now)."""
        current = self.residents.get(req.content_hash)
        if current is not None and current.warm:
            return current, False
        if req.content_hash in self.inflight:
            return await asyncio.shield(self.inflight[req.content_hash]), False
        if current is not None:  # prepared or streaming as a rank of a group
            raise WorkerError(f"{req.uri} is already streaming on {self.device} for a group; "
                              "retry when it is warm")
        future: asyncio.Future[DeviceResident] = asyncio.get_running_loop().create_future()
        self.inflight[req.content_hash] = future
        try:
            resident = await self.reserve(req, world=1)
            try:
                await self.finish(resident, await self.fill(resident, req))
            except BaseException as exc:
                await self.fail(resident, exc)
                raise
            future.set_result(resident)
            return resident, True
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # marked retrieved: only waiters, if any, need it
            raise
        except BaseException:
            future.cancel()
            raise
        finally:
            del self.inflight[req.content_hash]

    async def reserve(self, req: LoadRequest, world: int,
                      engine: dict[str, Any] | None = None) -> DeviceResident:
        """Make room, allocate the buffer, record ``streaming``; nothing streamed yet.
        ``engine``: the key of an engine layout being exported into it."""
        previous = await self.registry.get(f"{req.content_hash}@{self.device}")
        entry = PoolEntry(uri=req.uri, content_hash=req.content_hash, device=str(self.device),
                          node=self.settings.node, created_at=time.time(), history=[],
                          pinned=req.pinned or bool(previous and previous.pinned),
                          engine=engine)
        entry = await self.registry.transition(entry, State.PENDING)
        try:
            layout = req.layout
            async with self._reserve_lock:
                needed = layout.total_bytes + staging_bytes(layout, self.device, world)
                await self._make_room(needed, req.uri)
                buffer = allocate(self.device, layout.total_bytes, self.transport,
                                  label=f"warmpool-{req.content_hash[:16]}")
                resident = DeviceResident(req.uri, req.content_hash, layout, buffer, entry,
                                    pinned=entry.pinned)
                self.residents[req.content_hash] = resident
        except BaseException as exc:
            await self.registry.transition(entry, State.FAILED, error=_reason(exc))
            raise
        resident.entry = await self.registry.transition(
            entry, State.STREAMING, bytes=layout.total_bytes, tensors=len(layout.slots),
            transport=buffer.transport)
        return resident

    async def fill(self, resident: DeviceResident, req: LoadRequest) -> str:
        """Fill from the host tier when the model is warm there, else from storage."""
        target = resident.buffer.tensor
        assert target is not None
        host = self.host.resident(req.content_hash)
        # Chunks of the host arena go to the next model once evicted: the copy holds a
        # lease, as a serving process would (a segment of its own stays valid while
        # mapped, and needs none).
        lease = (await asyncio.to_thread(self.host.lease, host, "promote")
                 if host and host.arena else None)  # may wait for an evict's lock
        if host is not None and (host.arena is None or lease is not None):
            try:
                await to_thread_joined(promote, host, req.layout, target, PINNED,
                                       self.host.runtime_dir)
                return "host"
            except FileNotFoundError:
                log.info("host copy of %s vanished; streaming instead", req.content_hash[:12])
            finally:
                if lease is not None:
                    lease.release()
        # The listing the client planned from (its cache entry, named by the hash) pins
        # the version: a source replaced mid-stream fails instead of mixing versions.
        cached = MetadataCache(self.settings.cache_dir).load(req.content_hash)

        async def from_store(files: list[str] | None) -> str:
            return await fill_buffer(parse_uri(req.uri), req.layout, target,
                                     options=req.options,
                                     loader=req.loader,  # type: ignore[arg-type]
                                     pins=cached.objects if cached is not None else None,
                                     files=files)

        if not self.settings.peers.enabled or not self.settings.redis_url:
            return await from_store(None)
        # Peers straight into this device's buffer: NIXL reads a peer's host (or device)
        # memory into ours, so a model warm on another node never passes through this
        # node's host tier (GPUDirect RDMA where the NIC has it).
        redis = connect(self.settings.redis_url, name=f"warmpool-worker-{self.name}")
        try:
            peers = PeerSource(redis, RedisKeys(), self.settings.node, self.settings.peers,
                               agent_name=f"{self.settings.node}@{self.device}")
            filled = await fill_with_peers(peers, await peers.seeds(req.content_hash),
                                           req.layout, target, from_store)
        finally:
            await redis.aclose()
        resident.peer_bytes = filled.peer_bytes
        return filled.loader

    async def finish(self, resident: DeviceResident, loader: str) -> None:
        resident.buffer.seal()
        resident.warm = True
        resident.loader = loader
        resident.entry = await self.registry.transition(resident.entry, State.WARM, error=None,
                                                        loader=loader,
                                                        peer_bytes=resident.peer_bytes)

    async def fail(self, resident: DeviceResident, exc: BaseException) -> None:
        if self.residents.get(resident.content_hash) is resident:
            del self.residents[resident.content_hash]
        resident.buffer.free()
        resident.entry = await self.registry.transition(resident.entry, State.FAILED,
                                                        error=_reason(exc))

    # --- capacity --------------------------------------------------------------------
    def room(self) -> int:
        """Bytes a new buffer may take now, before any eviction."""
        used = sum(r.nbytes for r in self.residents.values())
        if self.device.is_cuda:
            free = cuda_free_bytes(self.device.index) - self.headroom
        else:
            # memfd pages are taken as they are written: count buffers still filling.
            filling = sum(r.nbytes for r in self.residents.values() if not r.warm)
            free = _mem_available() - filling - self.headroom
        if self.capacity is not None:
            free = min(free, self.capacity - used)
        return max(0, free)

    async def _make_room(self, needed: int, who: str) -> None:
        victims = choose_victims(self.residents.values(), needed, self.room(), who=who,
                                 device=str(self.device))
        for victim in victims:
            log.info("evicting %s from %s to make room for %s", victim.uri, self.device, who)
            await self._free(victim)

    # --- attach and leases -----------------------------------------------------------
    def find(self, ref: str) -> DeviceResident:
        wanted = ModelRef.canonical(ref)  # the client parsed the user's text
        matches = [r for r in self.residents.values()
                   if r.warm and wanted.matches(r.uri, r.content_hash)]
        if not matches:
            raise NotWarmError(f"{ref} is not warm on {self.device}: run `warmpool prefetch "
                               f"{ref} --device {self.device}` first")
        return max(matches, key=lambda r: r.created_at)

    async def op_attach(self, conn: Connection, msg: Message) -> Reply:
        wanted = msg.get("device_uuid")
        if wanted is not None and normalise_uuid(str(wanted)) != normalise_uuid(self.uuid):
            raise WorkerError(f"this worker serves {self.device} ({self.uuid}), not {wanted}")
        resident = self.find(str(msg.get("ref", "")))
        export = resident.buffer.export()
        resident.add_lease(conn.id)
        conn.leases.add(resident.content_hash)
        conn.holder = str(msg.get("holder", ""))[:200]
        message = ok(uri=resident.uri, content_hash=resident.content_hash,
                     layout=resident.layout.to_json(), transport=resident.buffer.transport,
                     handle=export.handle, device=str(self.device), uuid=self.uuid,
                     engine=resident.entry.engine)
        return Reply(message, export.fds, after=lambda: self._record_leases(resident))

    async def _record_leases(self, resident: DeviceResident) -> None:
        if self.residents.get(resident.content_hash) is not resident:
            return
        resident.entry = replace(resident.entry, leases=len(resident.leases),
                                 last_attached_at=resident.last_attached)
        await self.registry.put(resident.entry)

    # --- eviction --------------------------------------------------------------------
    async def op_evict(self, conn: Connection, msg: Message) -> Reply:
        resident = self.find(str(msg.get("ref", "")))
        force = bool(msg.get("force", False))
        grace = min(float(msg.get("grace_s", DEFAULT_GRACE_S)), 600.0)
        if resident.leases:
            await self._ask_to_detach(resident, grace)
        if resident.leases and not force:
            raise LeaseHeldError(
                f"{resident.uri} on {self.device} still has {len(resident.leases)} live "
                f"lease(s) after asking them to detach for {grace:g} s; evict with --force "
                "to free it anyway (holders keep their own mapping)")
        entry = await self._free(resident)
        return Reply(ok(entry=entry.to_json()))

    async def _ask_to_detach(self, resident: DeviceResident, grace: float) -> None:
        notice = {"notice": "detach", "content_hash": resident.content_hash,
                  "uri": resident.uri, "deadline_s": grace}
        for conn_id in list(resident.leases):
            conn = self.conns.get(conn_id)
            if conn is not None:
                await self._send_quietly(conn.channel, notice)
        try:
            await asyncio.wait_for(resident.released.wait(), grace)
        except TimeoutError:
            pass

    async def _free(self, resident: DeviceResident, error: str | None = None) -> PoolEntry:
        """Drop the worker's buffer; holders (if forced) keep their mapping until they
        drop it (cuda-vmm, shm-fd) — the memory returns when the last one does."""
        self.residents.pop(resident.content_hash, None)
        if self.seeder is not None:  # no peer may read it once it is freed
            await self.seeder.drop(resident.content_hash)
        for conn_id in resident.leases:
            conn = self.conns.get(conn_id)
            if conn is not None:
                conn.leases.discard(resident.content_hash)
        resident.buffer.free()
        resident.entry = await self.registry.transition(resident.entry, State.EVICTED,
                                                        error=error, leases=0)
        return resident.entry

def _reason(exc: BaseException) -> str:
    if isinstance(exc, (KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
        return "interrupted"
    return str(exc) if isinstance(exc, WarmpoolError) else f"{type(exc).__name__}: {exc}"


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# --- the process -------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m warmpool.workers.worker",
                                     description="Serve one device's resident buffers.")
    parser.add_argument("--device", required=True, help="cuda:N or cpu:N")
    parser.add_argument("--runtime-dir", default=None)
    parser.add_argument("--capacity", default=None, help="Most bytes to hold, e.g. 60GiB.")
    parser.add_argument("--headroom", default=None, help="Bytes left free on the device.")
    parser.add_argument("--transport", default="auto",
                        choices=["auto", "cuda-vmm", "cuda-ipc", "shm-fd"])
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="Exit when this process (the supervisor) dies.")
    return parser.parse_args(argv)


async def run_worker(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.serve()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # runai-model-streamer sets its logger's level from this variable when imported
    # (INFO otherwise, whatever the root logger says); it is imported on first load.
    os.environ.setdefault("RUNAI_STREAMER_LOG_LEVEL", args.log_level.upper())
    settings = Settings.load(runtime_dir=args.runtime_dir)

    async def start() -> None:
        worker = Worker(parse_device(args.device), settings.runtime_dir, settings=settings,
                        capacity=parse_bytes(args.capacity), transport=args.transport,
                        headroom=parse_bytes(args.headroom))
        await run_worker(worker)

    asyncio.run(start())
    fast_exit(0)


if __name__ == "__main__":
    main()
