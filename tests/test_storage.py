"""One behavioural suite for every storage backend, run against real servers.

Each test takes the ``backend`` fixture (tests/servers.py): local files, S3 (moto),
GCS (gcp-storage-emulator) and Azure (Azurite) must all behave the same way, because
the content hash, the metadata cache and the Azure weight fallback build on these calls.
"""

from __future__ import annotations

import importlib
import os
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.servers import Backend, Server, azurite_connection_string, free_port
from warmpool.errors import (
    AccessDeniedError,
    ConfigError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
    UnsafeKeyError,
)
from warmpool.model.uri import ModelURI, parse_uri
from warmpool.retry import Backoff
from warmpool.storage import Store, open_store

#: Short enough that a test never waits, long enough to count the attempts.
FAST = Backoff(attempts=4, base=0.001, cap=0.002)
RETRIED = {"s3", "gs", "az"}  # object stores; local reads are not retried


def small_store(uri: ModelURI) -> Store:
    """A store with two-object list pages and an instant retry schedule."""
    store = open_store(uri)
    store.page_size = 2  # type: ignore[attr-defined]
    store.backoff = FAST  # type: ignore[attr-defined]
    return store


def count_attempts(monkeypatch: pytest.MonkeyPatch, scheme: str) -> list[str]:
    """Record every attempt a backend makes through ``retry_async`` (the base Store's)."""
    attempts: list[str] = []
    if scheme not in RETRIED:
        return attempts
    module = importlib.import_module("warmpool.storage.base")
    real = module.retry_async

    async def counting(op: Callable[[], Awaitable[Any]], *, what: str, **kw: Any) -> Any:
        async def counted() -> Any:
            attempts.append(what)
            return await op()

        return await real(counted, what=what, **kw)

    monkeypatch.setattr(module, "retry_async", counting)
    return attempts


def blob(n: int, seed: int = 0) -> bytes:
    """Deterministic bytes in which every offset is distinguishable from its neighbours."""
    return bytes((i * 131 + seed) % 251 for i in range(n))


# --- listing ---------------------------------------------------------------------------------


async def test_list_pages_relative_sorted(backend: Backend, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    contents = {
        "model.safetensors": b"w" * 300,
        "config.json": b"{}",
        "tokenizer.json": b"tok",
        "sub/a.bin": b"a" * 7,
        "sub/deeper/b.bin": b"b" * 11,
        "z.txt": b"z",
        "generation_config.json": b"{ }",
    }
    for key, data in contents.items():
        backend.put(f"models/llama/{key}", data)
    backend.put("models/llama/emptydir/", b"")  # a "directory" marker: never an object
    backend.put("models/llama-2/config.json", b"not this model")
    backend.put("models/other.txt", b"nor this")
    attempts = count_attempts(monkeypatch, backend.uri_for("").scheme)

    async with small_store(backend.uri_for("models/llama/")) as store:
        listed = await store.list()

    assert [o.key for o in listed] == sorted(contents)
    assert {o.key: o.size for o in listed} == {k: len(v) for k, v in contents.items()}
    assert all(o.etag for o in listed)
    pages = [a for a in attempts if a.startswith("list")]
    if backend.name in ("s3", "azure"):
        assert len(pages) >= 4  # 7 objects (+ marker) at 2 per page
    # gcp-storage-emulator ignores maxResults and always answers one page.


async def test_etags_follow_content(backend: Backend) -> None:
    backend.put("m/a.bin", b"A" * 64)
    backend.put("m/b.bin", b"B" * 64)
    async with small_store(backend.uri_for("m/")) as store:
        before = {o.key: o.etag for o in await store.list()}
        assert before["a.bin"] != before["b.bin"]
        backend.put("m/a.bin", b"C" * 64)  # same size, different bytes
        after = {o.key: o.etag for o in await store.list()}
    assert after["a.bin"] != before["a.bin"]
    assert after["b.bin"] == before["b.bin"]


async def test_missing_prefix(backend: Backend) -> None:
    backend.put("m/config.json", b"{}")
    async with small_store(backend.uri_for("no-such-model/")) as store:
        if backend.name == "local":
            with pytest.raises(ObjectNotFoundError):  # a directory that is not there
                await store.list()
        else:
            assert await store.list() == []  # a prefix is just a filter on a bucket


# --- reads ---------------------------------------------------------------------------------


async def test_read_ranges(backend: Backend) -> None:
    data = blob(1000, seed=7)
    backend.put("m/w.bin", data)
    async with small_store(backend.uri_for("m/")) as store:
        assert await store.read_range("w.bin", 0, 10) == data[:10]
        assert await store.read_range("w.bin", 400, 100) == data[400:500]
        assert await store.read_range("w.bin", 990, 10) == data[990:]
        assert await store.read_range("w.bin", 995, 100) == data[995:]  # short tail
        assert await store.read_range("w.bin", 1000, 10) == b""
        out = bytearray(64)
        await store.read_into("w.bin", 300, memoryview(out))
        assert bytes(out) == data[300:364]


async def test_download_streams_byte_exact(backend: Backend, tmp_path: Path) -> None:
    size = 10 * 2**20 + 123  # odd size: a last partial chunk
    data = os.urandom(size)
    backend.put("m/model.safetensors", data)
    dest = tmp_path / "out.bin"
    async with small_store(backend.uri_for("m/")) as store:
        await store.list()  # open the client before measuring
        tracemalloc.start()
        try:
            got = await store.download("model.safetensors", dest)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert got == size
    assert dest.read_bytes() == data
    if backend.name != "local":  # local copies with shutil, outside Python's allocator
        assert peak < size, f"download held {peak} bytes at once for a {size}-byte object"


async def test_missing_object(backend: Backend, tmp_path: Path) -> None:
    backend.put("m/config.json", b"{}")
    async with small_store(backend.uri_for("m/")) as store:
        with pytest.raises(ObjectNotFoundError, match="nope.bin") as err:
            await store.read_range("nope.bin", 0, 10)
        assert err.value.key == "nope.bin"
        with pytest.raises(ObjectNotFoundError, match="gone.bin"):
            await store.download("gone.bin", tmp_path / "gone.bin")


async def test_missing_bucket_not_retried(backend: Backend, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    uri = backend.missing_uri()
    attempts = count_attempts(monkeypatch, uri.scheme)
    async with small_store(uri) as store:
        with pytest.raises(ObjectNotFoundError):
            await store.list()
        with pytest.raises(ObjectNotFoundError, match="config.json"):
            await store.read_range("config.json", 0, 10)
    if backend.name != "local":
        assert len(attempts) == 2, attempts  # one each: FAST would allow 4


def _sdk_failures() -> list[tuple[str, BaseException, str, type[StorageError], str]]:
    """(scheme, the client library's exception, key, the warmpool error, its wording)."""
    import aiohttp
    import botocore.exceptions as bce
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
        ServiceRequestError,
    )

    def s3(code: str, status: int) -> BaseException:
        return bce.ClientError({"Error": {"Code": code, "Message": "m"},
                                "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    def gcs(status: int) -> BaseException:
        return aiohttp.ClientResponseError(None, (), status=status,  # type: ignore[arg-type]
                                           message="m")

    def azure(status: int, code: str | None = None) -> BaseException:
        exc = HttpResponseError(message="m")
        exc.status_code, exc.error_code = status, code  # type: ignore[assignment]
        return exc

    return [
        ("s3", s3("NoSuchBucket", 404), "w.bin", ObjectNotFoundError, "no such bucket 'b'"),
        ("s3", s3("NoSuchKey", 404), "w.bin", ObjectNotFoundError, "no such object"),
        ("s3", s3("AccessDenied", 403), "w.bin", AccessDeniedError, "access denied"),
        ("s3", bce.NoCredentialsError(), "w.bin", AccessDeniedError, "AWS credentials"),
        ("s3", s3("SlowDown", 503), "w.bin", TransientStorageError, "SlowDown"),
        ("s3", s3("RequestTimeout", 400), "w.bin", TransientStorageError, "RequestTimeout"),
        ("s3", bce.SSLError(endpoint_url="https://x", error="cert"), "w.bin", StorageError,
         "SSLError"),
        ("s3", s3("InvalidArgument", 400), "w.bin", StorageError, "InvalidArgument"),
        ("gs", gcs(404), "", ObjectNotFoundError, "no such bucket 'b'"),
        ("gs", gcs(404), "w.bin", ObjectNotFoundError, "no such bucket or object"),
        ("gs", gcs(401), "w.bin", AccessDeniedError, "HTTP 401"),
        ("gs", gcs(429), "w.bin", TransientStorageError, "HTTP 429"),
        ("gs", gcs(400), "w.bin", StorageError, "HTTP 400"),
        ("gs", aiohttp.ServerDisconnectedError(), "w.bin", TransientStorageError,
         "ServerDisconnectedError"),
        ("az", azure(404, "ContainerNotFound"), "w.bin", ObjectNotFoundError,
         "no such container 'b'"),
        ("az", ResourceNotFoundError("m"), "w.bin", ObjectNotFoundError, "no such blob"),
        ("az", ClientAuthenticationError("m"), "w.bin", AccessDeniedError, "access denied"),
        ("az", azure(503, "ServerBusy"), "w.bin", TransientStorageError, "ServerBusy"),
        ("az", ServiceRequestError("refused"), "w.bin", TransientStorageError, "refused"),
        ("az", azure(409, "Conflict"), "w.bin", StorageError, "Conflict"),
    ]


@pytest.mark.parametrize("case", _sdk_failures(), ids=lambda c: f"{c[0]}-{type(c[1]).__name__}")
def test_each_sdk_error_maps_to_one_warmpool_error(
        case: tuple[str, BaseException, str, type[StorageError], str]) -> None:
    """The base ObjectStore maps statuses and codes for every service; a backend only
    says what its exception carries."""
    scheme, exc, key, expected, words = case
    store = open_store(parse_uri(f"{scheme}://b/m/"))
    with pytest.raises(StorageError) as err:
        store._raise(exc, key)  # type: ignore[attr-defined]
    assert type(err.value) is expected and words in str(err.value), str(err.value)
    assert f"{scheme}://b/m/{key}" in str(err.value) and err.value.key == key


# --- hostile keys --------------------------------------------------------------------------

#: Keys each server can hold (the GCS emulator and Azurite refuse '..' in a name).
HOSTILE = {
    "s3": ["../x", "/abs", "a//b", "./y"],
    "gcs": ["/abs", "a//b"],
    "azure": ["/abs", "a//b"],
}


async def test_hostile_keys_in_listing_refused(backend: Backend, tmp_path: Path) -> None:
    if backend.name == "local":
        # A directory cannot hold '..' names; its hostile entry is a link out of it.
        backend.put("h/config.json", b"{}")
        secret = tmp_path / "secret"
        secret.write_bytes(b"not yours")
        link = backend.uri_for("h/").path / "escape.json"
        link.symlink_to(secret)
        async with small_store(backend.uri_for("h/")) as store:
            with pytest.raises(UnsafeKeyError) as err:
                await store.list()
        assert err.value.key == "escape.json"
        return
    for i, bad in enumerate(HOSTILE[backend.name]):
        backend.put(f"h{i}/config.json", b"{}")
        backend.put(f"h{i}/{bad}", b"evil")
        async with small_store(backend.uri_for(f"h{i}/")) as store:
            with pytest.raises(UnsafeKeyError) as err:
                await store.list()
        assert err.value.key == bad


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a//b", "a/../../b"])
async def test_hostile_key_arguments_refused(backend: Backend, bad: str, tmp_path: Path) -> None:
    async with small_store(backend.uri_for("m/")) as store:
        with pytest.raises(UnsafeKeyError):
            await store.read_range(bad, 0, 1)
        with pytest.raises(UnsafeKeyError):
            await store.download(bad, tmp_path / "x")


# --- failures a retry can or cannot cure -----------------------------------------------------


@pytest.mark.parametrize("scheme", ["s3", "gs", "az"])
async def test_unreachable_server_is_transient(scheme: str, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", dead)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_connection_string(dead))
    attempts = count_attempts(monkeypatch, scheme)
    async with small_store(parse_uri(f"{scheme}://bucket/m/")) as store:
        with pytest.raises(TransientStorageError, match=f"{scheme}://bucket/m/w.bin"):
            await store.read_range("w.bin", 0, 10)
    assert len(attempts) == FAST.attempts


async def test_azure_without_credentials_is_config_error(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_URL", raising=False)
    async with small_store(parse_uri("az://container/m/")) as store:
        with pytest.raises(ConfigError, match="AZURE_STORAGE_CONNECTION_STRING"):
            await store.list()


async def test_azure_wrong_key_is_access_denied(azure_backend: Backend, azurite: Server,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Azurite checks shared-key signatures (moto and the GCS emulator accept anything)."""
    azure_backend.put("m/config.json", b"{}")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING",
                       azurite_connection_string(azurite.endpoint, key="d3Jvbmcga2V5"))
    attempts = count_attempts(monkeypatch, "az")
    async with small_store(azure_backend.uri_for("m/")) as store:
        with pytest.raises(AccessDeniedError):
            await store.read_range("config.json", 0, 2)
    assert len(attempts) == 1


def test_a_scattered_read_lays_its_bytes_into_the_pieces_in_order() -> None:
    """Chunks of any size, split across pieces with gaps between them in the target;
    a retry starts over; more bytes than asked is an error, not a write past the end."""
    from warmpool.storage.base import Scatter

    out = bytearray(b"." * 20)
    sink = Scatter([(0, 3), (5, 4), (12, 6)], memoryview(out))
    data = b"abcdefghijklm"
    sink.write(memoryview(b"zz"))
    sink.restart()
    for i in range(0, len(data), 5):
        sink.write(memoryview(data[i:i + 5]))
    assert bytes(out) == b"abc..defg...hijklm.." and sink.total == len(data)
    with pytest.raises(ValueError, match="more bytes"):
        sink.write(memoryview(b"x"))
