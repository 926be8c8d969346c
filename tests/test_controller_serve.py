"""``warmpool serve`` as a real process: SIGKILL and restart, SIGTERM, the embedded Redis,
metrics, JSON logs, and the CLI talking to it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.cli_process import CliProcess
from tests.models import write_model
from tests.poll import poll
from tests.pool_env import run_cli
from tests.redis_server import RedisServer
from tests.servers import Backend
from warmpool.config import Settings
from warmpool.contract.keys import RedisKeys
from warmpool.pool.host import HostTier

KEYS = RedisKeys()
NODE = "node-under-test"
FAST_ENV = {"WARMPOOL_DEBOUNCE_S": "0.3", "WARMPOOL_HEARTBEAT_S": "0.5",
            "WARMPOOL_RECHECK_S": "1", "WARMPOOL_CLAIM_IDLE_S": "2",
            "WARMPOOL_SHUTDOWN_GRACE_S": "5", "WARMPOOL_NODE": NODE}


class Serve(CliProcess):
    """One ``warmpool serve`` process (metrics on a free port, fast timings)."""

    def __init__(self, log: Path, *args: str) -> None:
        super().__init__(log, "serve", "--metrics-port", "0", *args, env=FAST_ENV)

    def lines(self) -> list[dict[str, Any]]:
        # every line is a JSON document: a stray print would break log shippers
        return [json.loads(line) for line in self.text().splitlines()]


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def start(*args: str) -> Serve:
        serve = Serve(tmp_path / f"serve-{len(started)}.log", *args)
        started.append(serve)
        serve.wait_event("serving")
        return serve

    yield start
    for serve in started:
        serve.kill()


def read_entry(client: redis.Redis, content_hash: str) -> dict[str, Any] | None:
    raw = client.hget(KEYS.entry(content_hash, "cpu", NODE), "entry")
    return None if raw is None else dict(json.loads(raw))


def test_serve_killed_and_restarted_reconciles_then_stops_cleanly(
        serving: Callable[..., Serve], redis_server: RedisServer, s3_backend: Backend,
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_model(tmp_path / "src", shards=2)
    for path in sorted((tmp_path / "src").iterdir()):
        s3_backend.put("m/" + path.name, path.read_bytes())
    uri = str(s3_backend.uri_for("m/"))
    first = serving("--redis", redis_server.url)

    # The CLI goes through the controller when a Redis is configured.
    monkeypatch.setenv("WARMPOOL_REDIS_URL", redis_server.url)
    monkeypatch.setenv("WARMPOOL_NODE", NODE)
    proc = run_cli("prefetch", uri, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["state"] == "warm" and report["node"] == NODE and report["via"] == "controller"
    port = first.wait_event("metrics_listening")["port"]
    # The state gauges are refreshed by the controller's periodic pass, not by the warm-up.
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        if 'warmpool_models{state="warm"} 1.0' in text or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert 'warmpool_models_streamed_total{device="cpu"} 1.0' in text
    assert 'warmpool_events_received_total{source="stream"} 1.0' in text
    assert "warmpool_time_to_warm_seconds_bucket" in text
    streamed_bytes = float(text.split('warmpool_bytes_streamed_total{device="cpu"} ')[1].split()[0])
    assert 0 < streamed_bytes <= report["bytes"]  # tensor bytes; the entry adds alignment
    assert 'warmpool_models{state="warm"} 1.0' in text
    assert 'warmpool_pool_bytes{device="cpu",kind="used"}' in text

    client = redis.Redis.from_url(redis_server.url)
    before = read_entry(client, report["content_hash"])
    assert before is not None
    first.kill()  # SIGKILL: no goodbye, heartbeat and entries stay behind
    HostTier(settings.runtime_dir).remove_all()  # and the host rebooted

    second = serving("--redis", redis_server.url)
    assert second.wait_event("reconcile")["count"] == 1
    after = poll(lambda: _warm_after(client, report["content_hash"], before["created_at"]),
                 "the reconciled entry")
    assert after["history"][0][0] == "pending"
    assert second.terminate() == 0
    assert second.event("stopped") is not None
    assert not client.exists(KEYS.node(NODE))  # a clean stop takes the heartbeat down
    client.close()


def _warm_after(client: redis.Redis, content_hash: str, created_at: float
                ) -> dict[str, Any] | None:
    entry = read_entry(client, content_hash)
    if entry and entry["state"] == "warm" and entry["created_at"] > created_at:
        return entry
    return None


def test_serve_without_redis_embeds_one_and_the_cli_finds_it(
        serving: Callable[..., Serve], settings: Settings, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    write_model(model_dir, shards=1)
    serve = serving()
    announced = serve.wait_event("embedded_redis")
    assert announced["level"] == "warning" and "embedded" in announced["msg"]
    url_file = settings.runtime_dir / "redis" / "redis.url"
    assert url_file.read_text().startswith("unix://")
    assert (settings.runtime_dir / "redis").stat().st_mode & 0o077 == 0

    os.environ["WARMPOOL_NODE"] = NODE  # run_cli passes the environment on
    try:
        proc = run_cli("prefetch", str(model_dir), "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["via"] == "controller"
        status = run_cli("status", "--json")
        assert [(e["state"], e["node"], e["device"]) for e in json.loads(status.stdout)] \
            == [("warm", NODE, "cpu")]
    finally:
        del os.environ["WARMPOOL_NODE"]
    assert serve.terminate() == 0
    assert not url_file.exists()


def test_prefetch_with_redis_but_no_controller_says_so(redis_server: RedisServer,
                                                       settings: Settings, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    write_model(tmp_path / "model", shards=1)
    monkeypatch.setenv("WARMPOOL_REDIS_URL", redis_server.url)
    proc = run_cli("prefetch", str(tmp_path / "model"))
    assert proc.returncode == 1
    assert "no warmpool controller is running" in proc.stderr


def test_a_cli_prefetch_rides_out_a_redis_outage_and_resends_what_redis_lost(
        serving: Callable[..., Serve], redis_server: RedisServer, settings: Settings,
        tmp_path: Path) -> None:
    """The CLI's request is on the stream when Redis dies for seconds and comes back
    empty (request, stream and group gone); the controller only starts afterwards. The
    CLI neither gives up during the outage nor waits forever: it sends the request again."""
    model = tmp_path / "model"
    write_model(model, shards=1)
    client = redis.Redis.from_url(redis_server.url)
    client.set(KEYS.node(NODE), "{}", ex=60)  # a controller's heartbeat, for the CLI's check
    env = {**os.environ, "WARMPOOL_REDIS_URL": redis_server.url, "WARMPOOL_NODE": NODE}
    cli = subprocess.Popen([sys.executable, "-m", "warmpool.cli", "prefetch", str(model),
                            "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        poll(lambda: client.xlen(KEYS.node_stream(NODE)), "the CLI's request on the stream")
        client.close()
        redis_server.kill()
        time.sleep(3.0)  # longer than redis-py's own reconnect retries
        redis_server.start()  # empty: no persistence
        serving("--redis", redis_server.url)
        out, err = cli.communicate(timeout=90)
    finally:
        cli.kill()
    assert cli.returncode == 0, err
    report = json.loads(out)
    assert report["state"] == "warm" and report["node"] == NODE


def test_the_embedded_redis_keeps_desired_state_across_restarts(
        serving: Callable[..., Serve], settings: Settings, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The laptop default must not forget what it was asked to keep warm when `warmpool
    serve` restarts: the embedded Redis snapshots into the runtime directory."""
    model_dir = tmp_path / "model"
    write_model(model_dir, shards=1)
    first = serving()
    monkeypatch.setenv("WARMPOOL_NODE", NODE)
    proc = run_cli("prefetch", str(model_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    assert first.terminate() == 0
    assert (settings.runtime_dir / "redis" / "warmpool.rdb").stat().st_size > 0
    second = serving()
    assert second.wait_event("reconcile")["count"] == 1  # the desired model, from the snapshot
    status = run_cli("status", "--json")
    assert [(e["state"], e["uri"]) for e in json.loads(status.stdout)] == \
        [("warm", json.loads(proc.stdout)["uri"])]
    assert second.terminate() == 0


HOLD_LEASE = """
import sys, time
from warmpool import attach
with attach(sys.argv[1]) as weights:
    print("HOLDING", len(weights), flush=True)
    time.sleep(600)
"""


def test_evict_goes_through_the_controller_leased_or_not(
        serving: Callable[..., Serve], settings: Settings, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With a controller running, `warmpool evict` asks it (it owns the pool and would
    re-warm a model it still wants): by hash prefix, a leased model retires when its last
    lease ends, and --force does not wait."""
    model_dir = tmp_path / "model"
    write_model(model_dir, shards=1)
    serve = serving()
    monkeypatch.setenv("WARMPOOL_NODE", NODE)

    def states() -> list[str]:
        listed = run_cli("status", "--history", "--json").stdout
        return [e["state"] for e in json.loads(listed)]

    def warm_and_hold() -> tuple[str, subprocess.Popen[str]]:
        proc = run_cli("prefetch", str(model_dir), "--json")
        assert proc.returncode == 0, proc.stderr
        holder = subprocess.Popen([sys.executable, "-c", HOLD_LEASE, str(model_dir)],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().startswith("HOLDING")
        return json.loads(proc.stdout)["content_hash"], holder

    content_hash, holder = warm_and_hold()
    try:
        proc = run_cli("evict", content_hash[:12])
        assert proc.returncode == 0, proc.stderr
        assert "leased, evicted when its leases end" in proc.stdout
        assert HostTier(settings.runtime_dir).resident(content_hash) is not None
    finally:
        holder.kill()
        holder.wait()
    poll(lambda: HostTier(settings.runtime_dir).resident(content_hash) is None,
         "the retired model to be evicted once its lease ended")
    poll(lambda: states() == ["evicted"], "status to say evicted")

    content_hash, holder = warm_and_hold()
    try:
        proc = run_cli("evict", str(model_dir), "--force")
        assert proc.returncode == 0 and proc.stdout.startswith("evicted"), proc
        assert HostTier(settings.runtime_dir).resident(content_hash) is None
    finally:
        holder.kill()
        holder.wait()
    again = run_cli("evict", str(model_dir))
    assert again.returncode == 1 and "nothing to evict" in again.stderr
    assert serve.terminate() == 0
