"""``warmpool relay sqs`` against moto's real S3 → SQS notifications and a real Redis:
uploads become warm through the relay and ``warmpool serve`` exactly once; a relay killed
between receive and XADD, a Redis outage and a stopped controller lose nothing; SNS
envelopes are unwrapped, test events ignored, malformed messages dead-lettered."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from safetensors.torch import load_file

from tests.cli_process import Relay, relays  # noqa: F401 - the fixture
from tests.models import write_model
from tests.poll import poll
from tests.redis_server import RedisServer
from tests.servers import S3Backend, Server
from tests.test_controller_serve import NODE, Serve, serving  # noqa: F401 - the fixture
from warmpool.attachment import attach
from warmpool.config import Settings
from warmpool.contract.keys import RedisKeys

KEYS = RedisKeys()
VISIBILITY_S = 2


class Queue:
    """An SQS queue on moto that the bucket notifies of every created object."""

    def __init__(self, server: Server, backend: S3Backend) -> None:
        import boto3

        self.sqs = boto3.client("sqs", endpoint_url=server.endpoint, region_name="us-east-1",
                                aws_access_key_id="testing", aws_secret_access_key="testing")
        self.url = self.sqs.create_queue(
            QueueName=backend.bucket, Attributes={"VisibilityTimeout": str(VISIBILITY_S)}
        )["QueueUrl"]
        arn = self.sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=["QueueArn"]
                                            )["Attributes"]["QueueArn"]
        backend.client.put_bucket_notification_configuration(
            Bucket=backend.bucket, NotificationConfiguration={"QueueConfigurations": [
                {"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]})

    def counts(self) -> tuple[int, int]:
        """(visible, in flight) messages."""
        attrs = self.sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return (int(attrs["ApproximateNumberOfMessages"]),
                int(attrs["ApproximateNumberOfMessagesNotVisible"]))

    def send(self, body: str) -> None:
        self.sqs.send_message(QueueUrl=self.url, MessageBody=body)


@pytest.fixture
def queue(moto_server: Server, s3_backend: S3Backend) -> Iterator[Queue]:
    q = Queue(moto_server, s3_backend)
    yield q
    q.sqs.delete_queue(QueueUrl=q.url)


def upload_model(backend: S3Backend, src: Path, prefix: str) -> list[str]:
    """Write a sharded model and upload it one object at a time, as a client would."""
    write_model(src, shards=3)
    names = sorted(p.name for p in src.iterdir())
    for name in names:
        backend.put(prefix + name, (src / name).read_bytes())
    return names


def start_sqs(relays: Callable[..., Relay], queue: Queue, redis_url: str,
              *args: str, wait_s: int = 1) -> Relay:
    return relays("sqs", queue.url, "--redis", redis_url, "--wait-s", str(wait_s), *args,
                  ready="relay_started")


def entries(client: redis.Redis) -> list[dict[str, Any]]:
    found = []
    for key in client.smembers(KEYS.node_entries(NODE)):
        raw = client.hget(key, "entry")
        if raw:
            found.append(json.loads(raw))
    return found


def wait_warm(client: redis.Redis, uri: str) -> dict[str, Any]:
    def warm() -> dict[str, Any] | None:
        return next((e for e in entries(client) if e["uri"] == uri and e["state"] == "warm"),
                    None)

    return dict(poll(warm, f"{uri} to become warm", timeout=120))


def assert_bit_exact(uri: str, src: Path, settings: Settings) -> None:
    expected: dict[str, Any] = {}
    for shard in sorted(src.glob("*.safetensors")):
        expected.update(load_file(str(shard)))
    with attach(uri, settings=settings) as weights:
        assert sorted(weights) == sorted(expected)
        for name, tensor in expected.items():
            got = weights[name]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
            assert got.contiguous().view(-1).view(__import__("torch").uint8).equal(
                tensor.contiguous().view(-1).view(__import__("torch").uint8)), name


def test_uploads_through_sqs_become_warm_exactly_once_and_attach_bit_exact(
        relays: Callable[..., Relay], serving: Callable[..., Serve], queue: Queue,
        s3_backend: S3Backend, redis_server: RedisServer, settings: Settings,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARMPOOL_WATCH", str(s3_backend.uri_for("models/")))
    relay = start_sqs(relays, queue, redis_server.url, "--metrics-port", "0")
    names = upload_model(s3_backend, tmp_path / "src", "models/llama 3+é/")
    client = redis.Redis.from_url(redis_server.url)
    # Nothing reads the stream yet: every upload waits there (the test event does not).
    poll(lambda: client.xlen(KEYS.requests_stream) == len(names), "every upload on the stream")
    poll(lambda: queue.counts() == (0, 0), "the queue to drain")  # deleted after the XADD
    assert relay.events("relay_ignored")  # s3:TestEvent, sent when the notification was set

    uri = str(s3_backend.uri_for("models/llama 3+é/"))
    serve = serving("--redis", redis_server.url)
    entry = wait_warm(client, uri)
    assert_bit_exact(uri, tmp_path / "src", settings)
    serve_port = serve.wait_event("metrics_listening")["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{serve_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert 'warmpool_models_streamed_total{device="cpu"} 1.0' in text  # warmed once
    assert [e["uri"] for e in entries(client)] == [uri]
    assert [state for state, _ts in entry["history"]].count("streaming") == 1
    assert client.xlen(KEYS.dead_stream) == 0
    port = relay.wait_event("metrics_listening")["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert f'warmpool_relay_relayed_total{{relay="sqs"}} {len(names)}.0' in text
    assert 'warmpool_relay_ignored_total{relay="sqs"} 1.0' in text
    assert f'warmpool_relay_lag_seconds_count{{relay="sqs"}} {len(names)}.0' in text
    assert relay.terminate() == 0
    client.close()


def test_a_relay_killed_between_receive_and_xadd_leaves_the_message_for_redelivery(
        relays: Callable[..., Relay], serving: Callable[..., Serve], queue: Queue,
        s3_backend: S3Backend, redis_server: RedisServer, settings: Settings,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARMPOOL_WATCH", str(s3_backend.uri_for("models/")))
    client = redis.Redis.from_url(redis_server.url)
    # A long poll: the relay waits inside ReceiveMessage (Redis already checked) when
    # Redis stops answering (hangs, not refuses), so it holds what it receives.
    first = start_sqs(relays, queue, redis_server.url, wait_s=20)
    poll(lambda: queue.counts() == (0, 0), "the test event to be taken")
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        names = upload_model(s3_backend, tmp_path / "src", "models/m/")
        held = poll(lambda: queue.counts()[1], "the relay to receive a message")
        first.kill()
        assert sum(queue.counts()) == len(names)  # nothing was deleted
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    # The XADD the relay had sent (unanswered) may still land: at least once, not exactly.
    assert client.xlen(KEYS.requests_stream) <= 1 <= held

    serving("--redis", redis_server.url)
    start_sqs(relays, queue, redis_server.url)  # after the visibility timeout, it gets them
    uri = str(s3_backend.uri_for("models/m/"))
    wait_warm(client, uri)
    assert_bit_exact(uri, tmp_path / "src", settings)
    poll(lambda: queue.counts() == (0, 0), "the queue to drain")
    assert client.xlen(KEYS.requests_stream) >= len(names)  # each at least once
    assert [e["uri"] for e in entries(client)] == [uri]  # repeats are harmless
    client.close()


def test_while_redis_is_down_messages_stay_in_the_queue_and_the_relay_catches_up(
        relays: Callable[..., Relay], serving: Callable[..., Serve], queue: Queue,
        s3_backend: S3Backend, redis_server: RedisServer, settings: Settings,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARMPOOL_WATCH", str(s3_backend.uri_for("models/")))
    relay = start_sqs(relays, queue, redis_server.url)
    poll(lambda: queue.counts() == (0, 0), "the test event to be taken")
    redis_server.kill()
    names = upload_model(s3_backend, tmp_path / "src", "models/m/")
    poll(lambda: relay.events("redis_lost"), "the relay to notice Redis is gone")
    assert sum(queue.counts()) == len(names)  # kept, visible or about to be
    redis_server.start()  # empty: no persistence; the stream is made by the first XADD
    client = redis.Redis.from_url(redis_server.url)
    poll(lambda: client.xlen(KEYS.requests_stream) == len(names), "the relay to catch up")
    poll(lambda: queue.counts() == (0, 0), "the queue to drain")
    # No controller ran until now: the stream kept every event for it.
    serving("--redis", redis_server.url)
    uri = str(s3_backend.uri_for("models/m/"))
    wait_warm(client, uri)
    assert_bit_exact(uri, tmp_path / "src", settings)
    client.close()


def sns(message: str) -> str:
    return json.dumps({"Type": "Notification", "MessageId": "m-1",
                       "TopicArn": "arn:aws:sns:us-east-1:123456789012:uploads",
                       "Message": message, "Timestamp": "2026-11-29T10:00:00.000Z"})


def s3_put(bucket: str, key: str) -> str:
    return json.dumps({"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3",
                                    "eventName": "ObjectCreated:Put",
                                    "s3": {"bucket": {"name": bucket},
                                           "object": {"key": key, "size": 3}}}]})


def test_sns_envelopes_are_unwrapped_and_malformed_messages_dead_lettered_and_deleted(
        relays: Callable[..., Relay], queue: Queue, redis_server: RedisServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARMPOOL_WATCH", "s3://models/")
    inner = s3_put("models", "llama/a+b.json")
    queue.send(sns(inner))
    queue.send("this is not JSON")
    queue.send(json.dumps({"Records": [{"eventName": "ObjectCreated:Put",
                                        "s3": {"bucket": {"name": "models"},
                                               "object": {"key": "../../etc/passwd"}}}]}))
    # A bucket's queue carries notifications, never control requests (plain or in SNS),
    # nor another store's shapes; an upload under no watched prefix is dropped.
    queue.send(json.dumps({"action": "evict", "uri": "s3://models/llama/", "force": True}))
    queue.send(sns(json.dumps({"action": "deploy", "uri": "file:///root/"})))
    queue.send(json.dumps({"kind": "storage#object", "bucket": "models", "name": "x/y"}))
    queue.send(s3_put("elsewhere", "llama/config.json"))
    start_sqs(relays, queue, redis_server.url)
    client = redis.Redis.from_url(redis_server.url)
    poll(lambda: client.xlen(KEYS.dead_stream) == 5, "five dead letters")
    poll(lambda: queue.counts() == (0, 0), "every message deleted")
    assert [f[b"payload"] for _i, f in client.xrange(KEYS.requests_stream)] == [inner.encode()]
    dead = [f for _i, f in client.xrange(KEYS.dead_stream)]
    assert sorted(f[b"reason"] for f in dead) == [b"not_accepted"] * 3 + [b"not_json",
                                                                         b"unsafe_key"]
    assert {f[b"source"].decode() for f in dead} == {f"sqs:{queue.url}"}
    client.close()
