"""Google Cloud Storage via gcloud-aio-storage (aiohttp underneath, no gRPC, no threads).

An emulator is reached through ``STORAGE_EMULATOR_HOST`` (``http://host:port``), which
gcloud-aio-storage reads itself: it then sends no credentials and skips TLS checks.
The etag of an object is its *generation*: GCS assigns a new one on every overwrite,
which is exactly the "bytes changed" signal the content hash needs.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
from gcloud.aio.storage import Storage

from warmpool.errors import (
    AccessDeniedError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
)
from warmpool.retry import Backoff
from warmpool.storage.base import ObjectInfo, Store, stream_to_file, validate_relative_key
from warmpool.model.uri import ModelURI


# gcloud-aio's default is a 10 s *total* timeout, which would abort any download that
# takes longer than 10 s; bound connecting and each socket read instead.
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)


class GCSStore(Store):
    """One gcloud-aio ``Storage`` (one aiohttp session) per store, opened on first use."""

    sdk_errors = (aiohttp.ClientError, TimeoutError, ConnectionError)

    def __init__(self, uri: ModelURI, *, page_size: int | None = None,
                 backoff: Backoff | None = None) -> None:
        super().__init__(uri, page_size=page_size, backoff=backoff)
        self._storage: Storage | None = None

    def _gcs(self) -> Storage:
        if self._storage is None:
            self._storage = Storage()  # api_root from STORAGE_EMULATOR_HOST when set
        return self._storage

    async def close(self) -> None:
        if self._storage is not None:
            storage, self._storage = self._storage, None
            await storage.close()

    # --- error translation -----------------------------------------------------------

    def _raise(self, exc: BaseException, key: str) -> NoReturn:
        where = self.uri.child(key)
        if isinstance(exc, aiohttp.ClientResponseError):
            status = exc.status
            reason = f"HTTP {status}: {str(exc.message)[:300]}"
            if status == 404:
                what = "no such bucket or object" if key else f"no such bucket {self.uri.bucket!r}"
                raise ObjectNotFoundError(f"{where}: {what} ({reason})", key=key) from exc
            if status in (401, 403):
                raise AccessDeniedError(f"{where}: access denied ({reason})", key=key) from exc
            if status in (408, 429) or status >= 500:
                raise TransientStorageError(f"{where}: {reason}", key=key) from exc
            raise StorageError(f"{where}: {reason}", key=key) from exc
        if isinstance(exc, (aiohttp.ClientError, TimeoutError, ConnectionError)):
            raise TransientStorageError(
                f"{where}: {type(exc).__name__}: {exc or 'timed out'}", key=key) from exc
        raise StorageError(f"{where}: {type(exc).__name__}: {exc}", key=key) from exc

    # --- the Store interface -------------------------------------------------------------

    async def list(self) -> list[ObjectInfo]:
        """All pages (``pageToken``); each page is retried on its own."""
        gcs = self._gcs()
        found: list[ObjectInfo] = []
        token = ""
        plen = len(self.uri.prefix)
        while True:
            params = {"maxResults": str(self.page_size),
                      "fields": "items(name,size,generation),nextPageToken"}
            if self.uri.prefix:
                params["prefix"] = self.uri.prefix
            if token:
                params["pageToken"] = token
            page: dict[str, Any] = await self._call(
                "", "list", partial(gcs.list_objects, self.uri.bucket, params=params,
                                    timeout=_TIMEOUT))  # type: ignore[arg-type]
            for item in page.get("items", []):
                full: str = item["name"]
                if full.endswith("/") or not full.startswith(self.uri.prefix):
                    continue  # "folder" placeholders made by the console and gsutil
                key = validate_relative_key(full[plen:])
                found.append(ObjectInfo(key, int(item["size"]), str(item["generation"])))
            token = page.get("nextPageToken") or ""
            if not token:
                return sorted(found)

    async def _read_range_once(self, key: str, start: int, length: int) -> bytes:
        try:
            return await self._gcs().download(
                self.uri.bucket, self.uri.join(validate_relative_key(key)),
                headers={"Range": f"bytes={start}-{start + length - 1}"},
                timeout=_TIMEOUT)  # type: ignore[arg-type]
        except aiohttp.ClientResponseError as exc:
            if exc.status == 416:
                return b""  # start at or past the end of the object
            raise

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        return await self._call(key, "read", lambda: self._read_range_once(key, start, length))

    async def _download_once(self, key: str, dest: Path) -> int:
        stream = await self._gcs().download_stream(
            self.uri.bucket, self.uri.join(validate_relative_key(key)),
            timeout=_TIMEOUT)  # type: ignore[arg-type]
        async with stream:
            return await stream_to_file(stream.read, dest)

    async def download(self, key: str, dest: Path) -> int:
        """Stream the object into ``dest`` a chunk at a time; a retry starts the file over."""
        return await self._call(key, "download", lambda: self._download_once(key, dest))

