"""Google Cloud Storage via gcloud-aio-storage (aiohttp underneath, no gRPC, no threads).

An emulator is reached through ``STORAGE_EMULATOR_HOST`` (``http://host:port``), which
gcloud-aio-storage reads itself: it then sends no credentials and skips TLS checks.
The etag of an object is its *generation*: GCS assigns a new one on every overwrite,
which is exactly the "bytes changed" signal the content hash needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from gcloud.aio.storage import Storage

from warmpool.model.uri import ModelURI
from warmpool.retry import Backoff
from warmpool.storage.base import Failure, Listed, ObjectStore, stream_to_file

# gcloud-aio's default is a 10 s *total* timeout, which would abort any download that
# takes longer than 10 s; bound connecting and each socket read instead.
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)


class GCSStore(ObjectStore):
    """One gcloud-aio ``Storage`` (one aiohttp session) per store, opened on first use.

    GCS answers a missing bucket and a missing object alike (HTTP 404, no code)."""

    object_word = "bucket or object"

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

    # --- the client library's calls and errors ------------------------------------------

    def _failure(self, exc: BaseException) -> Failure:
        if isinstance(exc, aiohttp.ClientResponseError):
            return Failure(exc.status, message=str(exc.message))
        return Failure(message=str(exc) or "timed out",
                       network=isinstance(exc, (aiohttp.ClientError, TimeoutError,
                                                ConnectionError)))

    async def _list_page(self, token: str | None) -> tuple[list[Listed], str | None]:
        params = {"maxResults": str(self.page_size),
                  "fields": "items(name,size,generation),nextPageToken"}
        if self.uri.prefix:
            params["prefix"] = self.uri.prefix
        if token:
            params["pageToken"] = token
        page: dict[str, Any] = await self._gcs().list_objects(
            self.uri.bucket, params=params, timeout=_TIMEOUT)  # type: ignore[arg-type]
        found = [Listed(item["name"], int(item["size"]), str(item["generation"]))
                 for item in page.get("items", [])]
        return found, page.get("nextPageToken") or None

    async def _get_range(self, name: str, start: int, length: int) -> bytes:
        try:
            return await self._gcs().download(
                self.uri.bucket, name, headers={"Range": f"bytes={start}-{start + length - 1}"},
                timeout=_TIMEOUT)  # type: ignore[arg-type]
        except aiohttp.ClientResponseError as exc:
            if exc.status == 416:
                return b""  # start at or past the end of the object
            raise

    async def _download_to(self, name: str, dest: Path) -> int:
        stream = await self._gcs().download_stream(
            self.uri.bucket, name, timeout=_TIMEOUT)  # type: ignore[arg-type]
        async with stream:
            return await stream_to_file(stream.read, dest)
