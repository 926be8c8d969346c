"""The fleet: a deploy for several nodes (``nodes: all``, ``replicas: N``,
``node_selector``) warms on each chosen node, a node that joins later gets it, and a
replica whose node dies is placed again. Real Redis, three real controllers in this
process, each with a runtime directory of its own (its own host tier); peers (NIXL) are
not built yet, so each node reads the model from its store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    make_model,
    upload,
    wait_until,
)
from tests.servers import Backend
from warmpool.contract.requests import Spread, parse_request
from warmpool.errors import BadEvent
from warmpool.model.uri import parse_uri
from warmpool.pool.registry.base import State


def cluster_status(harness: Harness, node: str) -> list[dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "warmpool", "status", "--cluster", "--json",
                           "--redis", harness.server.url], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "WARMPOOL_NODE": node})
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


async def warm_nodes(harness: Harness, uri: object) -> set[str]:
    return {e.node for e in await harness.entries()
            if e.uri == str(uri) and e.state == State.WARM}


async def wait_nodes(harness: Harness, uri: object, nodes: set[str]) -> None:
    async def exactly() -> bool:
        return await warm_nodes(harness, uri) == nodes

    await wait_until(exactly, f"{uri} warm on exactly {sorted(nodes)}")


def test_the_spread_of_a_request_is_checked() -> None:
    base = {"action": "deploy", "uri": "s3://b/m/"}
    assert parse_request(base).spread is None
    assert parse_request({**base, "nodes": "all"}).spread == Spread(None, True)
    assert parse_request({**base, "replicas": 2}).spread == Spread(2, False)
    sel = parse_request({**base, "node_selector": {"gpu": "h100", "zone": "a"}})
    assert sel.spread == Spread(1, False, (("gpu", "h100"), ("zone", "a")))
    assert parse_request(sel.to_doc()) == sel
    assert sel.spread.matches({"gpu": "h100", "zone": "a", "x": "y"})
    assert not sel.spread.matches({"gpu": "h100"})
    for bad in ({"nodes": "some"}, {"replicas": 0}, {"replicas": True},
                {"replicas": 2, "nodes": "all"}, {"node_selector": {"gpu": 1}},
                {"node_selector": {"a b": "c"}}, {"node_selector": "gpu=h100"},
                {"nodes": "all", "node": "n1"}):
        with pytest.raises(BadEvent):
            parse_request({**base, **bad})
    with pytest.raises(BadEvent, match="deploy or pin"):
        parse_request({"action": "evict", "uri": "s3://b/m/", "nodes": "all"})


async def test_nodes_all_warms_every_node_and_one_that_joins_later(
        harness: Harness, tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", shards=3, seed=11)
    uri = parse_uri(str(tmp_path / "m"))
    a = await harness.start(node="a", runtime="rt-a")
    b = await harness.start(node="b", runtime="rt-b")
    await harness.xadd(ask("deploy", uri, nodes="all", request_id="f1"))
    await wait_nodes(harness, uri, {"a", "b"})
    assert (await harness.reply("f1"))["state"] == "warm"
    c = await harness.start(node="c", runtime="rt-c")  # joins later: gets it by itself
    await wait_nodes(harness, uri, {"a", "b", "c"})
    for ctl in (a, b, c):
        assert_bit_exact(uri, ctl.settings, model.tensors)
    [view] = cluster_status(harness, a.settings.node)
    size = sum(t.numel() * t.element_size() for t in model.tensors.values())
    assert view["uri"] == str(uri) and view["wanted"] == "every node"
    assert view["nodes"] == {"a": "warm", "b": "warm", "c": "warm"}
    assert view["bytes"] >= size and view["store_bytes"] == 3 * view["bytes"]
    # An evict naming no node ends the fleet's want: nothing comes back.
    await harness.xadd(ask("evict", uri))
    await wait_nodes(harness, uri, set())
    assert await harness.redis.hlen(KEYS.fleet) == 0
    d = await harness.start(node="d", runtime="rt-d")
    assert await d.join_fleet() == 0 and await a.join_fleet() == 0


async def test_a_node_selector_picks_the_nodes_by_their_labels(
        harness: Harness, tmp_path: Path) -> None:
    make_model(tmp_path / "m", shards=2, seed=12)
    uri = parse_uri(str(tmp_path / "m"))
    await harness.start(node="a", runtime="rt-a", labels={"gpu": "h100"})
    await harness.start(node="b", runtime="rt-b", labels={"gpu": "a10"})
    await harness.start(node="c", runtime="rt-c", labels={"gpu": "h100", "zone": "x"})
    await harness.xadd(ask("deploy", uri, nodes="all", node_selector={"gpu": "h100"}))
    await wait_nodes(harness, uri, {"a", "c"})
    heartbeat = json.loads(await harness.redis.get(KEYS.node("c")))
    assert heartbeat["labels"] == {"gpu": "h100", "zone": "x"}


async def test_replicas_are_exactly_n_and_a_lost_one_is_placed_again(
        harness: Harness, tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", shards=2, seed=13)
    uri = parse_uri(str(tmp_path / "m"))
    controllers = {n: await harness.start(node=n, runtime=f"rt-{n}") for n in "abc"}
    await harness.xadd(ask("pin", uri, replicas=2, request_id="r1"))
    await wait_until(lambda: _count(harness, uri, 2), "two replicas")
    first = await warm_nodes(harness, uri)
    # A few maintenance passes later, still exactly two.
    for ctl in controllers.values():
        await ctl.join_fleet()
    assert await warm_nodes(harness, uri) == first
    [spare] = set("abc") - first
    gone = sorted(first)[0]
    await harness.crash(controllers[gone])  # its heartbeat expires: re-placed
    await harness.redis.delete(KEYS.node(gone))  # as its TTL would, sooner
    await wait_until(lambda: _warm_on(harness, uri, spare), f"the replica on {spare}")
    survivors = {e.node for e in await harness.entries()
                 if e.uri == str(uri) and e.state == State.WARM and e.node != gone}
    assert survivors == first - {gone} | {spare}
    assert_bit_exact(uri, controllers[spare].settings, model.tensors)

    async def pinned() -> bool:  # the fleet's request was a pin: so is the new replica
        return (await harness.wait_entry(uri, node=spare)).pinned

    await wait_until(pinned, f"the replica on {spare} pinned")


async def _count(harness: Harness, uri: object, n: int) -> bool:
    return len(await warm_nodes(harness, uri)) == n


async def _warm_on(harness: Harness, uri: object, node: str) -> bool:
    return node in await warm_nodes(harness, uri)


async def test_an_upload_under_a_prefix_watched_for_every_node_warms_each(
        harness: Harness, s3_backend: Backend, tmp_path: Path) -> None:
    model = make_model(tmp_path / "src", shards=3, seed=14)
    watch = ({"uri": str(s3_backend.uri_for("models/")), "nodes": "all"},)
    # Three nodes in one process here, so three streams from S3 at once in one process:
    # runai-model-streamer failed two of them ("failed reading"), which real nodes (a
    # process each) never see; warmpool's own async reader streams all three.
    options = replace(FAST, loader="native")
    controllers = [await harness.start(node=n, runtime=f"rt-{n}", watch=watch, options=options,
                                       cache_dir=harness.tmp / f"cache-{n}") for n in "abc"]
    uri = s3_backend.uri_for("models/llama/")
    await upload(s3_backend, "models/llama/", model, sorted(model.files), harness.publish)
    await wait_nodes(harness, uri, {"a", "b", "c"})
    for ctl in controllers:
        assert_bit_exact(uri, ctl.settings, model.tensors)
    [view] = cluster_status(harness, "a")
    assert view["wanted"] == "every node" and view["peer_bytes"] == 0


def test_a_watch_entry_may_carry_the_fleet_fields(tmp_path: Path) -> None:
    from warmpool.config import Settings
    from warmpool.contract.watchlist import Watchlist
    from warmpool.errors import ConfigError

    config = tmp_path / "w.yaml"
    config.write_text("watch:\n  - s3://b/plain/\n  - uri: s3://b/fleet/\n    replicas: 2\n"
                      "    node_selector: {gpu: h100}\n")
    watch = Watchlist.parse(Settings.load(config).watch)
    assert watch.match("s3", "b", "fleet/m/x.safetensors") == parse_uri("s3://b/fleet/m/")
    assert watch.spread_for(parse_uri("s3://b/fleet/m/")) == Spread(2, False, (("gpu", "h100"),))
    assert watch.spread_for(parse_uri("s3://b/plain/m/")) is None
    config.write_text("watch:\n  - uri: s3://b/fleet/\n    nodes: some\n")
    with pytest.raises(ConfigError, match="nodes"):
        Settings.load(config)


def test_node_labels_are_checked_like_a_selector(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from warmpool.config import Settings
    from warmpool.errors import ConfigError

    config = tmp_path / "l.yaml"
    config.write_text("labels: {gpu: h100, zone: eu-1}\n")
    assert Settings.load(config).labels == {"gpu": "h100", "zone": "eu-1"}
    monkeypatch.setenv("WARMPOOL_LABELS", "gpu=a10, zone=us/2")
    assert Settings.load(config).labels == {"gpu": "a10", "zone": "us/2"}
    for bad in ("gpu", "gpu=h 100", "=x", ",".join(f"k{i}=v" for i in range(33))):
        monkeypatch.setenv("WARMPOOL_LABELS", bad)
        with pytest.raises(ConfigError, match="(?i)labels"):
            Settings.load(config)
    monkeypatch.delenv("WARMPOOL_LABELS")
    config.write_text("labels: {gpu: 80}\n")  # a number, not a name
    with pytest.raises(ConfigError, match="(?i)labels"):
        Settings.load(config)
