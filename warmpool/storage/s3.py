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
from pathlib import Path
from typing import Any

import aiohttp
import botocore.exceptions as bce
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from warmpool.model.uri import ModelURI
from warmpool.retry import Backoff
from warmpool.storage.base import Failure, Listed, ObjectStore, Scatter, stream_to_file

# Network-level failures a retry can cure. SSLError is a ConnectionError subclass but a
# certificate problem is configuration, so it is excluded below.
_NETWORK = (
    bce.ConnectionError, bce.HTTPClientError, bce.IncompleteReadError,
    aiohttp.ClientError, TimeoutError, ConnectionError,
)


_loader: Any = None


def _new_session() -> Any:
    """A fresh session (it reads credentials and variables now) sharing one data loader:
    parsing botocore's S3 service model is most of the cost of a client."""
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


class S3Store(ObjectStore):
    """One aiobotocore client per store, opened on first use and closed by :meth:`close`."""

    missing_container_codes = frozenset({"NoSuchBucket"})
    not_found_codes = frozenset({"NoSuchKey", "404", "NotFound"})
    denied_codes = frozenset({
        "AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
        "InvalidToken", "AllAccessDisabled", "AccountProblem", "NoCredentials"})
    transient_codes = frozenset({
        "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
        "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "RequestLimitExceeded",
        "TooManyRequests"})

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

    # --- the client library's calls and errors ------------------------------------------

    def _failure(self, exc: BaseException) -> Failure:
        if isinstance(exc, bce.ClientError):
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return Failure(int(status or 0), str(err.get("Code", "")),
                           str(err.get("Message") or ""))
        if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError)):
            return Failure(code="NoCredentials", message=f"no usable AWS credentials ({exc})")
        return Failure(message=str(exc) or "timed out",
                       network=isinstance(exc, _NETWORK) and not isinstance(exc, bce.SSLError))

    async def _list_page(self, token: str | None) -> tuple[list[Listed], str | None]:
        s3 = await self._s3()
        kwargs: dict[str, Any] = {"Bucket": self.uri.bucket, "Prefix": self.uri.prefix,
                                  "MaxKeys": self.page_size}
        if token:
            kwargs["ContinuationToken"] = token
        page = await s3.list_objects_v2(**kwargs)
        found = [Listed(obj["Key"], int(obj["Size"]), str(obj.get("ETag", "")).strip('"'))
                 for obj in page.get("Contents", [])]
        return found, page.get("NextContinuationToken") if page.get("IsTruncated") else None

    async def _get(self, name: str, range_header: str | None) -> Any:
        s3 = await self._s3()
        kwargs: dict[str, Any] = {"Bucket": self.uri.bucket, "Key": name}
        if range_header:
            kwargs["Range"] = range_header
        etag = self.pins.get(name[len(self.uri.prefix):])
        if etag:  # the server refuses (412) the bytes of any other version
            kwargs["IfMatch"] = f'"{etag}"'
        return await s3.get_object(**kwargs)

    async def _get_range(self, name: str, start: int, length: int) -> bytes:
        try:
            resp = await self._get(name, f"bytes={start}-{start + length - 1}")
        except bce.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""  # start at or past the end of the object
            raise
        async with resp["Body"] as body:
            data: bytes = await body.read()
        return data

    async def _get_range_into(self, name: str, start: int, length: int, sink: Scatter) -> None:
        """The range straight from the socket's chunks into ``sink``: ``body.read()``
        would join them into one new bytes object first, a second copy of every byte,
        on the event loop (0.6 s of CPU per GB on a 2-core VM: docs/findings.md)."""
        try:
            resp = await self._get(name, f"bytes={start}-{start + length - 1}")
        except bce.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return  # start at or past the end of the object
            raise
        async with resp["Body"] as body:
            content = getattr(body.raw_stream, "content", None)
            if not isinstance(content, aiohttp.StreamReader):
                sink.write(memoryview(await body.read()))
                return
            while True:
                chunk, _ = await content.readchunk()
                if not chunk:
                    break
                sink.write(memoryview(chunk))
        expected = int(resp.get("ContentLength", sink.total))
        if sink.total != expected:
            raise bce.IncompleteReadError(actual_bytes=sink.total, expected_bytes=expected)

    async def _download_to(self, name: str, dest: Path) -> int:
        resp = await self._get(name, None)
        async with resp["Body"] as body:
            return await stream_to_file(body.read, dest)
