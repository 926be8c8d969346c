"""Amazon S3 and S3-compatible servers (MinIO, Ceph RGW, SeaweedFS, moto) via aiobotocore.

Configuration comes from the usual AWS variables and files, so the same deployment works
against AWS and against an in-cluster server: ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL`` selects a server (and path-style addressing, which such servers
need), the region defaults to ``us-east-1`` when nothing names one. botocore's own
retries are switched off: :func:`warmpool.retry.retry_async` retries every call, so a
dead endpoint costs one predictable backoff schedule instead of two nested ones.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import botocore.exceptions as bce
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from warmpool.errors import (
    AccessDeniedError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
)
from warmpool.retry import Backoff
from warmpool.storage.base import ObjectInfo, Store, stream_to_file, validate_relative_key
from warmpool.model.uri import ModelURI


_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_DENIED = {
    "AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "AllAccessDisabled", "AccountProblem",
}
_TRANSIENT = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
}
# Network-level failures a retry can cure. SSLError is a ConnectionError subclass but a
# certificate problem is configuration, so it is excluded below.
_NETWORK = (
    bce.ConnectionError, bce.HTTPClientError, bce.IncompleteReadError,
    aiohttp.ClientError, TimeoutError, ConnectionError,
)


_loader: Any = None


def _new_session() -> Any:
    """A fresh session (it reads credentials and variables now) sharing one data loader:
    parsing botocore's S3 service model costs ~0.1 s, the rest of a client ~15 ms."""
    global _loader
    session = get_session()
    if _loader is None:
        _loader = session.get_component("data_loader")
    else:
        session.register_component("data_loader", _loader)
    return session


def _endpoint_url(service: str = "s3") -> str | None:
    return (os.environ.get(f"AWS_ENDPOINT_URL_{service.upper()}")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def aws_client(service: str, *, region: str | None = None, **config: Any) -> Any:
    """An aiobotocore client context manager for ``service`` (``s3``, ``sqs``), configured
    as every warmpool AWS client is: credentials from the usual chain,
    ``AWS_ENDPOINT_URL_<SERVICE>`` or ``AWS_ENDPOINT_URL`` for a compatible server, the
    region ``region`` (a resource names its own), else from the environment or the profile,
    else ``us-east-1``; botocore's retries off (callers retry on their own schedule)."""
    session = _new_session()
    region = (region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
              or session.get_config_variable("region") or "us-east-1")
    options: dict[str, Any] = {"retries": {"total_max_attempts": 1, "mode": "standard"},
                               "connect_timeout": 10, "read_timeout": 60, **config}
    return session.create_client(service, region_name=region,
                                 endpoint_url=_endpoint_url(service), config=AioConfig(**options))


class S3Store(Store):
    """One aiobotocore client per store, opened on first use and closed by :meth:`close`."""

    sdk_errors = (bce.BotoCoreError, bce.ClientError, aiohttp.ClientError,
                  TimeoutError, ConnectionError)

    def __init__(self, uri: ModelURI, *, page_size: int | None = None,
                 backoff: Backoff | None = None) -> None:
        super().__init__(uri, page_size=page_size, backoff=backoff)
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._client_lock = asyncio.Lock()

    async def _s3(self) -> Any:
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    self._client = await self._stack.enter_async_context(self._create_client())
        return self._client

    @staticmethod
    def _create_client() -> Any:
        path_style = {"addressing_style": "path"} if _endpoint_url() else None
        return aws_client("s3", s3=path_style, max_pool_connections=64)

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None

    # --- error translation -----------------------------------------------------------

    def _raise(self, exc: BaseException, key: str) -> NoReturn:
        where = self.uri.child(key)
        if isinstance(exc, bce.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            reason = f"{code or status}: {err.get('Message') or 'no message'}"
            if code == "NoSuchBucket":
                raise ObjectNotFoundError(f"{where}: no such bucket {self.uri.bucket!r} "
                                          f"({reason})", key=key) from exc
            if code in _NOT_FOUND or status == 404:
                raise ObjectNotFoundError(f"{where}: no such object ({reason})", key=key) from exc
            if code in _DENIED or status in (401, 403):
                raise AccessDeniedError(f"{where}: access denied ({reason})", key=key) from exc
            if code in _TRANSIENT or status == 429 or status >= 500:
                raise TransientStorageError(f"{where}: {reason}", key=key) from exc
            raise StorageError(f"{where}: {reason}", key=key) from exc
        if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError)):
            raise AccessDeniedError(f"{where}: no usable AWS credentials ({exc})", key=key) from exc
        if isinstance(exc, _NETWORK) and not isinstance(exc, bce.SSLError):
            raise TransientStorageError(
                f"{where}: {type(exc).__name__}: {exc or 'timed out'}", key=key) from exc
        raise StorageError(f"{where}: {type(exc).__name__}: {exc}", key=key) from exc

    # --- the Store interface -------------------------------------------------------------

    async def list(self) -> list[ObjectInfo]:
        """All pages of ListObjectsV2; each page is retried on its own, so a transient
        failure on page 400 of a huge prefix does not restart the listing."""
        s3 = await self._s3()
        found: list[ObjectInfo] = []
        token: str | None = None
        plen = len(self.uri.prefix)
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.uri.bucket, "Prefix": self.uri.prefix,
                                      "MaxKeys": self.page_size}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._call("", "list", partial(s3.list_objects_v2, **kwargs))
            for obj in page.get("Contents", []):
                full: str = obj["Key"]
                if full.endswith("/") or not full.startswith(self.uri.prefix):
                    continue  # "directory" markers written by consoles and sync tools
                key = validate_relative_key(full[plen:])
                found.append(ObjectInfo(key, int(obj["Size"]), str(obj.get("ETag", "")).strip('"')))
            token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if not token:
                return sorted(found)

    async def _get(self, key: str, range_header: str | None) -> Any:
        s3 = await self._s3()
        kwargs: dict[str, Any] = {"Bucket": self.uri.bucket, "Key": self.uri.join(
            validate_relative_key(key))}
        if range_header:
            kwargs["Range"] = range_header
        return await s3.get_object(**kwargs)

    async def _read_range_once(self, key: str, start: int, length: int) -> bytes:
        try:
            resp = await self._get(key, f"bytes={start}-{start + length - 1}")
        except bce.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""  # start at or past the end of the object
            raise
        async with resp["Body"] as body:
            data: bytes = await body.read()
        return data

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        return await self._call(key, "read", lambda: self._read_range_once(key, start, length))

    async def _download_once(self, key: str, dest: Path) -> int:
        resp = await self._get(key, None)
        async with resp["Body"] as body:
            return await stream_to_file(body.read, dest)

    async def download(self, key: str, dest: Path) -> int:
        """Stream the object into ``dest`` a chunk at a time; a retry starts the file over."""
        return await self._call(key, "download", lambda: self._download_once(key, dest))

