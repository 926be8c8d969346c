"""The controller in this process, against a real Redis and the moto S3 server.

Each test starts one or more :class:`Controller` tasks with short timings (debounce,
heartbeat, claim), sends payloads the way producers do (PUBLISH, XADD), and waits for
the registry in Redis to say what happened — always polling with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.controller_harness import (
    FAST,
    KEYS,
    Harness,
    ask,
    assert_bit_exact,
    gcs_event,
    make_model,
    s3_event,
    streamed,
    streams_counted,
    upload,
    wait_until,
)
from tests.models import write_model
from tests.redis_server import Failover
from tests.servers import Backend
from warmpool.attachment import attach
from warmpool.config import Settings
from warmpool.contract.redis_client import connect
from warmpool.contract.requests import Request
from warmpool.controller.desired import DesiredState
from warmpool.model.uri import parse_uri
from warmpool.pool.host import HostTier
from warmpool.pool.registry.base import PoolEntry, State
from warmpool.tiers.prefetch import prefetch

# --- uploads --------------------------------------------------------------------------------


@pytest.mark.parametrize("index_first", [False, True], ids=["index-last", "index-first"])
async def test_sharded_upload_warms_exactly_once(harness: Harness, s3_backend: Backend,
                                                 tmp_path: Path, index_first: bool) -> None:
    model = make_model(tmp_path / "src", shards=3)
    shards = sorted(n for n in model.files if n.endswith(".safetensors"))
    small = sorted(n for n in model.files if n not in shards)
    index = "model.safetensors.index.json"
    small.remove(index)
    uri = s3_backend.uri_for("models/llama/")
    ctl = await harness.start(watch=(str(s3_backend.uri_for("models/")),))
    first = [index, shards[0]] if index_first else shards
    rest = (shards[1:] + small) if index_first else (small + [index])
    await upload(s3_backend, "models/llama/", model, first, harness.publish)

    # The model is incomplete: it is remembered in Redis, not warmed.
    pending = KEYS.upload_pending(uri)
    await wait_until(lambda: harness.redis.hexists(pending, "missing"), "an incomplete check")
    assert await harness.entries() == []

    await upload(s3_backend, "models/llama/", model, rest, harness.publish)
    entry = await harness.wait_entry(uri)
    await wait_until(lambda: _not(harness.redis.exists(pending)), "the pending mark to go")
    await asyncio.sleep(FAST.debounce_s * 2)  # late duplicates would start a second stream now
    assert await streams_counted(1, ctl) == 1 and entry.tensors == len(model.tensors)
    assert_bit_exact(uri, harness.settings, model.tensors)
    want = await harness.redis.hgetall(KEYS.desired(ctl.node))
    assert [json.loads(v)["source"] for v in want.values()] == ["watch"]


async def _not(awaitable: Awaitable[Any]) -> bool:
    return not await awaitable


@pytest.mark.parametrize("fmt", ["s3-stream", "gcs-object", "gcs-pubsub-push", "request"])
async def test_each_event_format_warms_its_model(harness: Harness, fmt: str, tmp_path: Path,
                                                 request: pytest.FixtureRequest) -> None:
    backend: Backend = request.getfixturevalue("gcs_backend" if fmt.startswith("gcs")
                                               else "s3_backend")
    model = make_model(tmp_path / "src", shards=1)
    uri = backend.uri_for("models/m/")
    await harness.start(watch=(str(backend.uri_for("models/")),))
    for name, data in model.files.items():
        backend.put("models/m/" + name, data)
        key = "models/m/" + name
        if fmt == "s3-stream":
            await harness.xadd(s3_event(backend.bucket, key, data))
        elif fmt.startswith("gcs"):
            await harness.publish(gcs_event(backend.bucket, key, data,
                                            envelope=fmt == "gcs-pubsub-push"))
    if fmt == "request":
        await harness.publish(ask("deploy", uri))
    await harness.wait_entry(uri)
    assert_bit_exact(uri, harness.settings, model.tensors)


# --- requests -------------------------------------------------------------------------------


async def test_deploy_pin_evict_and_capacity(harness: Harness, s3_backend: Backend,
                                             tmp_path: Path) -> None:
    a, b = s3_backend.uri_for("a/"), s3_backend.uri_for("b/")
    for prefix, seed in (("a/", 0), ("b/", 3)):  # equal seeds mod 3: equal sizes
        for name, data in make_model(tmp_path / prefix, seed=seed).files.items():
            s3_backend.put(prefix + name, data)
    ctl = await harness.start()
    await harness.xadd(ask("pin", a, request_id="r1"), node=ctl.node)
    reply = await harness.reply("r1")
    assert reply["state"] == "warm" and reply["pinned"] is True and reply["node"] == ctl.node
    # Room for one model only: the pinned one may not be evicted to make room.
    ctl.pool.settings = replace(ctl.pool.settings, host_capacity=reply["bytes"] * 3 // 2)
    await harness.xadd(ask("deploy", b, request_id="r2"))
    reply = await harness.reply("r2")
    assert reply["state"] == "failed" and "needs" in reply["error"]
    assert (await harness.wait_entry(a)).pinned

    await harness.xadd(ask("unpin", a, request_id="r3"))
    assert (await harness.reply("r3"))["pinned"] is False
    await harness.xadd(ask("deploy", b, request_id="r4"))
    assert (await harness.reply("r4"))["state"] == "warm"
    await harness.wait_entry(a, State.EVICTED)  # now capacity could take it

    await harness.xadd(ask("evict", b, request_id="r5"))
    assert (await harness.reply("r5"))["state"] == "evicted"
    await harness.wait_entry(b, State.EVICTED)
    desired = await harness.redis.hkeys(KEYS.desired(ctl.node))
    assert desired == [f"cpu|{a}".encode()]  # a: still desired (unpinned); b: evicted
    await wait_until(lambda: _no_pending(harness, KEYS.requests_stream), "every entry's ack")


async def test_bad_events_go_to_the_dead_letter_stream_and_serving_goes_on(
        harness: Harness, s3_backend: Backend, tmp_path: Path) -> None:
    watched = s3_backend.uri_for("models/")
    ctl = await harness.start(watch=(str(watched),))
    bad: list[tuple[str, bytes]] = [
        ("not_json", b"{this is not json"),
        ("not_json", b"\xff\xfe\x00"),
        ("unknown_shape", json.dumps({"hello": "world"}).encode()),
        ("unknown_shape", json.dumps([1, 2, 3]).encode()),
        ("bad_uri", ask("deploy", "ftp://host/model/")),
        ("bad_uri", ask("deploy", "relative/path")),
        ("bad_action", ask("explode", watched)),
        ("bad_device", ask("deploy", watched, device="tpu:0")),
        ("bad_field", ask("deploy", watched, devcie="cpu")),
        ("not_watched", s3_event("some-other-bucket", "models/x/config.json", b"{}")),
        ("not_watched", s3_event(s3_backend.bucket, "elsewhere/x/config.json", b"{}")),
        ("unsafe_key", s3_event(s3_backend.bucket, "models/../../etc/passwd", b"")),
        ("oversized", b"{" + b" " * (300 * 1024) + b"}"),
    ]
    for i, (_, payload) in enumerate(bad):
        if i % 2:
            await harness.publish(payload)
        else:
            await harness.xadd(payload)
    await harness.redis.xadd(KEYS.requests_stream, {"something": "else"})  # no payload field
    expected = sorted([reason for reason, _ in bad] + ["unknown_shape"])
    dead = await wait_until(lambda: _dead_when(harness, len(expected)), "dead letters")
    assert sorted(d["reason"] for d in dead) == expected
    assert all(d["detail"] and d["node"] == ctl.node for d in dead)
    assert {d["source"] for d in dead} == {KEYS.events_channel, KEYS.requests_stream}
    oversized = next(d for d in dead if d["reason"] == "oversized")
    assert oversized["truncated"] == "1" and int(oversized["size"]) > 300 * 1024
    assert len(oversized["payload"]) <= 4096
    assert ctl.metrics.rejected.labels("not_watched")._value.get() == 2

    # ... and the controller still serves: a good event after them works.
    model = make_model(tmp_path / "src", shards=1)
    for name, data in model.files.items():
        s3_backend.put("models/ok/" + name, data)
    await harness.xadd(ask("deploy", s3_backend.uri_for("models/ok/")))
    await harness.wait_entry(s3_backend.uri_for("models/ok/"))
    # bad entries are acknowledged, not retried
    await wait_until(lambda: _no_pending(harness, KEYS.requests_stream), "every entry's ack")


async def _dead_when(harness: Harness, count: int) -> list[dict[str, str]] | None:
    dead = await harness.dead()
    return dead if len(dead) >= count else None


# --- failures: Redis, controllers ----------------------------------------------------------


async def test_redis_killed_and_restarted_mid_run(harness: Harness, s3_backend: Backend,
                                                  tmp_path: Path) -> None:
    for prefix, seed in (("models/a/", 0), ("models/b/", 1), ("models/c/", 2)):
        for name, data in make_model(tmp_path / prefix, seed=seed).files.items():
            s3_backend.put(prefix + name, data)
    a, b = s3_backend.uri_for("models/a/"), s3_backend.uri_for("models/b/")
    ctl = await harness.start(watch=(str(s3_backend.uri_for("models/")),))
    await harness.xadd(ask("deploy", a))
    await harness.wait_entry(a)
    await streams_counted(1, ctl)  # a's request is done, not just its entry warm

    harness.server.kill()
    await asyncio.sleep(1.0)  # the controller's loops notice and back off
    harness.server.restart()  # empty: no persistence
    # The controller writes back what Redis lost: its entry and its desired state...
    await harness.wait_entry(a)
    await wait_until(lambda: harness.redis.hexists(KEYS.desired(ctl.node), f"cpu|{a}"),
                     "desired state to be restored")
    # ... and serves again: a stream request (its consumer group is re-created) ...
    await harness.xadd(ask("deploy", b))
    await harness.wait_entry(b)
    # ... and a pub/sub upload (its subscription is resumed).
    c = s3_backend.uri_for("models/c/")
    await harness.publish(s3_event(s3_backend.bucket, "models/c/config.json", b"{}"))
    await harness.wait_entry(c)
    assert await streams_counted(3, ctl) == 3  # a was not streamed again


async def test_a_sentinel_failover_is_ridden_out(redis_failover: Failover, settings: Settings,
                                                 s3_backend: Backend, tmp_path: Path) -> None:
    """Production Redis: a master, a replica and Sentinel. The controller connects through
    Sentinel; when the master dies and the replica is promoted, it finds the new master
    and keeps serving both event paths, with the state that replication carried over."""
    for prefix, seed in (("models/a/", 0), ("models/b/", 1), ("models/c/", 2)):
        for name, data in make_model(tmp_path / prefix, seed=seed).files.items():
            s3_backend.put(prefix + name, data)
    a, b, c = (s3_backend.uri_for(f"models/{m}/") for m in "abc")
    harness = Harness(redis_failover.master, settings, tmp_path, url=redis_failover.url)
    harness.redis = connect(redis_failover.url)
    try:
        ctl = await harness.start(watch=(str(s3_backend.uri_for("models/")),))
        await harness.xadd(ask("deploy", a))
        await harness.wait_entry(a)
        await streams_counted(1, ctl)

        redis_failover.fail_over()

        await harness.xadd(ask("deploy", b))  # a stream request, through the new master
        await harness.wait_entry(b)
        await harness.publish(s3_event(s3_backend.bucket, "models/c/config.json", b"{}"))
        await harness.wait_entry(c)  # a pub/sub upload: the subscription moved too
        assert await harness.redis.hexists(KEYS.desired(ctl.node), f"cpu|{a}")
        assert await streams_counted(3, ctl) == 3
    finally:
        await harness.stop_all()
        HostTier(settings.runtime_dir).remove_all()
        await harness.redis.aclose()


async def test_a_controller_on_an_empty_redis_adopts_the_warm_host_tier(
        harness: Harness, settings: Settings, tmp_path: Path) -> None:
    """Segments warmed before this Redis knew them (it restarted empty, or is new) are
    registered, not left as memory nobody sees; they are the pool's to evict."""
    model = tmp_path / "m"
    write_model(model, seed=4)
    done = await prefetch(str(model), settings=settings)  # in-process, before any controller
    ctl = await harness.start()
    uri = parse_uri(str(model))
    entry = await harness.wait_entry(uri)
    assert (entry.content_hash, entry.bytes) == (done.entry.content_hash, done.entry.bytes)
    assert streamed(ctl) == 0  # adopted, not streamed again
    await harness.xadd(ask("evict", uri))
    await harness.wait_entry(uri, State.EVICTED)
    assert HostTier(settings.runtime_dir).resident(entry.content_hash) is None


async def test_desired_state_keeps_the_request_that_still_holds(harness: Harness) -> None:
    desired = DesiredState(harness.redis, KEYS, "n1")
    a, b = parse_uri("s3://bucket/a/"), parse_uri("s3://bucket/b/")
    await desired.add(Request("pin", a, "cuda:1", 2, "sharded", node="n1", request_id="r1"))
    kept = await desired.add(Request("deploy", a, "cuda:1", 2, "sharded"), source="watch")
    assert kept == Request("pin", a, "cuda:1", 2, "sharded")  # the pin survives a deploy
    assert await desired.set_pinned(str(a), "cuda:1", False) == Request("deploy", a, "cuda:1", 2,
                                                                         "sharded")
    await desired.add(Request("deploy", b), source="watch")
    assert await desired.all() == [Request("deploy", a, "cuda:1", 2, "sharded"),
                                   Request("deploy", b)]  # the longest-desired first
    stored = {k.decode(): json.loads(v) for k, v in
              (await harness.redis.hgetall(KEYS.desired("n1"))).items()}
    assert [stored[f"cuda:1|{a}"]["source"], stored[f"cpu|{b}"]["source"]] == ["request", "watch"]

    # the older form (pinned, layout) still reads; an unreadable field is skipped
    await harness.redis.hset(KEYS.desired("n1"), f"cpu|{b}", json.dumps(
        {"uri": str(b), "device": "cpu", "tp": 1, "layout": "replicated", "pinned": True,
         "source": "request", "since": 0.0}))
    await harness.redis.hset(KEYS.desired("n1"), "cpu|junk", '{"uri": "not a uri"}')
    assert await desired.all() == [Request("pin", b), Request("deploy", a, "cuda:1", 2, "sharded")]

    await harness.redis.delete(KEYS.desired("n1"))  # Redis came back empty
    assert await desired.resync() == 2 and len(await desired.all()) == 2


async def test_restarted_controller_reconciles_desired_state(harness: Harness,
                                                             s3_backend: Backend,
                                                             tmp_path: Path) -> None:
    model = make_model(tmp_path / "src", shards=2)
    for name, data in model.files.items():
        s3_backend.put("m/" + name, data)
    uri = s3_backend.uri_for("m/")
    first = await harness.start()
    await harness.xadd(ask("deploy", uri))
    before = await harness.wait_entry(uri)
    await harness.crash(first)
    HostTier(harness.settings.runtime_dir).remove_all()  # as a reboot would

    second = await harness.start()
    after = await harness.wait_entry(uri)
    assert after.created_at > before.created_at and await streams_counted(1, second) == 1
    assert_bit_exact(uri, harness.settings, model.tensors)


async def test_entries_of_a_dead_consumer_are_claimed(harness: Harness, s3_backend: Backend,
                                                      tmp_path: Path) -> None:
    for name, data in make_model(tmp_path / "src", shards=1).files.items():
        s3_backend.put("m/" + name, data)
    uri = s3_backend.uri_for("m/")
    # A controller read this entry and died before acknowledging it.
    stream = KEYS.requests_stream
    await harness.redis.xgroup_create(stream, KEYS.consumer_group, id="0", mkstream=True)
    await harness.xadd(ask("deploy", uri))
    taken = await harness.redis.xreadgroup(KEYS.consumer_group, "dead-one", {stream: ">"})
    assert len(taken[0][1]) == 1

    await harness.start()
    await harness.wait_entry(uri)
    await wait_until(lambda: _no_pending(harness, stream), "the entry to be acknowledged")


async def _no_pending(harness: Harness, stream: str) -> bool:
    return (await harness.redis.xpending(stream, KEYS.consumer_group))["pending"] == 0


async def test_two_controllers_stream_a_model_once_per_device(harness: Harness,
                                                              s3_backend: Backend,
                                                              tmp_path: Path) -> None:
    for name, data in make_model(tmp_path / "src", shards=3).files.items():
        s3_backend.put("m/" + name, data)
    uri = s3_backend.uri_for("m/")
    one = await harness.start()
    two = await harness.start()  # same node, same host tier: a rolling restart's overlap
    ids = [uuid.uuid4().hex for _ in range(8)]
    for i, rid in enumerate(ids):
        payload = ask("deploy", uri, request_id=rid)
        await (harness.publish(payload) if i % 2 else harness.xadd(payload, node=one.node))
    replies = [await harness.reply(rid) for rid in ids]
    assert {r["state"] for r in replies} == {"warm"}
    assert streamed(one, two) == 1
    assert len(await harness.entries()) == 1


async def test_deploys_are_placed_on_one_node(harness: Harness, s3_backend: Backend,
                                              tmp_path: Path) -> None:
    for name, data in make_model(tmp_path / "src", shards=1).files.items():
        s3_backend.put("m/" + name, data)
    uri = s3_backend.uri_for("m/")
    n1 = await harness.start(node="node-1", runtime="rt1")
    n2 = await harness.start(node="node-2", runtime="rt2")
    await harness.xadd(ask("deploy", uri, request_id="p1"))
    first = await harness.reply("p1")
    # Asked again through the other controller: it goes where the model already is.
    await harness.publish(ask("deploy", uri, request_id="p2"))
    second = await harness.reply("p2")
    assert first["node"] == second["node"] and second["already_warm"]
    assert [e.node for e in await harness.entries()] == [first["node"]]
    assert streamed(n1, n2) == 1
    # An evict naming no node reaches whichever node holds it.
    await harness.xadd(ask("evict", uri))
    await harness.wait_entry(uri, State.EVICTED, node=first["node"])


async def test_reupload_warms_new_version_and_retires_old_after_lease(
        harness: Harness, s3_backend: Backend, tmp_path: Path) -> None:
    old = make_model(tmp_path / "v1", shards=2, seed=0)
    new = make_model(tmp_path / "v2", shards=2, seed=1)
    uri = s3_backend.uri_for("models/m/")
    ctl = await harness.start(watch=(str(s3_backend.uri_for("models/")),))
    await upload(s3_backend, "models/m/", old, sorted(old.files), harness.publish)
    v1 = await harness.wait_entry(uri)
    lease = attach(str(uri), settings=harness.settings)  # a serving process uses v1
    try:
        await upload(s3_backend, "models/m/", new, sorted(new.files), harness.xadd)
        v2 = await harness.wait_entry(uri, content_hash=(await _other_hash(harness, uri, v1)))
        assert v2.content_hash != v1.content_hash
        assert_bit_exact(uri, harness.settings, new.tensors)
        # v1 is leased: it stays, marked for retirement, until the lease ends.
        retiring = KEYS.retiring(ctl.node)
        await wait_until(lambda: harness.redis.sismember(retiring, v1.key), "v1 to be retiring")
        assert (await harness.wait_entry(uri, content_hash=v1.content_hash)).state == State.WARM
    finally:
        lease.close()
    await harness.wait_entry(uri, State.EVICTED, content_hash=v1.content_hash)
    assert await streams_counted(2, ctl) == 2


async def _other_hash(harness: Harness, uri: object, than: PoolEntry) -> str:
    async def found() -> str | None:
        for e in await harness.entries():
            if e.uri == str(uri) and e.content_hash != than.content_hash and e.state == State.WARM:
                return e.content_hash
        return None

    return str(await wait_until(found, "the new version to be warm"))


async def test_stop_abandons_a_stream_in_flight_without_leaving_it_partial(
        harness: Harness, s3_backend: Backend, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import warmpool.tiers.prefetch
    from tests.pool_env import segments_of

    model = make_model(tmp_path / "src", shards=2)
    for name, data in model.files.items():
        s3_backend.put("m/" + name, data)
    uri = s3_backend.uri_for("m/")
    real_fill = warmpool.tiers.prefetch.fill_buffer

    async def stalled_fill(*args: Any, **kwargs: Any) -> str:
        await asyncio.sleep(60)  # a very slow store: the stream is still running at SIGTERM
        return await real_fill(*args, **kwargs)

    monkeypatch.setattr(warmpool.tiers.prefetch, "fill_buffer", stalled_fill)
    first = await harness.start()
    await harness.xadd(ask("deploy", uri))
    await harness.wait_entry(uri, State.STREAMING)
    await harness.stop_all()  # grace 1 s, then the stream is cancelled
    failed = await harness.wait_entry(uri, State.FAILED)
    assert failed.error == "interrupted" and segments_of(harness.settings) == []
    assert not first.dispatcher.busy
    # Its stream entry was never acknowledged: the next controller takes it over.
    monkeypatch.setattr(warmpool.tiers.prefetch, "fill_buffer", real_fill)
    await harness.start()
    await harness.wait_entry(uri)
    await wait_until(lambda: _no_pending(harness, KEYS.requests_stream), "the entry's ack")
    assert_bit_exact(uri, harness.settings, model.tensors)


async def test_evict_cancels_a_warm_up_in_flight(harness: Harness, s3_backend: Backend,
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import warmpool.tiers.prefetch

    for name, data in make_model(tmp_path / "src", shards=1).files.items():
        s3_backend.put("m/" + name, data)
    uri = s3_backend.uri_for("m/")

    async def stalled_fill(*args: Any, **kwargs: Any) -> str:
        await asyncio.sleep(60)
        raise AssertionError("never reached")

    monkeypatch.setattr(warmpool.tiers.prefetch, "fill_buffer", stalled_fill)
    ctl = await harness.start()
    await harness.xadd(ask("deploy", uri, request_id="d"))
    await harness.wait_entry(uri, State.STREAMING)
    await harness.xadd(ask("evict", uri, request_id="e"))
    assert (await harness.reply("d"))["state"] == "cancelled"
    assert (await harness.reply("e"))["state"] == "evicted"
    await harness.wait_entry(uri, State.EVICTED)
    # both requests are done: neither is retried (which would deploy it again)
    await wait_until(lambda: _no_pending(harness, KEYS.requests_stream), "both acks")
    assert await harness.redis.hlen(KEYS.desired(ctl.node)) == 0


async def test_a_gpu_deploy_without_gpu_workers_fails_clearly(harness: Harness,
                                                              s3_backend: Backend,
                                                              tmp_path: Path) -> None:
    for name, data in make_model(tmp_path / "src", shards=1).files.items():
        s3_backend.put("m/" + name, data)
    uri = s3_backend.uri_for("m/")
    ctl = await harness.start()
    await harness.xadd(ask("deploy", uri, device="cuda:0", request_id="g"))
    reply = await harness.reply("g")
    assert reply["state"] == "failed" and "no GPU workers on this node" in reply["error"]
    failed = await harness.wait_entry(uri, State.FAILED, device="cuda:0")
    assert failed.error == reply["error"] and failed.node == ctl.node
