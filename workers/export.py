"""Engine-layout exports from the worker's side: an engine writes its processed
parameters straight into a buffer of the worker (device to device on a GPU).

Three ops, bound to one connection (:class:`~warmpool.workers.requests.Connection`):

- ``export_begin``: reply ``already_warm`` when the entry is, else reserve room exactly
  as a load does (capacity check, eviction of unleased models, :class:`CapacityError`
  before any byte is written), allocate, record the entry ``streaming`` with its engine
  key, and hand back a WRITABLE handle (an unsealed memfd for ``cpu:N``; the same
  VMM/IPC handle attach uses on CUDA, mapped read-write by the exporter);
- ``export_commit``: the exporter has copied every tensor and dropped its mapping:
  seal, and record the entry ``warm`` (loader ``export:<engine>``);
- ``export_abort``, or the connection ending before the commit (the engine crashed):
  free the buffer, record ``failed`` ("export abandoned ...").

A second export of the same entry while one is open waits for it: it gets
``already_warm`` when the first commits, and becomes the writer when the first is
abandoned. A connection cannot wait on its own export (that would never end).
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

from warmpool.errors import ProtocolError, WarmpoolError, WorkerError
from warmpool.model.uri import parse_uri
from warmpool.pool.engine_key import EngineKey
from warmpool.pool.layout import Layout
from warmpool.pool.refs import looks_like_hash
from warmpool.pool.registry.base import State
from warmpool.workers.buffers import ShmFdBuffer
from warmpool.workers.protocol import Message, ok
from warmpool.workers.requests import Connection, LoadRequest, Reply
from warmpool.workers.residents import DeviceResident

if TYPE_CHECKING:
    from warmpool.workers.worker import Worker

#: The longest reason an exporter may give for an abort (it is stored in the registry).
MAX_REASON = 500


@dataclass(frozen=True)
class ExportRequest:
    """``export_begin``'s fields, checked as untrusted input: the layout, the key and the
    URI's fragment must all name the same entry."""

    uri: str
    content_hash: str
    layout: Layout
    key: EngineKey

    @classmethod
    def from_message(cls, msg: Message) -> ExportRequest:
        try:
            layout = Layout.from_json(msg["layout"])
            key = EngineKey.from_json(dict(msg["engine"]))
            uri, content_hash = str(msg["uri"]), str(msg["content_hash"])
            checkpoint_uri, sep, label = uri.rpartition("#")
            parse_uri(checkpoint_uri)
        except WarmpoolError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed export request: {exc!r}") from None
        if not looks_like_hash(content_hash) or not (
                layout.content_hash == key.content_hash == content_hash):
            raise ProtocolError("export request: content_hash, layout and engine key disagree")
        if not sep or label != key.label():
            raise ProtocolError(f"export request: URI {uri!r} must end in '#{key.label()}'")
        return cls(uri, content_hash, layout, key)


class Exports:
    """The export operations of one worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def op_export_begin(self, conn: Connection, msg: Message) -> Reply:
        req = ExportRequest.from_message(msg)
        if req.content_hash in conn.exports:
            raise ProtocolError(f"this connection is already exporting {req.uri}")
        current = await self._wait_for_other_writer(req.content_hash)
        if current is not None:
            return Reply(ok(already_warm=True, entry=current.entry.to_json()))
        resident = await self._reserve(req)
        try:
            handle = resident.buffer.export_writable()
        except BaseException as exc:
            await self._settle(resident, exc)
            raise
        conn.exports[req.content_hash] = resident
        return Reply(ok(already_warm=False, transport=resident.buffer.transport,
                        handle=handle.handle, device=str(self.worker.device),
                        uuid=self.worker.uuid), handle.fds)

    async def _wait_for_other_writer(self, content_hash: str) -> DeviceResident | None:
        """The warm resident, or None once nobody else is writing it."""
        while True:
            current = self.worker.residents.get(content_hash)
            if current is not None and current.warm:
                return current
            pending = self.worker.inflight.get(content_hash)
            if pending is None:
                if current is not None:  # a rank of a group load
                    raise WorkerError(f"{current.uri} is already being written on "
                                      f"{self.worker.device}; retry when it is warm")
                return None
            try:
                await asyncio.shield(pending)
            except Exception:  # noqa: BLE001 - the other writer gave up: this one may take over
                pass

    async def _reserve(self, req: ExportRequest) -> DeviceResident:
        """Room and a buffer, as a load gets them; the entry is in flight from here on,
        so a second exporter (or a load) of it waits."""
        future: asyncio.Future[DeviceResident] = asyncio.get_running_loop().create_future()
        self.worker.inflight[req.content_hash] = future
        try:
            return await self.worker.reserve(LoadRequest(req.uri, req.content_hash, req.layout),
                                             world=1, engine=req.key.to_json())
        except BaseException as exc:
            _settle_future(future, exc)
            del self.worker.inflight[req.content_hash]
            raise

    async def op_export_commit(self, conn: Connection, msg: Message) -> Reply:
        resident = conn.exports.pop(str(msg.get("content_hash")), None)
        if resident is None:
            raise ProtocolError("export_commit without an export_begin of that hash on this "
                                "connection")
        engine = dict(resident.entry.engine or {})
        loader = f"export:{engine.get('engine', '?')}"
        try:
            _seal(resident)
            resident.warm = True
            resident.loader = loader
            resident.entry = await self.worker.registry.transition(
                resident.entry, State.WARM, error=None, loader=loader,
                tensors=len(resident.layout.slots), engine=engine)
        except BaseException as exc:
            await self._settle(resident, exc)
            raise
        await self._settle(resident, None)
        return Reply(ok(already_warm=False, entry=resident.entry.to_json()))

    async def op_export_abort(self, conn: Connection, msg: Message) -> Reply:
        resident = conn.exports.pop(str(msg.get("content_hash")), None)
        if resident is not None:
            reason = str(msg.get("reason") or "no reason given")[:MAX_REASON]
            await self._settle(resident, WorkerError(f"export abandoned by the exporter: "
                                                     f"{reason}"))
            return Reply(ok(entry=resident.entry.to_json()))
        return Reply(ok())

    async def drop(self, conn: Connection) -> None:
        """The connection ended: what it began and did not commit is abandoned."""
        exports, conn.exports = conn.exports, {}
        for resident in exports.values():
            await self._settle(resident, WorkerError(
                f"export abandoned: the exporter (pid {conn.pid}) closed its connection "
                "before export_commit"))

    async def _settle(self, resident: DeviceResident, exc: BaseException | None) -> None:
        """End the export: on failure free the buffer and record why; wake the waiters."""
        if exc is not None:
            await self.worker.fail(resident, exc)
        future = self.worker.inflight.pop(resident.content_hash, None)
        if future is not None:
            _settle_future(future, exc, resident)


def _seal(resident: DeviceResident) -> None:
    """Seal the buffer; an exporter still mapping it writable makes that impossible
    (memfd: EBUSY), and an unsealed buffer must never be served."""
    buffer = resident.buffer
    try:
        buffer.seal()
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        raise WorkerError(f"export of {resident.uri}: the buffer is still mapped writable "
                          "(by the exporter or a process it shared it with); release "
                          "every writable mapping before export_commit") from None
    if isinstance(buffer, ShmFdBuffer) and not buffer.sealed:
        raise WorkerError(f"export of {resident.uri}: the worker could not seal the buffer")


def _settle_future(future: asyncio.Future[DeviceResident], exc: BaseException | None,
                   resident: DeviceResident | None = None) -> None:
    if future.done():
        return
    if exc is None:
        assert resident is not None
        future.set_result(resident)
    elif isinstance(exc, Exception):
        future.set_exception(exc)
        future.exception()  # marked retrieved: only waiters, if any, need it
    else:
        future.cancel()
