"""The one small interface every storage backend implements.

Keys handed to and returned by a :class:`Store` are *relative* to the model prefix
(``config.json``, ``sub/model-00001-of-00004.safetensors``): the rest of warmpool never
sees bucket names or absolute paths, and every key coming back from a listing is checked
by :func:`validate_relative_key` before it can become a file name.

:class:`ObjectStore` is the part the object stores (S3, GCS, Azure) share — the paged
listing, retried reads and downloads, and the mapping of HTTP statuses and service error
codes to :mod:`warmpool.errors` — so that a backend only names its client library's calls
and errors.
"""

from __future__ import annotations

import abc
import asyncio
import posixpath
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import ClassVar, NoReturn, TypeVar

from warmpool.errors import (
    AccessDeniedError,
    ObjectChangedError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
    UnsafeKeyError,
)
from warmpool.model.uri import ModelURI
from warmpool.retry import DEFAULT_BACKOFF, Backoff, retry_async

T = TypeVar("T")

#: Downloads are streamed to disk in pieces of this size, never whole into memory.
DOWNLOAD_CHUNK = 1 << 20


@dataclass(frozen=True, order=True)
class ObjectInfo:
    """One object under a model prefix: relative key, size in bytes, etag or generation."""

    key: str
    size: int
    etag: str


def validate_relative_key(key: str) -> str:
    """Return ``key`` if it is a safe relative path, else raise :class:`UnsafeKeyError`.

    Object stores allow any byte string as a key; a key such as ``../../etc/passwd`` or
    ``/root/.ssh/x`` must never become a path under the cache directory.
    """
    if not key or "\x00" in key or "\\" in key:
        raise UnsafeKeyError(f"unsafe object key {key!r}", key=key)
    if key.startswith("/") or posixpath.isabs(key):
        raise UnsafeKeyError(f"absolute object key {key!r} refused", key=key)
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafeKeyError(f"object key {key!r} has an empty, '.' or '..' segment", key=key)
    return key


class Store(abc.ABC):
    """Async access to the objects under one model prefix.

    Implementations retry transient failures themselves (see :mod:`warmpool.retry`) and
    translate backend errors into :mod:`warmpool.errors` classes that name the key.
    """

    #: Objects per list page (each service's maximum by default); tests lower it.
    page_size: int = 1000
    #: Retry schedule for every call; tests shorten it.
    backoff: Backoff = DEFAULT_BACKOFF
    #: The client library's exceptions that :meth:`_raise` translates; others propagate.
    sdk_errors: ClassVar[tuple[type[BaseException], ...]] = (TimeoutError, ConnectionError)

    def __init__(self, uri: ModelURI, *, page_size: int | None = None,
                 backoff: Backoff | None = None) -> None:
        self.uri = uri
        #: key -> etag of the listed version: reads of a pinned key must return that
        #: version's bytes (backends that can make the server check it do; see pin()).
        self.pins: dict[str, str] = {}
        if page_size is not None:
            self.page_size = page_size
        if backoff is not None:
            self.backoff = backoff

    @abc.abstractmethod
    async def list(self) -> list[ObjectInfo]:
        """Every object under the prefix (all pages), sorted by key."""

    @abc.abstractmethod
    async def read_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes of ``key`` from ``start``; fewer only at the end of the object."""

    @abc.abstractmethod
    async def download(self, key: str, dest: Path) -> int:
        """Stream ``key`` into the file ``dest`` (created or truncated); return the bytes."""

    def _raise(self, exc: BaseException, key: str) -> NoReturn:
        """Re-raise a client library's ``exc`` as a :mod:`warmpool.errors` class naming
        ``key``: transient (retried) or permanent (not)."""
        raise exc

    async def _call(self, key: str, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op`` with warmpool's retries, translating SDK errors on every attempt."""

        async def attempt() -> T:
            try:
                return await op()
            except self.sdk_errors as exc:
                self._raise(exc, key)

        return await retry_async(attempt, what=f"{what} {self.uri.child(key)}",
                                 backoff=self.backoff)

    def pin(self, objects: Iterable[ObjectInfo]) -> None:
        """Read these objects at the listed version from now on: a backend whose server
        can compare the version on every read (S3's ``If-Match``) fails a read of a
        replaced object with :class:`ObjectChangedError` instead of returning new bytes."""
        self.pins = {o.key: o.etag for o in objects}

    async def read_into(self, key: str, start: int, out: memoryview) -> None:
        """Fill ``out`` from ``key`` at ``start``; backends may override to avoid a copy."""
        data = await self.read_range(key, start, len(out))
        if len(data) != len(out):
            raise StorageError(
                f"{self.uri.child(key)}: short read at {start}: wanted {len(out)}, got {len(data)}",
                key=key,
            )
        out[:] = data

    async def read_scattered(self, key: str, start: int, length: int,
                             pieces: Sequence[tuple[int, int]], out: memoryview) -> int:
        """Read ``length`` bytes of ``key`` from ``start`` and lay them into ``out``:
        ``pieces`` are (offset in ``out``, bytes), consecutive in the object. Returns the
        bytes read (fewer only at the end of the object). Backends that can stream
        override it so the bytes are copied once, from the socket into ``out``."""
        data = await self.read_range(key, start, length)
        Scatter(pieces, out).write(memoryview(data))
        return len(data)

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class Scatter:
    """Where the next bytes of a ranged read go: through ``pieces`` of ``out``, in order.
    A retried read starts over (:meth:`restart`); it writes the same bytes again."""

    def __init__(self, pieces: Sequence[tuple[int, int]], out: memoryview) -> None:
        self.pieces = pieces
        self.out = out
        self.restart()

    def restart(self) -> None:
        self.index = 0  # the piece being written
        self.within = 0  # bytes of it written
        self.total = 0

    def write(self, data: memoryview) -> None:
        at = 0
        while at < len(data):
            if self.index >= len(self.pieces):
                raise ValueError("a ranged read returned more bytes than it asked for")
            dst, nbytes = self.pieces[self.index]
            n = min(nbytes - self.within, len(data) - at)
            self.out[dst + self.within:dst + self.within + n] = data[at:at + n]
            at += n
            self.within += n
            if self.within == nbytes:
                self.index, self.within = self.index + 1, 0
        self.total += len(data)


@dataclass(frozen=True)
class Listed:
    """One object of a listing page, named in full (``models/llama/config.json``)."""

    name: str
    size: int
    etag: str


@dataclass(frozen=True)
class Failure:
    """A client library's exception in the terms :meth:`ObjectStore._raise` maps.

    ``status`` is the HTTP status (0 without a response), ``code`` the service's error code
    (``NoSuchKey``, ``ContainerNotFound``), ``network`` true when no answer came at all
    (refused, reset, timed out): a retry may cure that.
    """

    status: int = 0
    code: str = ""
    message: str = ""
    network: bool = False


class ObjectStore(Store):
    """A bucket (or container) of an object store, reached through its client library.

    A backend implements four hooks — one listing page, one ranged GET, one download and
    :meth:`_failure` — and names its service's error codes; the listing loop, the retries
    and the error classes are the same for every service.
    """

    #: What the service calls a bucket and an object, for error messages.
    container_word: ClassVar[str] = "bucket"
    object_word: ClassVar[str] = "object"
    #: Error codes that mean the bucket itself is missing, the object is missing, the
    #: caller may not read it, or the service is busy (so a retry may succeed).
    missing_container_codes: ClassVar[frozenset[str]] = frozenset()
    not_found_codes: ClassVar[frozenset[str]] = frozenset()
    denied_codes: ClassVar[frozenset[str]] = frozenset()
    transient_codes: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    async def _list_page(self, token: str | None) -> tuple[list[Listed], str | None]:
        """One page of the objects under the prefix (at most :attr:`page_size`) and the
        next page's token, ``None`` after the last."""

    @abc.abstractmethod
    async def _get_range(self, name: str, start: int, length: int) -> bytes:
        """One ranged GET of the object ``name``; ``b""`` when ``start`` is at or past
        its end."""

    @abc.abstractmethod
    async def _download_to(self, name: str, dest: Path) -> int:
        """One streamed GET of ``name`` into ``dest`` (:func:`stream_to_file`)."""

    @abc.abstractmethod
    def _failure(self, exc: BaseException) -> Failure:
        """What ``exc``, one of :attr:`sdk_errors`, says went wrong."""

    async def list(self) -> list[ObjectInfo]:
        """All pages; each page is retried on its own, so a transient failure on page
        400 of a huge prefix does not restart the listing. Names ending in ``/`` are the
        "directory" markers consoles and sync tools write, not objects."""
        found: list[ObjectInfo] = []
        token: str | None = None
        prefix = self.uri.prefix
        while True:
            page, token = await self._call("", "list", partial(self._list_page, token))
            for obj in page:
                if obj.name.endswith("/") or not obj.name.startswith(prefix):
                    continue
                found.append(ObjectInfo(validate_relative_key(obj.name[len(prefix):]),
                                        obj.size, obj.etag))
            if not token:
                return sorted(found)

    def _name(self, key: str) -> str:
        return self.uri.join(validate_relative_key(key))

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        name = self._name(key)
        if length <= 0:
            return b""
        return await self._call(key, "read", lambda: self._get_range(name, start, length))

    async def read_scattered(self, key: str, start: int, length: int,
                             pieces: Sequence[tuple[int, int]], out: memoryview) -> int:
        if length <= 0:
            return 0
        stream = getattr(self, "_get_range_into", None)
        if stream is None:
            return await super().read_scattered(key, start, length, pieces, out)
        name, sink = self._name(key), Scatter(pieces, out)

        async def once() -> int:
            sink.restart()
            await stream(name, start, length, sink)
            return sink.total

        return await self._call(key, "read", once)

    async def download(self, key: str, dest: Path) -> int:
        """Stream the object into ``dest`` a chunk at a time; a retry starts the file over."""
        name = self._name(key)
        return await self._call(key, "download", lambda: self._download_to(name, dest))

    def _raise(self, exc: BaseException, key: str) -> NoReturn:
        where = self.uri.child(key)
        f = self._failure(exc)
        label = f.code or (f"HTTP {f.status}" if f.status else type(exc).__name__)
        reason = f"{label}: {f.message[:300] or 'no message'}"
        if f.status == 412 or f.code in ("PreconditionFailed", "ConditionNotMet"):
            raise ObjectChangedError(f"{where} changed since it was listed (it is no longer "
                                     f"version {self.pins.get(key)!r})", key=key) from exc
        if f.code in self.missing_container_codes or (f.status == 404 and not key):
            # a listing (no key) that is not found lacks its bucket, never an object
            raise ObjectNotFoundError(f"{where}: no such {self.container_word} "
                                      f"{self.uri.bucket!r} ({reason})", key=key) from exc
        if f.code in self.not_found_codes or f.status == 404:
            raise ObjectNotFoundError(f"{where}: no such {self.object_word} ({reason})",
                                      key=key) from exc
        if f.code in self.denied_codes or f.status in (401, 403):
            raise AccessDeniedError(f"{where}: access denied ({reason})", key=key) from exc
        if f.network or f.code in self.transient_codes or f.status in (408, 429) \
                or f.status >= 500:
            raise TransientStorageError(f"{where}: {reason}", key=key) from exc
        raise StorageError(f"{where}: {reason}", key=key) from exc


async def read_full(read: Callable[[int], Awaitable[bytes]], size: int) -> bytes:
    """Up to ``size`` bytes from a stream whose ``read(n)`` may return less than ``n``
    before the end, so that each disk write is a whole chunk rather than a socket buffer."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        part = await read(size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


async def stream_to_file(read: Callable[[int], Awaitable[bytes]], dest: Path) -> int:
    """Copy a response body into ``dest`` a chunk at a time; never whole into memory."""
    done = 0
    f = await asyncio.to_thread(dest.open, "wb")  # a slow cache disk must not stall the loop
    try:
        while chunk := await read_full(read, DOWNLOAD_CHUNK):
            await asyncio.to_thread(f.write, chunk)
            done += len(chunk)
    finally:
        await asyncio.to_thread(f.close)
    return done
