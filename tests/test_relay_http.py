"""``warmpool relay http`` as a real process against a real Redis: the bodies MinIO, Ceph
RGW, AWS-style senders and Pub/Sub push send, the shared secret, malformed and oversized
bodies, a burst of requests, a Redis outage, and the same relay run by ``warmpool serve``."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import redis

from tests.cli_process import Relay, relays  # noqa: F401 - the fixture
from tests.models import write_model
from tests.poll import poll
from tests.redis_server import RedisServer, free_port
from warmpool.config import Settings
from warmpool.contract.keys import RedisKeys
from warmpool.contract.notifications import ObjectUploaded, parse_event
from warmpool.contract.requests import Request

KEYS = RedisKeys()
TOKEN = "s3cr3t-relay-token"
REQUESTS_TOKEN = "an0ther-s3cret-for-requests"
#: The node's watch list in these tests: uploads elsewhere are dropped by the relay.
WATCH = "s3://models/,gs://gcs-models/"


def start_http(relays: Callable[..., Relay], redis_url: str, *args: str,
               token: str | None = TOKEN, requests_token: str | None = REQUESTS_TOKEN,
               watch: str = WATCH) -> tuple[Relay, str]:
    port = free_port()
    env = {"WARMPOOL_RELAY_TOKEN": token} if token else {}
    if requests_token:
        env["WARMPOOL_RELAY_REQUESTS_TOKEN"] = requests_token
    env["WARMPOOL_WATCH"] = watch
    relay = relays("http", "--listen", f"127.0.0.1:{port}", "--redis", redis_url, *args,
                   env=env, ready="relay_listening")
    return relay, f"http://127.0.0.1:{port}"


def post(url: str, body: bytes, *, token: str | None = TOKEN, query: str = "",
         headers: dict[str, str] | None = None, path: str = "/"
         ) -> tuple[int, dict[str, Any]]:
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + path + query, data=body, method="POST",
                                 headers=all_headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        text = exc.read() or b"{}"
        try:
            return exc.code, json.loads(text)
        except ValueError:  # aiohttp's own answers (404, 405) are plain text
            return exc.code, {"text": text.decode(errors="replace")}


def stream_payloads(client: redis.Redis, stream: str = KEYS.requests_stream) -> list[bytes]:
    return [fields[b"payload"] for _id, fields in client.xrange(stream)]


def s3_record(key: str, *, source: str = "aws:s3", name: str = "ObjectCreated:Put",
              bucket: str = "models") -> dict[str, Any]:
    return {"eventVersion": "2.1", "eventSource": source, "awsRegion": "",
            "eventTime": "2026-11-29T10:00:00.000Z", "eventName": name,
            "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 12,
                                                           "eTag": "abc"}}}


BODIES: dict[str, tuple[dict[str, Any], str]] = {
    # AWS encodes keys form-style: "+" is a space, UTF-8 is percent-encoded.
    "aws": ({"Records": [s3_record("llama/x+y%C3%A9+1%2B1.json")]}, "llama/x yé 1+1.json"),
    # MinIO prefixes event names with "s3:" and encodes "/" too.
    "minio": ({"EventName": "s3:ObjectCreated:Put", "Key": "models/llama/a b.json",
               "Records": [s3_record("llama%2Fa+b.json", name="s3:ObjectCreated:Put")]},
              "llama/a b.json"),
    # Ceph RGW sends the raw key: "+" is a plus, "%" a percent sign.
    "ceph": ({"Records": [s3_record("llama/a b+é%20.json", source="ceph:s3",
                                    name="ObjectCreated:CompleteMultipartUpload")]},
             "llama/a b+é%20.json"),
}


def pubsub_push(bucket: str, name: str) -> dict[str, Any]:
    resource = {"kind": "storage#object", "bucket": bucket, "name": name, "size": "12",
                "generation": "1700000000000001"}
    return {"message": {"data": base64.b64encode(json.dumps(resource).encode()).decode(),
                        "attributes": {"eventType": "OBJECT_FINALIZE", "bucketId": bucket,
                                       "objectId": name},
                        "messageId": "1", "publishTime": "2026-11-29T10:00:00.5Z"},
            "subscription": "projects/p/subscriptions/warmpool"}


def test_store_bodies_reach_the_stream_unchanged_and_decode_to_the_right_keys(
        relays: Callable[..., Relay], redis_server: RedisServer) -> None:
    _relay, url = start_http(relays, redis_server.url)
    sent: list[bytes] = []
    for name, (doc, _key) in BODIES.items():
        body = json.dumps(doc, ensure_ascii=False).encode()
        status, answer = post(url, body)
        assert (status, answer["status"], answer["events"]) == (200, "relayed", 1), name
        sent.append(body)
    push = json.dumps(pubsub_push("gcs-models", "llama/ü b+c.safetensors")).encode()
    deploy = json.dumps({"action": "deploy", "uri": "s3://models/llama/",
                         "request_id": "r-1"}).encode()
    status, answer = post(url, push)
    assert (status, answer["status"]) == (200, "relayed")
    sent.append(push)
    status, answer = post(url, deploy, token=REQUESTS_TOKEN, path="/requests")
    assert (status, answer["status"]) == (200, "relayed")
    sent.append(deploy)
    test_event = json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"}).encode()
    assert post(url, test_event) == (200, {"status": "ignored", "events": 0})

    client = redis.Redis.from_url(redis_server.url)
    payloads = stream_payloads(client)
    assert payloads == sent  # byte for byte, in order; the test event is not there
    keys = [e.key for p in payloads[:4] for e in parse_event(p)
            if isinstance(e, ObjectUploaded)]
    assert keys == [key for _doc, key in BODIES.values()] + ["llama/ü b+c.safetensors"]
    request = parse_event(payloads[4])[0]
    assert isinstance(request, Request) and request.request_id == "r-1"
    assert client.xlen(KEYS.dead_stream) == 0
    client.close()


def test_without_the_right_token_nothing_reaches_redis(
        relays: Callable[..., Relay], redis_server: RedisServer) -> None:
    relay, url = start_http(relays, redis_server.url, "--metrics-port", "0")
    body = json.dumps({"Records": [s3_record("llama/config.json")]}).encode()
    for token, query in ((None, ""), ("wrong", ""), (TOKEN + "x", ""), (None, "?token=nope"),
                         ("", "")):
        status, answer = post(url, body, token=token, query=query)
        assert (status, answer["reason"]) == (401, "unauthorized"), (token, query)
    client = redis.Redis.from_url(redis_server.url)
    assert client.xlen(KEYS.requests_stream) == 0 and client.xlen(KEYS.dead_stream) == 0
    # Pub/Sub push cannot set headers: the token in the query string works too.
    assert post(url, body, token=None, query=f"?token={TOKEN}")[0] == 200
    assert post(url, body)[0] == 200
    assert client.xlen(KEYS.requests_stream) == 2
    client.close()
    port = relay.wait_event("metrics_listening")["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert 'warmpool_relay_rejected_total{reason="unauthorized",relay="http"} 5.0' in text
    assert 'warmpool_relay_relayed_total{relay="http"} 2.0' in text
    assert 'warmpool_relay_received_total{relay="http"} 2.0' in text
    assert 'warmpool_relay_lag_seconds_count{relay="http"} 2.0' in text  # its eventTime
    assert TOKEN not in relay.text()  # no access log with the query string


def test_malformed_and_oversized_bodies_get_a_4xx_reason_and_are_dead_lettered(
        relays: Callable[..., Relay], redis_server: RedisServer) -> None:
    relay, url = start_http(relays, redis_server.url)
    cases = [
        (b"{not json", 400, "not_json"),
        (b"", 400, "not_json"),
        (json.dumps({"hello": "world"}).encode(), 400, "unknown_shape"),
        (json.dumps({"Records": [s3_record("llama/..%2F..%2Fetc%2Fpasswd")]}).encode(), 400,
         "unsafe_key"),
        (json.dumps({"action": "deploy", "uri": "s3://m/x/"}).encode(), 403, "not_accepted"),
        (b"x" * (10 << 20), 413, "oversized"),
    ]
    for body, status, reason in cases:
        got, answer = post(url, body)
        assert (got, answer["status"], answer["reason"]) == (status, "rejected", reason), body[:40]
        assert answer["detail"]
    # A body that announces no length and runs past the bound is cut off as well.
    chunked = post_chunked(url, [b"x" * 65536] * 8)
    assert chunked == 413
    client = redis.Redis.from_url(redis_server.url)
    assert client.xlen(KEYS.requests_stream) == 0
    dead = client.xrange(KEYS.dead_stream)
    assert [f[b"reason"].decode() for _i, f in dead] == [r for _b, _s, r in cases] + ["oversized"]
    first = dead[0][1]
    assert first[b"payload"] == b"{not json"
    assert first[b"source"].decode().startswith("http:127.0.0.1:")
    assert all(len(f[b"payload"]) <= 4096 for _i, f in dead)
    for _i, oversized in dead[-2:]:  # the start of what was sent, marked as cut
        assert oversized[b"payload"].startswith(b"xxxx")
        assert oversized[b"truncated"] == b"1"
    client.close()
    assert relay.proc.poll() is None
    bad_request = json.dumps({"action": "deploy", "uri": "s3://m/x/", "devcie": "cpu"}).encode()
    got, answer = post(url, bad_request, token=REQUESTS_TOKEN, path="/requests")
    assert (got, answer["reason"]) == (400, "bad_field")
    assert post(url, json.dumps({"action": "evict", "uri": "s3://m/x/"}).encode(),
                token=REQUESTS_TOKEN, path="/requests")[0] == 200


def post_chunked(url: str, chunks: list[bytes]) -> int:
    async def go() -> int:
        async def gen() -> Any:
            for chunk in chunks:
                yield chunk

        async with aiohttp.ClientSession() as session:
            try:
                async with session.post(url + "/", data=gen(), headers={
                        "Authorization": f"Bearer {TOKEN}",
                        "Content-Type": "application/json"}) as resp:
                    return resp.status
            except aiohttp.ClientError:
                return -1  # the server may close while we still send

    return asyncio.run(go())


def test_a_burst_of_10000_requests_is_answered_with_bounded_memory(
        relays: Callable[..., Relay], redis_server: RedisServer) -> None:
    relay, url = start_http(relays, redis_server.url, "--rate", "50", "--burst", "100")
    body = json.dumps({"Records": [s3_record("llama/config.json")]}).encode()
    process = psutil.Process(relay.proc.pid)
    for _ in range(50):  # warm up (within the burst): what the first requests allocate
        assert post(url, body)[0] == 200
    before = process.memory_info().rss
    statuses = asyncio.run(burst(url, body, 10_000, connections=64))
    after = process.memory_info().rss
    assert set(statuses) <= {200, 429}, set(statuses)
    assert statuses.count(429) > 0 and statuses.count(200) > 0
    client = redis.Redis.from_url(redis_server.url)
    assert client.xlen(KEYS.requests_stream) == statuses.count(200) + 50
    client.close()
    assert after - before < 64 << 20, f"RSS grew by {(after - before) >> 20} MiB"
    with urllib.request.urlopen(url + "/healthz", timeout=10) as resp:
        assert resp.status == 200
    assert poll(lambda: post(url, body)[0] == 200, "the relay to accept again")


async def burst(url: str, body: bytes, count: int, *, connections: int) -> list[int]:
    connector = aiohttp.TCPConnector(limit=connections)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    statuses: list[int] = []
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one() -> None:
            async with session.post(url + "/", data=body, headers=headers) as resp:
                await resp.read()
                statuses.append(resp.status)

        await asyncio.gather(*(one() for _ in range(count)))
    return statuses


def test_refuses_to_start_without_a_secret_except_insecure_on_loopback(
        relays: Callable[..., Relay], redis_server: RedisServer, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "WARMPOOL_RELAY_TOKEN"}
    for args, expected in (([], "needs a shared secret"),
                           (["--insecure", "--listen", "0.0.0.0:1"], "loopback"),
                           (["--token-file", str(tmp_path / "missing")], "cannot read")):
        relay = relays("http", "--redis", redis_server.url, *args, env=env)
        assert relay.proc.wait(timeout=60) == 2
        assert expected in relay.text()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = free_port()
    relay = relays("http", "--listen", f"127.0.0.1:{port}", "--redis", redis_server.url,
                   "--token-file", str(token_file), ready="relay_listening",
                   env={**env, "WARMPOOL_WATCH": WATCH})
    assert relay.events("relay_listening")[0]["auth"] is True
    assert relay.events("relay_listening")[0]["requests"] is False
    body = json.dumps({"Records": [s3_record("llama/config.json")]}).encode()
    assert post(f"http://127.0.0.1:{port}", body)[0] == 200
    assert post(f"http://127.0.0.1:{port}", body, token=None)[0] == 401
    insecure, url = start_http(relays, redis_server.url, "--insecure", token=None)
    assert insecure.events("relay_listening")[0]["auth"] is False
    assert post(url, body, token=None)[0] == 200


def test_a_redis_outage_answers_503_then_relays_again(
        relays: Callable[..., Relay], redis_server: RedisServer) -> None:
    _relay, url = start_http(relays, redis_server.url)
    body = json.dumps({"Records": [s3_record("llama/config.json")]}).encode()
    redis_server.kill()
    status, answer = post(url, body)
    assert status == 503 and answer["status"] == "unavailable"
    with pytest.raises(urllib.error.HTTPError) as health:
        urllib.request.urlopen(url + "/healthz", timeout=30)
    assert health.value.code == 503
    redis_server.start()
    assert poll(lambda: post(url, body)[0] == 200, "the relay to relay again")
    client = redis.Redis.from_url(redis_server.url)
    assert stream_payloads(client) == [body]
    client.close()


def test_serve_runs_the_relays_of_its_config_file(
        redis_server: RedisServer, settings: Settings, tmp_path: Path) -> None:
    from tests.test_controller_serve import NODE, Serve

    model = tmp_path / "model"
    write_model(model, shards=2)
    port = free_port()
    config = tmp_path / "warmpool.json"
    requests_token = tmp_path / "requests-token"
    requests_token.write_text(REQUESTS_TOKEN)
    requests_token.chmod(0o600)
    config.write_text(json.dumps({"relays": [
        {"kind": "http", "listen": f"127.0.0.1:{port}", "insecure": True,
         "requests_token_file": str(requests_token), "allow_local_paths": True}]}))
    serve = Serve(tmp_path / "serve.log", "--redis", redis_server.url, "--config", str(config))
    try:
        serve.wait_event("serving")
        serve.wait_event("relay_listening")
        body = json.dumps({"action": "deploy", "uri": model.as_uri()}).encode()
        assert post(f"http://127.0.0.1:{port}", body, token=None)[0] == 403  # not on POST /
        assert post(f"http://127.0.0.1:{port}", body, token=REQUESTS_TOKEN,
                    path="/requests")[0] == 200
        client = redis.Redis.from_url(redis_server.url)

        def warm() -> bool:
            return any(json.loads(raw).get("state") == "warm"
                       for key in client.smembers(KEYS.node_entries(NODE))
                       if (raw := client.hget(key, "entry")))

        poll(warm, "the relayed deploy request to make the model warm")
        client.close()
        metrics_port = serve.wait_event("metrics_listening")["port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=10) as resp:
            text = resp.read().decode()
        assert 'warmpool_relay_relayed_total{relay="http"} 1.0' in text
        assert serve.terminate() == 0
    finally:
        serve.kill()
