"""Real object-storage servers for the tests: moto (S3), gcp-storage-emulator (GCS), Azurite.

The design rule is "against real servers, never mocks of them": each server is started
once per session as a subprocess on a free loopback port, in its own process group so
that teardown kills it and anything it spawned. A server that cannot start fails the
tests that need it with its log attached; nothing is skipped silently.

Tests use the function-scoped ``backend`` fixture (parametrised over local, s3, gcs and
azure): it makes a fresh bucket, container or directory, sets the backend's environment
variables through ``monkeypatch``, and offers ``uri_for(prefix)``, ``put(key, data)`` and
``delete(key)`` with *full* keys inside that bucket. Servers start only when a test asks
for their backend, so ``-k local`` needs none of them.
"""

from __future__ import annotations

import abc
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from warmpool.model.uri import ModelURI, parse_uri

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 30.0
BACKENDS = ("local", "s3", "gcs", "azure")

#: Azurite's fixed development account (public, documented by Microsoft; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
               "K1SZFPTOtr/KBHBeksoGMGw==")


def azurite_connection_string(blob_endpoint: str, key: str = AZURITE_KEY) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};"
            f"BlobEndpoint={blob_endpoint}/{AZURITE_ACCOUNT};")


@dataclass(frozen=True)
class Server:
    """A running test server: where it listens and the environment a client needs."""

    name: str
    endpoint: str
    env: dict[str, str]
    pid: int
    log: Path
    #: Variables removed while the server is in use (e.g. a developer's AWS_PROFILE).
    unset: tuple[str, ...] = ()

    def apply(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in self.unset:
            monkeypatch.delenv(name, raising=False)
        for name, value in self.env.items():
            monkeypatch.setenv(name, value)


def free_port() -> int:
    """A loopback port nothing listens on (at the moment of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL what is left after a few seconds."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    # children the server spawned may outlive it: clear the whole group
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _wait_listening(proc: subprocess.Popen[bytes], port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@contextmanager
def _serve(name: str, argv: Callable[[int], list[str]], workdir: Path) -> Iterator[Server]:
    """Start ``argv(port)`` on a free port, wait until the port answers, yield, kill.

    Another process may take the free port between asking and binding, so a server that
    exits at once is started again on a new port (three tries)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    for _ in range(3):
        port = free_port()
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv(port), cwd=workdir, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            ok = _wait_listening(proc, port, time.monotonic() + STARTUP_TIMEOUT)
            if ok:
                yield Server(name, f"http://{HOST}:{port}", {}, proc.pid, log)
                return
            if proc.poll() is None:
                pytest.fail(f"{name} did not listen on port {port} within {STARTUP_TIMEOUT:.0f}s; "
                            f"log {log}:\n{_log_tail(log)}", pytrace=False)
        finally:
            _stop(proc)
    pytest.fail(f"{name} exited at startup (3 tries); log {log}:\n{_log_tail(log)}",
                pytrace=False)


def _venv_tool(tool: str, module: str) -> list[str]:
    exe = Path(sys.executable).parent / tool
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


# --- the servers (session-scoped) -------------------------------------------------------


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    argv = _venv_tool("moto_server", "moto.server")
    with _serve("moto", lambda port: [*argv, "-H", HOST, "-p", str(port)],
                 tmp_path_factory.mktemp("moto")) as srv:
        yield Server(srv.name, srv.endpoint, {
            "AWS_ENDPOINT_URL": srv.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            # never read a developer's ~/.aws into a test
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }, srv.pid, srv.log, unset=("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION",
                                    "AWS_ENDPOINT_URL_S3"))


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    argv = _venv_tool("gcp-storage-emulator", "gcp_storage_emulator")
    with _serve("gcs", lambda port: [*argv, "start", "--host", HOST, "--port", str(port),
                                           "--in-memory", "--quiet"],
                 tmp_path_factory.mktemp("gcs")) as srv:
        yield Server(srv.name, srv.endpoint, {"STORAGE_EMULATOR_HOST": srv.endpoint},
                     srv.pid, srv.log)


def azurite_binary() -> str:
    local = REPO / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)
    found = shutil.which("azurite-blob")
    if found:
        return found
    pytest.fail(f"azurite-blob not found in {local.parent} or on PATH: run `npm install` in "
                f"{REPO} (it installs the azurite dev dependency) to run the Azure tests",
                pytrace=False)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    exe = azurite_binary()
    # --inMemoryPersistence refuses --location; the working directory takes any files.
    with _serve("azurite", lambda port: [
            exe, "--blobHost", HOST, "--blobPort", str(port), "--skipApiVersionCheck",
            "--disableTelemetry", "--inMemoryPersistence", "--silent"],
            tmp_path_factory.mktemp("azurite")) as srv:
        yield Server(srv.name, srv.endpoint,
                     {"AZURE_STORAGE_CONNECTION_STRING": azurite_connection_string(srv.endpoint)},
                     srv.pid, srv.log, unset=("AZURE_STORAGE_ACCOUNT_URL",))


# --- per-test buckets ----------------------------------------------------------------------


def unique_name() -> str:
    """A bucket/container name every backend accepts (lowercase, 3-63 characters)."""
    return f"wp-{uuid.uuid4().hex[:16]}"


@dataclass
class Backend(abc.ABC):
    """A fresh bucket (or directory) of one backend, with its environment applied."""

    name: str
    bucket: str
    env: dict[str, str] = field(default_factory=dict)

    @abc.abstractmethod
    def uri_for(self, prefix: str) -> ModelURI:
        """The model URI for ``prefix`` (e.g. ``"llama/"``) in this bucket."""

    @abc.abstractmethod
    def missing_uri(self) -> ModelURI:
        """A model URI in a bucket (directory) that does not exist."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Create or overwrite the object ``key`` (a full key inside the bucket)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object ``key``."""


class LocalBackend(Backend):
    def __init__(self, root: Path) -> None:
        super().__init__("local", "")
        self.root = root

    def uri_for(self, prefix: str) -> ModelURI:
        return parse_uri(str(self.root / prefix))

    def missing_uri(self) -> ModelURI:
        return parse_uri(str(self.root / unique_name() / "m"))

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        assert path.is_relative_to(self.root.resolve()), f"test key {key!r} escapes {self.root}"
        return path

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if key.endswith("/"):  # a "directory marker": an empty directory here
            path.mkdir(parents=True, exist_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def delete(self, key: str) -> None:
        self._path(key).unlink()


@functools.cache
def _boto3_client(endpoint: str) -> Any:
    """One boto3 client per server: creating one costs ~0.3 s, more than most tests."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing",
                        config=Config(s3={"addressing_style": "path"}))


class S3Backend(Backend):
    def __init__(self, server: Server) -> None:
        super().__init__("s3", unique_name(), dict(server.env))
        self.client = _boto3_client(server.endpoint)
        self.client.create_bucket(Bucket=self.bucket)

    def uri_for(self, prefix: str) -> ModelURI:
        return parse_uri(f"s3://{self.bucket}/{prefix}")

    def missing_uri(self) -> ModelURI:
        return parse_uri(f"s3://{unique_name()}/m/")

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)


class GCSBackend(Backend):
    """Plain JSON-API calls (google-cloud-storage is not a dependency; urllib suffices)."""

    def __init__(self, server: Server) -> None:
        super().__init__("gcs", unique_name(), dict(server.env))
        self.root = server.endpoint
        self._request("POST", "/storage/v1/b?project=warmpool-test",
                      json.dumps({"name": self.bucket}).encode(), "application/json")

    def _request(self, method: str, path: str, data: bytes | None = None,
                 content_type: str | None = None) -> bytes:
        headers = {"Content-Type": content_type} if content_type else {}
        req = urllib.request.Request(self.root + path, data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"GCS emulator: {method} {path}: {exc.code} {exc.read()[:200]!r}"
                                 ) from exc

    def uri_for(self, prefix: str) -> ModelURI:
        return parse_uri(f"gs://{self.bucket}/{prefix}")

    def missing_uri(self) -> ModelURI:
        return parse_uri(f"gs://{unique_name()}/m/")

    def put(self, key: str, data: bytes) -> None:
        # Multipart, not media: gcp-storage-emulator crashes on an empty media upload.
        boundary = uuid.uuid4().hex
        meta = json.dumps({"name": key}).encode()
        body = b"".join([
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode(),
            meta, f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode(),
            data, f"\r\n--{boundary}--\r\n".encode()])
        self._request("POST", f"/upload/storage/v1/b/{self.bucket}/o?uploadType=multipart",
                      body, f"multipart/related; boundary={boundary}")

    def delete(self, key: str) -> None:
        self._request("DELETE", f"/storage/v1/b/{self.bucket}/o/"
                                f"{urllib.parse.quote(key, safe='')}")


@functools.cache
def _azure_service(connection_string: str) -> Any:
    from azure.storage.blob import BlobServiceClient

    return BlobServiceClient.from_connection_string(connection_string)


class AzureBackend(Backend):
    def __init__(self, server: Server) -> None:
        super().__init__("azure", unique_name(), dict(server.env))
        service = _azure_service(server.env["AZURE_STORAGE_CONNECTION_STRING"])
        self.container = service.create_container(self.bucket)

    def uri_for(self, prefix: str) -> ModelURI:
        return parse_uri(f"az://{self.bucket}/{prefix}")

    def missing_uri(self) -> ModelURI:
        return parse_uri(f"az://{unique_name()}/m/")

    def put(self, key: str, data: bytes) -> None:
        self.container.upload_blob(key, data, overwrite=True)

    def delete(self, key: str) -> None:
        self.container.delete_blob(key)


@pytest.fixture
def local_backend(tmp_path: Path) -> LocalBackend:
    root = tmp_path / "store"
    root.mkdir()
    return LocalBackend(root)


@pytest.fixture
def s3_backend(moto_server: Server, monkeypatch: pytest.MonkeyPatch) -> S3Backend:
    moto_server.apply(monkeypatch)
    return S3Backend(moto_server)


@pytest.fixture
def gcs_backend(gcs_emulator: Server, monkeypatch: pytest.MonkeyPatch) -> GCSBackend:
    gcs_emulator.apply(monkeypatch)
    return GCSBackend(gcs_emulator)


@pytest.fixture
def azure_backend(azurite: Server, monkeypatch: pytest.MonkeyPatch) -> AzureBackend:
    azurite.apply(monkeypatch)
    return AzureBackend(azurite)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """One fresh bucket per test, for each backend in turn (servers start on first use)."""
    result: Backend = request.getfixturevalue(f"{request.param}_backend")
    return result
