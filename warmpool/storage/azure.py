"""Azure Blob Storage via ``azure.storage.blob.aio`` (``az://container/prefix/``).

Credentials: ``AZURE_STORAGE_CONNECTION_STRING`` (Azurite, account keys, SAS) or, without
it, ``AZURE_STORAGE_ACCOUNT_URL`` with ``DefaultAzureCredential`` when azure-identity is
installed (managed identity, workload identity, ``az login``). The SDK's own retry
policy is switched off in favour of :func:`warmpool.retry.retry_async`, so one schedule
applies to every backend. The release runai-model-streamer cannot read from Azurite,
so ``az://`` weights may come through :meth:`AzureStore.read_into`: it copies each
chunk straight into the caller's buffer instead of building the range as one ``bytes``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    IncompleteReadError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob.aio import BlobServiceClient, ContainerClient

from warmpool.errors import ConfigError, StorageError
from warmpool.model.uri import ModelURI
from warmpool.retry import Backoff
from warmpool.storage.base import DOWNLOAD_CHUNK, Failure, Listed, ObjectStore

# Every GET asks for at most this much. The SDK's default first GET is 32 MiB, and while
# it iterates it holds up to four chunks at once (docs/findings.md), so
# smaller chunks keep a download's memory small and independent of the blob's size.
_GET_SIZE = 2 * DOWNLOAD_CHUNK
_CLIENT_OPTIONS: dict[str, Any] = {
    "retry_total": 0,
    "max_single_get_size": _GET_SIZE,
    "max_chunk_get_size": _GET_SIZE,
    "connection_timeout": 10,
    "read_timeout": 60,
}


class AzureStore(ObjectStore):
    """One ``BlobServiceClient`` per store, opened on first use and closed by :meth:`close`."""

    container_word = "container"
    object_word = "blob"
    missing_container_codes = frozenset({"ContainerNotFound"})

    sdk_errors = (AzureError, aiohttp.ClientError, TimeoutError, ConnectionError)

    page_size = 5000  # the service's maximum

    def __init__(self, uri: ModelURI, *, page_size: int | None = None,
                 backoff: Backoff | None = None) -> None:
        super().__init__(uri, page_size=page_size, backoff=backoff)
        self._stack = AsyncExitStack()
        self._container_client: ContainerClient | None = None
        self._client_lock = asyncio.Lock()

    async def _container(self) -> ContainerClient:
        if self._container_client is None:
            async with self._client_lock:
                if self._container_client is None:
                    service = await self._stack.enter_async_context(self._service_client())
                    self._container_client = service.get_container_client(self.uri.bucket)
        return self._container_client

    def _service_client(self) -> BlobServiceClient:
        conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        if conn:
            try:
                return BlobServiceClient.from_connection_string(conn, **_CLIENT_OPTIONS)
            except ValueError as exc:  # the message never repeats the string (it holds keys)
                raise ConfigError(f"AZURE_STORAGE_CONNECTION_STRING is malformed: {exc}") from None
        account_url = os.environ.get("AZURE_STORAGE_ACCOUNT_URL")
        if not account_url:
            raise ConfigError(
                f"{self.uri}: set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_URL "
                "with azure-identity installed")
        try:
            from azure.identity.aio import DefaultAzureCredential
        except ImportError:
            raise ConfigError(
                f"{self.uri}: AZURE_STORAGE_ACCOUNT_URL needs azure-identity for "
                "DefaultAzureCredential (pip install azure-identity), or set "
                "AZURE_STORAGE_CONNECTION_STRING") from None
        credential = DefaultAzureCredential()
        self._stack.push_async_callback(credential.close)
        return BlobServiceClient(account_url, credential=credential, **_CLIENT_OPTIONS)

    async def close(self) -> None:
        await self._stack.aclose()
        self._container_client = None

    # --- the client library's calls and errors ------------------------------------------

    def _failure(self, exc: BaseException) -> Failure:
        status = getattr(exc, "status_code", None) or 0
        if not status and isinstance(exc, ResourceNotFoundError):
            status = 404
        if not status and isinstance(exc, ClientAuthenticationError):
            status = 401
        return Failure(status, getattr(exc, "error_code", None) or "",
                       str(exc).splitlines()[0] if str(exc) else "",
                       network=isinstance(exc, (ServiceRequestError, ServiceResponseError,
                                                IncompleteReadError, aiohttp.ClientError,
                                                TimeoutError, ConnectionError)))

    async def _list_page(self, token: str | None) -> tuple[list[Listed], str | None]:
        container = await self._container()
        pages: Any = container.list_blobs(name_starts_with=self.uri.prefix or None,
                                          results_per_page=self.page_size).by_page(token)
        try:
            page = await pages.__anext__()
        except StopAsyncIteration:
            return [], None
        found = [Listed(b.name, int(b.size), str(b.etag).strip('"')) async for b in page]
        return found, pages.continuation_token

    async def _chunks(self, name: str, start: int | None, length: int | None
                      ) -> AsyncIterator[bytes]:
        blob = (await self._container()).get_blob_client(name)
        try:
            downloader = await blob.download_blob(offset=start, length=length, max_concurrency=1)
        except HttpResponseError as exc:
            if exc.status_code == 416:
                return  # start at or past the end of the blob
            raise
        async for chunk in downloader.chunks():
            yield chunk

    async def _get_range(self, name: str, start: int, length: int) -> bytes:
        return b"".join([c async for c in self._chunks(name, start, length)])

    async def _read_into_once(self, key: str, start: int, out: memoryview) -> None:
        done = 0
        async for chunk in self._chunks(self._name(key), start, len(out)):
            out[done:done + len(chunk)] = chunk
            done += len(chunk)
        if done != len(out):
            raise StorageError(f"{self.uri.child(key)}: blob ended at {start + done}, "
                               f"{len(out) - done} bytes short", key=key)

    async def read_into(self, key: str, start: int, out: memoryview) -> None:
        if len(out):
            await self._call(key, "read", lambda: self._read_into_once(key, start, out))

    async def _download_to(self, name: str, dest: Path) -> int:
        done = 0
        f = await asyncio.to_thread(dest.open, "wb")
        try:
            async for chunk in self._chunks(name, None, None):
                await asyncio.to_thread(f.write, chunk)
                done += len(chunk)
        finally:
            await asyncio.to_thread(f.close)
        return done
