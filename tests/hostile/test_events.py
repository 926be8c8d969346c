"""Adversarial payloads on the request stream of a running controller (real Redis).

Every case: the payload is refused into the dead-letter stream with a reason (its bytes
clipped), the stream entry is acknowledged (never redelivered), and the controller goes
on serving: a valid request sent after all of them is answered.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import warmpool.contract.deadletter as deadletter
from tests.controller_harness import KEYS, Harness, ask, wait_until
from tests.models import write_model

MIB = 1 << 20


def s3_put(key: str, bucket: str = "b") -> bytes:
    record = {"eventName": "ObjectCreated:Put",
              "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 1}}}
    return json.dumps({"Records": [record]}).encode()


#: (id, payload, reason the dead-letter record gives)
HOSTILE: list[tuple[str, bytes, str]] = [
    ("1 MB payload", b'{"action": "deploy", "uri": "' + b"a" * MIB + b'"}', "oversized"),
    ("10,000-deep JSON", b"[" * 10_000 + b"]" * 10_000, "not_json"),
    ("10,000-deep inside a request", b'{"action": "deploy", "uri": ' + b"[" * 10_000
     + b"]" * 10_000 + b"}", "not_json"),
    ("not UTF-8", b'{"action": "deploy", "uri": "s3://b/\xff\xfe/"}', "not_json"),
    ("NUL in a URI", ask("deploy", "s3://b/m\x00/"), "bad_uri"),
    ("NUL in an object key", s3_put("models/m\x00/config.json"), "unsafe_key"),
    ("key not URL-encoded UTF-8", s3_put("models/%FF%FE/config.json"), "bad_field"),
    ("lone surrogate in a key", s3_put("models/\udcff/config.json"), "bad_field"),
    ("absurd tp", ask("deploy", "s3://b/m/", tp=10**9), "bad_field"),
    ("negative tp", ask("deploy", "s3://b/m/", tp=-1), "bad_field"),
    ("tp as a float", ask("deploy", "s3://b/m/", tp=2.5), "bad_field"),
    ("huge integer", b'{"action": "deploy", "uri": "s3://b/m/", "tp": 1' + b"0" * 5000 + b"}",
     "not_json"),
    ("absurd device index", ask("deploy", "s3://b/m/", device="cuda:99999999999"),
     "bad_device"),
    ("device as a path", ask("deploy", "s3://b/m/", device="../../etc/passwd"), "bad_device"),
    ("unknown field", ask("deploy", "s3://b/m/", devcie="cuda:0"), "bad_field"),
    ("a JSON list", b"[1, 2, 3]", "unknown_shape"),
]


@pytest.fixture
def valid_model(tmp_path: Path) -> str:
    write_model(tmp_path / "ok", shards=1)
    return f"file://{tmp_path / 'ok'}"


def reason_counts(ctl: object) -> int:
    return int(sum(m._value.get() for m in ctl.metrics.rejected._metrics.values()))  # type: ignore[attr-defined]


async def test_hostile_requests_are_dead_lettered_and_the_controller_serves_on(
        harness: Harness, valid_model: str) -> None:
    """The user gets: each hostile payload in the dead-letter stream with its reason and
    at most its first bytes; the valid request after them answered ``warm``."""
    ctl = await harness.start()
    for _, payload, _ in HOSTILE:
        await harness.xadd(payload)
    await harness.xadd(ask("deploy", valid_model, request_id="after-the-storm"))
    reply = await harness.reply("after-the-storm")
    assert reply["state"] == "warm"
    # Handled concurrently: match the records to the payloads by size and reason.
    dead = await harness.dead()
    assert sorted((int(d["size"]), d["reason"]) for d in dead) == sorted(
        (len(payload), reason) for _, payload, reason in HOSTILE)
    for _, fields in await harness.redis.xrange(KEYS.dead_stream):
        assert len(fields[b"payload"]) <= deadletter.DEAD_PAYLOAD_BYTES

    async def acknowledged() -> bool:  # the reply goes out just before the acknowledgement
        info = await harness.redis.xpending(KEYS.requests_stream, KEYS.consumer_group)
        return bool(info["pending"] == 0)

    await wait_until(acknowledged, "every entry to be acknowledged")
    assert reason_counts(ctl) == len(HOSTILE)


async def test_the_dead_letter_stream_stays_capped_under_a_flood(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user gets: a flood of junk keeps Redis bounded: the dead-letter stream holds
    about its cap (the newest records), never every payload ever refused."""
    cap, flood = 100, 1_000
    monkeypatch.setattr(deadletter, "DEAD_MAXLEN", cap)
    ctl = await harness.start()
    async with harness.redis.pipeline(transaction=False) as pipe:
        for i in range(flood):
            pipe.xadd(KEYS.requests_stream, {"payload": b"junk %d" % i})
        await pipe.execute()

    async def all_refused() -> bool:
        return reason_counts(ctl) >= flood

    await wait_until(all_refused, f"{flood} payloads refused", timeout=120)
    length = await harness.redis.xlen(KEYS.dead_stream)
    # XADD MAXLEN ~ trims whole stream nodes (100 entries by default): cap + one node.
    assert cap <= length <= cap + 100
    newest = await harness.redis.xrevrange(KEYS.dead_stream, count=1)
    assert newest[0][1][b"payload"] == b"junk %d" % (flood - 1)
