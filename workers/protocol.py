"""The wire between serving processes and workers: framed msgpack over a Unix socket.

A frame is a 4-byte big-endian length and a msgpack *map*. Nothing is ever pickled: a
pickle from a socket runs whatever code its sender chose, and the sockets here carry
handles to every model on the node. Messages are bounded (:data:`MAX_MESSAGE`); a length
over the bound is refused before a byte of the body is buffered, so a confused or hostile
peer cannot make a worker allocate gigabytes.

File descriptors (a shared-memory segment, a CUDA VMM allocation) travel beside a frame
with ``SCM_RIGHTS``. The kernel attaches them to the first byte of the frame they were
sent with, but one ``recvmsg`` may return the tail of an earlier frame too, so received
descriptors go into one FIFO and a frame takes as many as its ``_fds`` field says: order
on a stream socket makes that pairing exact.

Trust rests on three checks, as vLLM's weight-cache daemon does them: the socket lives
in a directory that only we can enter (:func:`socket_dir` refuses one with the wrong
owner or mode rather than repairing it — someone else may already have swapped the
socket), both ends check the other's uid with ``SO_PEERCRED`` (:func:`check_peer`), and
every message is size-bounded and must decode to a map.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from warmpool.config import private_dir
from warmpool.errors import ConfigError, ProtocolError, WorkerError

#: Largest message body. A 291-tensor layout is about 40 KB; 1 MiB leaves room for
#: models with thousands of tensors while bounding what a peer can make us buffer.
MAX_MESSAGE = 1 << 20
#: The kernel's limit on descriptors in one SCM_RIGHTS message (SCM_MAX_FD).
MAX_FDS = 253
#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107

_LENGTH = struct.Struct(">I")
_UCRED = struct.Struct("3i")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_RECV_BYTES = 1 << 16


Message = dict[str, Any]


# --- encoding ------------------------------------------------------------------------


def encode(message: Message, nfds: int = 0) -> bytes:
    """One frame: length prefix + msgpack map (``_fds`` records attached descriptors)."""
    if not isinstance(message, dict):
        raise ProtocolError(f"a message must be a map, not {type(message).__name__}")
    if not 0 <= nfds <= MAX_FDS:
        raise ProtocolError(f"cannot send {nfds} descriptors in one message (max {MAX_FDS})")
    body = msgpack.packb({**message, "_fds": nfds} if nfds else message, use_bin_type=True)
    if len(body) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {MAX_MESSAGE}-byte bound")
    return _LENGTH.pack(len(body)) + body


def decode_body(body: bytes) -> Message:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True,
                                  max_bin_len=MAX_MESSAGE, max_str_len=MAX_MESSAGE)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types
        raise ProtocolError(f"malformed message: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"a message must be a map, got {type(message).__name__}")
    return message


class FrameDecoder:
    """Bytes and descriptors in, whole messages out; no I/O of its own (sans-IO), so the
    blocking client and the asyncio worker share every rule."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buffer = bytearray()
        self._fds: deque[int] = deque()

    @property
    def pending(self) -> bool:
        return bool(self._buffer)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        self._fds.extend(fds)
        self._buffer += data
        if len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > self.max_message:
                # Refused on the prefix alone: the body is never buffered.
                raise ProtocolError(f"peer announced a {length}-byte message; the bound is "
                                    f"{self.max_message}")

    def next(self) -> tuple[Message, list[int]] | None:
        """The next complete message and its descriptors, or None if more bytes are needed."""
        if len(self._buffer) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(self._buffer)
        if len(self._buffer) < _LENGTH.size + length:
            return None
        body = bytes(self._buffer[_LENGTH.size : _LENGTH.size + length])
        del self._buffer[: _LENGTH.size + length]
        message = decode_body(body)
        nfds = message.pop("_fds", 0)
        if not isinstance(nfds, int) or not 0 <= nfds <= MAX_FDS:
            raise ProtocolError(f"bad descriptor count {nfds!r}")
        if nfds > len(self._fds):
            raise ProtocolError(f"message announces {nfds} descriptors, {len(self._fds)} arrived")
        return message, [self._fds.popleft() for _ in range(nfds)]

    def close(self) -> None:
        """Close descriptors nobody claimed (a peer that sent more than it announced)."""
        while self._fds:
            os.close(self._fds.popleft())


def _recv_with_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One ``recvmsg``; descriptors come back as ints we now own."""
    data, ancdata, flags, _ = sock.recvmsg(_RECV_BYTES, socket.CMSG_SPACE(MAX_FDS * 4))
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints = array.array("i")
            ints.frombytes(payload[: len(payload) - len(payload) % ints.itemsize])
            fds.extend(ints)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise ProtocolError("descriptors were truncated in transit")
    return data, fds


def _send_part(sock: socket.socket, view: memoryview, fds: Sequence[int]) -> int:
    if fds:
        return sock.sendmsg([view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", fds))])
    return sock.send(view)


# --- peers and places ----------------------------------------------------------------


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCred(*_UCRED.unpack(raw))


def check_peer(sock: socket.socket) -> PeerCred:
    """The peer's credentials, or :class:`ProtocolError` if it runs as another user.

    The directory's mode already keeps other users out; this is the second lock, for a
    directory made reachable by mistake (a bind mount, a container sharing /run).
    """
    cred = peer_cred(sock)
    ours = os.getuid()
    if cred.uid != ours:
        raise ProtocolError(f"refusing peer pid {cred.pid}: uid {cred.uid} is not ours ({ours})")
    return cred


def socket_dir(runtime_dir: Path) -> Path:
    """``<runtime_dir>/workers``: created 0700, or refused if its owner or mode is wrong."""
    private_dir(runtime_dir)
    return private_dir(runtime_dir / "workers", repair=False)


def check_socket_path(path: Path) -> Path:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ConfigError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes; "
                          "use a shorter runtime dir (WARMPOOL_RUNTIME_DIR)")
    return path


# --- blocking channel (serving processes, the CLI) -------------------------------------


class Channel:
    """A blocking framed connection; the client side of every exchange."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder()

    @classmethod
    def connect(cls, path: Path, timeout: float | None = 10.0) -> Channel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(path))
            check_peer(sock)  # the worker must be ours too, not an impostor's socket
        except OSError as exc:
            sock.close()
            raise WorkerError(f"cannot reach the worker at {path}: {exc.strerror or exc} "
                              "(is it running? `warmpool workers status`)") from exc
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def send(self, message: Message, fds: Sequence[int] = ()) -> None:
        view = memoryview(encode(message, len(fds)))
        pending = list(fds)
        while view:
            sent = _send_part(self.sock, view, pending)
            pending = []  # ancillary data goes with the first bytes only
            view = view[sent:]

    def recv(self, timeout: float | None = None) -> tuple[Message, list[int]] | None:
        """The next message, or None at a clean end of stream."""
        self.sock.settimeout(timeout)
        while True:
            got = self.decoder.next()
            if got is not None:
                return got
            data, fds = _recv_with_fds(self.sock)
            if not data:
                for fd in fds:
                    os.close(fd)
                if self.decoder.pending:
                    raise ProtocolError("connection closed in the middle of a message")
                return None
            self.decoder.feed(data, fds)

    def request(self, message: Message, timeout: float | None = None) -> tuple[Message, list[int]]:
        """Send, then wait for the reply, skipping notices; raises the worker's error."""
        self.send(message)
        while True:
            got = self.recv(timeout)
            if got is None:
                raise WorkerError("the worker closed the connection without replying (did it "
                                  "die? see `warmpool workers status`)")
            reply, fds = got
            if "notice" in reply:
                continue
            raise_for_error(reply, fds)
            return reply, fds

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.decoder.close()


# --- asyncio channel (the worker) -----------------------------------------------------


@dataclass
class AsyncChannel:
    """A framed connection on the worker's event loop. Sends are serialised by a lock so a
    notice (``detach``) never interleaves with a reply on the same connection."""

    sock: socket.socket
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    _send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.sock.setblocking(False)

    @classmethod
    async def connect(cls, path: Path) -> AsyncChannel:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, str(path))
            check_peer(sock)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def _wait(self, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self.sock.fileno()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        (loop.add_writer if writable else loop.add_reader)(fd, wake)
        try:
            await ready
        finally:
            (loop.remove_writer if writable else loop.remove_reader)(fd)

    async def recv(self) -> tuple[Message, list[int]] | None:
        while True:
            got = self.decoder.next()
            if got is not None:
                return got
            try:
                data, fds = _recv_with_fds(self.sock)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=False)
                continue
            except ConnectionResetError:
                data, fds = b"", []
            if not data:
                if self.decoder.pending:
                    raise ProtocolError("connection closed in the middle of a message")
                return None
            self.decoder.feed(data, fds)

    async def send(self, message: Message, fds: Sequence[int] = ()) -> None:
        view = memoryview(encode(message, len(fds)))
        async with self._send_lock:
            pending = list(fds)
            while view:
                try:
                    sent = _send_part(self.sock, view, pending)
                except (BlockingIOError, InterruptedError):
                    await self._wait(writable=True)
                    continue
                pending = []
                view = view[sent:]

    async def request(self, message: Message) -> Message:
        await self.send(message)
        while True:
            got = await self.recv()
            if got is None:
                raise WorkerError("the worker closed the connection without replying (did "
                                  "it die? see `warmpool workers status`)")
            reply, fds = got
            for fd in fds:
                os.close(fd)
            if "notice" not in reply:
                raise_for_error(reply, [])
                return reply

    def close(self) -> None:
        self.sock.close()
        self.decoder.close()


# --- replies and errors ---------------------------------------------------------------


def ok(**fields: Any) -> Message:
    return {"ok": True, **fields}


#: The fields of warmpool's errors that travel with them (the caller acts on them:
#: ``missing`` lists what to upload, ``key``/``file`` name the culprit, ``needed``/``free``
#: say how much to evict), and the plain types each may take.
ERROR_FIELDS: dict[str, tuple[type, ...]] = {
    "key": (str, type(None)), "file": (str,), "tensor": (str, type(None)),
    "missing": (list,), "needed": (int,), "free": (int,),
}


def error_reply(exc: BaseException) -> Message:
    """An error as plain fields; the client rebuilds the same class by name."""
    err: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    for attr, types in ERROR_FIELDS.items():
        value = getattr(exc, attr, None)
        if hasattr(exc, attr) and isinstance(value, types):
            err[attr] = list(map(str, value)) if isinstance(value, list) else value
    return {"ok": False, "error": err}


def raise_for_error(reply: Message, fds: Sequence[int] = ()) -> None:
    if reply.get("ok"):
        return
    for fd in fds:
        os.close(fd)
    raise rebuild_error(reply.get("error") or {})


def rebuild_error(err: Any) -> Exception:
    """The error a reply describes: the same warmpool class, message and fields.

    The instance is built without its constructor (several format their message from
    their fields, which would say it twice); a type that is not a warmpool error, or a
    field of the wrong type, becomes a :class:`WorkerError` that names it.
    """
    from warmpool import errors

    if not isinstance(err, dict):
        return errors.WorkerError(f"worker failed: malformed error {err!r:.200}")
    name, text = str(err.get("type", "WorkerError")), str(err.get("message", "unknown error"))
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.WarmpoolError)):
        return errors.WorkerError(f"worker failed: {name}: {text}")
    fields = {attr: err[attr] for attr in ERROR_FIELDS if attr in err}
    for attr, value in fields.items():
        if not isinstance(value, ERROR_FIELDS[attr]) or isinstance(value, bool):
            return errors.WorkerError(f"worker failed: {name}: {text} (bad {attr!r} field)")
    if "missing" in fields:
        fields["missing"] = [str(m) for m in fields["missing"]]
    exc: Exception = cls.__new__(cls)
    Exception.__init__(exc, text)
    defaults: dict[str, Any] = {"key": None, "tensor": None, "missing": [], "needed": 0,
                                "free": 0, "file": ""}
    for attr in _constructor_fields(cls):
        setattr(exc, attr, fields.get(attr, defaults[attr]))
    return exc


def _constructor_fields(cls: type) -> list[str]:
    """The :data:`ERROR_FIELDS` that ``cls``'s constructor sets (its keyword arguments)."""
    init = next((vars(c)["__init__"] for c in cls.__mro__ if "__init__" in vars(c)), None)
    code = getattr(init, "__code__", None)  # None: Exception's own constructor
    params = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount] if code else ()
    return [attr for attr in ERROR_FIELDS if attr in params]
