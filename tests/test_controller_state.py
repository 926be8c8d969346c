"""The controller's state under faults: a Redis replaced under it, repeated pub/sub
requests, desired models that keep failing. Real Redis, real controllers."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from tests.controller_harness import FAST, KEYS, Harness, ask, wait_until
from tests.models import model_files, write_model
from tests.servers import Backend
from warmpool.attachment import attach
from warmpool.config import Settings
from warmpool.contract.requests import Request
from warmpool.controller import remote
from warmpool.controller import uploads as uploads_module
from warmpool.controller.loop import Controller, redis_run_id
from warmpool.model.uri import ModelURI, parse_uri
from warmpool.pool.registry.base import State

QUIET = replace(FAST, heartbeat_s=600.0, claim_idle_s=600.0)  # we call _beat ourselves


async def test_a_fast_redis_restart_is_detected_and_nothing_is_erased(
        harness: Harness, tmp_path: Path) -> None:
    """A restart fast enough for the client's retries to recreate the heartbeat (so the
    heartbeat canary sees nothing) is still detected by the server's run_id; a pass that
    read the empty desired state in between does not erase what the node knows: the
    entry and the desired model are written back."""
    model = tmp_path / "m"
    write_model(model, shards=1, seed=3)
    uri = parse_uri(str(model))
    ctl = await harness.start(options=QUIET)
    await harness.xadd(ask("deploy", uri))
    await harness.wait_entry(uri)
    before = await redis_run_id(harness.redis)
    heartbeat = await harness.redis.get(KEYS.node(ctl.node))
    assert heartbeat is not None

    harness.server.restart()  # empty: no persistence
    await wait_until(lambda: _set(harness, KEYS.node(ctl.node), heartbeat),
                     "the heartbeat recreated (as the client's retries do)")
    assert await redis_run_id(harness.redis) != before
    assert await ctl.desired.all() == []  # a convergence pass sees the empty Redis

    await ctl._beat()
    await harness.wait_entry(uri)
    assert await harness.redis.hexists(KEYS.desired(ctl.node), f"cpu|{uri}")
    assert [str(w.uri) for w in await ctl.desired.all()] == [str(uri)]


async def _set(harness: Harness, key: str, value: bytes) -> bool:
    try:
        return bool(await harness.redis.set(key, value, ex=600))
    except Exception:  # noqa: BLE001 - Redis still starting
        await asyncio.sleep(0.05)
        return False


async def test_identical_pubsub_requests_are_distinct_messages_kept_in_order(
        harness: Harness, tmp_path: Path) -> None:
    """deploy X, evict X, deploy X within the claim TTL: three messages, each acted on,
    in order — X ends warm and desired. Sent back to back, the same holds."""
    model = tmp_path / "m"
    write_model(model, shards=1, seed=5)
    uri = parse_uri(str(model))
    ctl = await harness.start()
    field = f"cpu|{uri}"

    await harness.publish(ask("deploy", uri))
    await harness.wait_entry(uri)
    await harness.publish(ask("evict", uri))
    await harness.wait_entry(uri, State.EVICTED)
    await harness.publish(ask("deploy", uri))  # the same body as the first: not a duplicate
    await harness.wait_entry(uri)
    assert await harness.redis.hexists(KEYS.desired(ctl.node), field)
    await harness.publish(ask("evict", uri))  # and the second evict is not one either
    await harness.wait_entry(uri, State.EVICTED)
    assert not await harness.redis.hexists(KEYS.desired(ctl.node), field)

    for actions, last in ((("deploy", "evict", "deploy", "evict", "deploy"), State.WARM),
                          (("evict", "deploy", "evict"), State.EVICTED)):
        for action in actions:  # back to back
            await harness.redis.publish(KEYS.events_channel, ask(action, uri))
        await wait_until(lambda: _settled(ctl), "the requests to be done")
        newest = max((e for e in await harness.entries() if e.uri == str(uri)),
                     key=lambda e: e.updated_at)
        assert newest.state == last, actions
        assert await harness.redis.hexists(KEYS.desired(ctl.node), field) == (
            last == State.WARM)
    claims = [k async for k in harness.redis.scan_iter(match=KEYS.claim("*"))]
    assert len(claims) == 12  # one claim per message


async def _settled(ctl: Controller) -> bool:
    await asyncio.sleep(0.2)  # the last message may be on its way to the subscriber
    return not ctl.pubsub.tasks and not ctl.dispatcher.busy


def broken_models(root: Path, count: int) -> list[ModelURI]:
    """Directories that exist but cannot be listed (a dangling link in each): accepted,
    since the store cannot say that nothing is there, then failing on every try."""
    uris = []
    for i in range(count):
        path = root / f"missing-{i}"
        path.mkdir(parents=True)
        (path / "config.json").symlink_to(root / "nowhere")
        uris.append(parse_uri(str(path)))
    return uris


async def test_deploys_of_broken_models_back_off_are_given_up_and_stay_bounded(
        harness: Harness, settings: Settings, tmp_path: Path) -> None:
    """60 deploys of distinct models that cannot be warmed, on a node that may want 20:
    the desired state and the failure records stay at 20; each wanted model is tried
    ``give_up_after`` times with backoff, then given up with its reason (listed for
    ``warmpool status``) and no convergence pass starts work for it; an evict removes one."""
    options = replace(FAST, max_desired=20, failure_backoff_s=0.1, failure_backoff_cap_s=0.2,
                      give_up_after=2, recheck_s=0.2)
    ctl = await harness.start(options=options)
    missing = broken_models(tmp_path, 60)
    replies = []
    for i, uri in enumerate(missing):
        await harness.xadd(ask("deploy", uri, request_id=f"r{i}"))
        replies.append(await harness.reply(f"r{i}"))
    assert all(r["state"] == "failed" for r in replies)

    async def all_given_up() -> bool:
        records = await ctl.failures.all()
        return bool(records) and all(f.given_up for f in records.values())

    await wait_until(all_given_up, "every wanted model to be given up")
    assert 0 < await harness.redis.hlen(KEYS.desired(ctl.node)) <= 20
    records = await ctl.failures.all()
    assert len(records) <= 20
    assert {f.failures for f in records.values()} == {2}
    assert all("missing-" in f.error for f in records.values())
    assert await ctl.converge() == 0  # given up: no pass costs work for them
    assert await ctl.reconcile() == 0

    listed = await remote.failing(harness.server.url, replace(settings, node=ctl.node))
    assert {f.uri for f in listed} == {f.uri for f in records.values()}
    gone = listed[0]
    await harness.xadd(ask("evict", gone.uri, request_id="bye"))
    await harness.reply("bye")
    assert not await harness.redis.hexists(KEYS.desired(ctl.node), f"cpu|{gone.uri}")
    assert gone.uri not in {f.uri for f in await remote.failing(
        harness.server.url, replace(settings, node=ctl.node))}


async def test_a_deploy_of_the_same_content_under_another_uri_names_it_too(
        harness: Harness, s3_backend: Backend, tmp_path: Path) -> None:
    """a is warm; a deploy of b (identical files) over pub/sub is acted on: b names the
    resident bytes (listed, attachable, no second stream); an evict of b leaves a."""
    files = model_files_of(tmp_path / "src")
    for prefix in ("models/a/", "models/b/"):
        for name, data in files.items():
            s3_backend.put(prefix + name, data)
    a, b = (s3_backend.uri_for(f"models/{m}/") for m in "ab")
    ctl = await harness.start()
    await harness.xadd(ask("deploy", a))
    entry = await harness.wait_entry(a)
    await harness.publish(ask("deploy", b, request_id="b"))
    reply = await harness.reply("b")
    assert reply["state"] == "warm" and reply["content_hash"] == entry.content_hash
    [named] = [e for e in await harness.entries() if e.content_hash == entry.content_hash]
    assert named.uris == [str(a), str(b)]
    with attach(str(b), settings=ctl.settings) as weights:
        assert len(weights) > 0
    assert await ctl.converge() == 0  # b is warm: nothing to start

    await harness.xadd(ask("evict", b, request_id="eb"))
    assert (await harness.reply("eb"))["state"] == "evicted"
    [named] = [e for e in await harness.entries() if e.content_hash == entry.content_hash]
    assert named.state == State.WARM and named.uris == [str(a)]
    with attach(str(a), settings=ctl.settings) as weights:
        assert len(weights) > 0


def model_files_of(directory: Path) -> dict[str, bytes]:
    write_model(directory, shards=1, seed=13)
    return model_files(directory)


async def test_a_convergence_pass_starts_a_bounded_number_of_warm_ups(
        harness: Harness, tmp_path: Path) -> None:
    """However many models are desired, one pass starts at most max_inflight warm-ups
    (the next pass goes on), so a large desired state cannot flood Redis connections."""
    ctl = await harness.start(options=replace(FAST, max_inflight=2, recheck_s=600.0))
    for i in range(6):
        await ctl.desired.add(Request("deploy", parse_uri(str(tmp_path / f"missing-{i}"))))
    assert await ctl.converge() == 2
    assert len(ctl._tasks) <= 2


async def test_history_is_forgotten_after_its_time_and_warm_entries_are_kept(
        harness: Harness, tmp_path: Path) -> None:
    """A node run only by a controller (no CLI ever prunes its registry) still forgets
    evicted entries once they are older than ``history_keep_s``; warm ones stay."""
    write_model(tmp_path / "kept", shards=1, seed=11)
    write_model(tmp_path / "dropped", shards=1, seed=12)
    kept, dropped = parse_uri(str(tmp_path / "kept")), parse_uri(str(tmp_path / "dropped"))
    ctl = await harness.start(options=replace(FAST, recheck_s=0.2, history_keep_s=1.0))
    for model in (kept, dropped):
        await harness.xadd(ask("deploy", model))
        await harness.wait_entry(model)
    await harness.xadd(ask("evict", dropped))
    await harness.wait_entry(dropped, State.EVICTED)

    async def forgotten() -> bool:
        return all(e.uri != str(dropped) for e in await harness.entries())

    await wait_until(forgotten, "the evicted entry to be forgotten")
    states = {e.uri: e.state for e in await harness.entries()}
    assert states == {str(kept): State.WARM}
    assert ctl.options.history_keep_s == 1.0


async def test_an_identical_deploy_after_a_controller_restart_is_acted_on(
        harness: Harness, tmp_path: Path) -> None:
    """deploy X, evict X, restart the controller, deploy X again (the same body, within
    the claims' lifetime): the restarted controller must not take it for the first
    deploy's broadcast. It did, and the model stayed cold with nothing desired."""
    model = tmp_path / "m"
    write_model(model, shards=1, seed=7)
    uri = parse_uri(str(model))
    ctl = await harness.start()
    await harness.publish(ask("deploy", uri))
    await harness.wait_entry(uri)
    await harness.publish(ask("evict", uri))
    await harness.wait_entry(uri, State.EVICTED)
    await harness.stop_all()
    ctl = await harness.start()
    assert [k async for k in harness.redis.scan_iter(match=KEYS.claim("*"))]  # still live
    await harness.publish(ask("deploy", uri))
    await harness.wait_entry(uri)
    assert await harness.redis.hexists(KEYS.desired(ctl.node), f"cpu|{uri}")


async def test_bogus_deploys_never_lock_out_a_real_one(harness: Harness,
                                                      tmp_path: Path) -> None:
    """Deploys of paths where nothing is are refused on arrival and take no room; deploys
    of models that fail fill the desired state, yet a real deploy still gets in (a
    failing model does not hold room against it). 1,100 bogus deploys once filled
    max_desired and a real deploy was refused for minutes."""
    options = replace(FAST, max_desired=10, failure_backoff_s=30.0, give_up_after=5)
    ctl = await harness.start(options=options)
    for i in range(40):
        await harness.xadd(ask("deploy", parse_uri(str(tmp_path / f"nothing-{i}")),
                               request_id=f"n{i}"))
        reply = await harness.reply(f"n{i}")
        assert reply["state"] == "failed" and "holds nothing there" in reply["error"]
    assert await harness.redis.hlen(KEYS.desired(ctl.node)) == 0
    for i, uri in enumerate(broken_models(tmp_path / "broken", 10)):
        await harness.xadd(ask("deploy", uri, request_id=f"b{i}"))
        assert (await harness.reply(f"b{i}"))["state"] == "failed"
    assert await harness.redis.hlen(KEYS.desired(ctl.node)) == 10  # full of failing ones
    real = tmp_path / "real"
    write_model(real, shards=1, seed=9)
    await harness.xadd(ask("deploy", parse_uri(str(real)), request_id="real"))
    assert (await harness.reply("real"))["state"] == "warm"
    assert await harness.redis.hexists(KEYS.desired(ctl.node), f"cpu|{parse_uri(str(real))}")


def _records(bucket: str, keys: list[str]) -> bytes:
    return json.dumps({"Records": [
        {"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
         "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 1, "eTag": "e"}}}
        for key in keys]}).encode()


async def test_floods_of_uploads_for_missing_objects_stay_bounded_and_are_forgotten(
        harness: Harness, s3_backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Payloads of many records for objects that do not exist: a payload's records of one
    model are one event; the pending set is capped; a prefix that lists empty is
    forgotten; an incomplete model's re-checks back off. (20 payloads of 1,000 records
    once made 20,000 pending keys and 400 listings per 15 s with no new events.)"""
    monkeypatch.setattr(uploads_module, "MAX_PENDING", 30)
    ctl = await harness.start(watch=(str(s3_backend.uri_for("models/")),),
                              options=replace(FAST, recheck_s=0.2))
    bucket = s3_backend.bucket
    # 300 records of one model in one payload: one event, not 300.
    await harness.xadd(_records(bucket, [f"models/one/f{i}.json" for i in range(300)]))
    one = s3_backend.uri_for("models/one/")
    await wait_until(lambda: harness.redis.exists(KEYS.upload_pending(one)), "one pending")
    assert int(await harness.redis.hget(KEYS.upload_pending(one), "events")) == 1
    # 100 models in one payload: at most 30 pending at once.
    await harness.xadd(_records(bucket, [f"models/m{i}/config.json" for i in range(100)]))
    await asyncio.sleep(0.5)
    assert await harness.redis.scard(KEYS.uploads_pending) <= 30
    # Nothing exists under any of them: all forgotten after their check.
    await wait_until(lambda: _none_pending(harness), "the empty prefixes to be forgotten")
    assert not [k async for k in harness.redis.scan_iter(match=KEYS.upload_pending("*"))]
    # An incomplete model (config only) is re-checked, ever more rarely.
    s3_backend.put("models/half/config.json", b"{}")
    await harness.xadd(_records(bucket, ["models/half/config.json"]))
    half = KEYS.upload_pending(s3_backend.uri_for("models/half/"))
    await wait_until(lambda: harness.redis.hexists(half, "missing"), "an incomplete check")
    await asyncio.sleep(4.0)  # 20 sweeps of 0.2 s: backoff 0.2, 0.4, 0.8, 1.6, 3.2 s
    checks = int(await harness.redis.hget(half, "checks"))
    assert 2 <= checks <= 6, checks
    assert ctl.uploads.dropped > 0


async def _none_pending(harness: Harness) -> bool:
    return await harness.redis.scard(KEYS.uploads_pending) == 0
