"""The Redis registry against a real redis-server: entries per node, the index sets,
write stamps, and write-back after a Redis that restarted empty."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.redis_server import RedisServer
from warmpool.contract.keys import RedisKeys
from warmpool.contract.redis_client import connect
from warmpool.pool.registry.base import PoolEntry, State
from warmpool.pool.registry.redis import RedisRegistry

HASH_A = "a" * 64
HASH_B = "b" * 64


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[object]:
    client = connect(redis_server.url)
    yield client
    await client.aclose()


def entry(content_hash: str = HASH_A, device: str = "cpu", uri: str = "s3://b/m/") -> PoolEntry:
    return PoolEntry(uri=uri, content_hash=content_hash, device=device, history=[])


async def test_put_get_list_delete_round_trip(redis: object) -> None:
    registry = RedisRegistry(redis, RedisKeys("t"), node="n1")  # type: ignore[arg-type]
    written = await registry.transition(entry(), State.WARM, bytes=123, tensors=4)
    got = await registry.get(f"{HASH_A}@cpu")
    assert got is not None and got.state == State.WARM and got.bytes == 123
    assert got.node == "n1" and got.history == written.history
    assert [e.key for e in await registry.list()] == [f"{HASH_A}@cpu"]
    await registry.delete(f"{HASH_A}@cpu")
    assert await registry.get(f"{HASH_A}@cpu") is None
    assert await registry.list() == [] and await registry.list_cluster() == []


async def test_entries_are_keyed_by_node_and_listed_cluster_wide(redis: object) -> None:
    keys = RedisKeys("t")
    one = RedisRegistry(redis, keys, node="n1")  # type: ignore[arg-type]
    two = RedisRegistry(redis, keys, node="n2")  # type: ignore[arg-type]
    await one.transition(entry(), State.WARM)
    await two.transition(entry(), State.STREAMING)
    await two.transition(entry(HASH_B, "cuda:0"), State.FAILED, error="boom")
    assert [e.node for e in await one.list()] == ["n1"]
    assert sorted(e.key for e in await two.list()) == [f"{HASH_A}@cpu", f"{HASH_B}@cuda:0"]
    cluster = await one.list_cluster()
    assert sorted((e.node, e.key, e.state.value) for e in cluster) == [
        ("n1", f"{HASH_A}@cpu", "warm"), ("n2", f"{HASH_A}@cpu", "streaming"),
        ("n2", f"{HASH_B}@cuda:0", "failed")]
    # the per-node key starts with the content hash: SCAN <prefix>:entry:<hash>:* finds holders
    scan = redis.scan_iter(match=f"t:entry:{HASH_A}:*")  # type: ignore[attr-defined]
    holders = [k async for k in scan]
    assert len(holders) == 2


async def test_every_write_is_stamped_with_time_and_writer(redis: object) -> None:
    registry = RedisRegistry(redis, RedisKeys("t"), node="n1")  # type: ignore[arg-type]
    await registry.put(entry())
    fields = await redis.hgetall(f"t:entry:{HASH_A}:n1:cpu")  # type: ignore[attr-defined]
    assert fields[b"state"] == b"pending" and fields[b"node"] == b"n1"
    assert float(fields[b"written_at"]) > 0 and fields[b"writer"].startswith(b"n1:")


async def test_stale_index_members_are_dropped(redis: object) -> None:
    registry = RedisRegistry(redis, RedisKeys("t"), node="n1")  # type: ignore[arg-type]
    await registry.put(entry())
    await redis.delete(f"t:entry:{HASH_A}:n1:cpu")  # type: ignore[attr-defined]
    assert await registry.list_cluster() == []
    assert await redis.scard("t:entries") == 0  # type: ignore[attr-defined]


async def test_resync_restores_this_nodes_entries_after_redis_lost_them(
        redis_server: RedisServer) -> None:
    client = connect(redis_server.url)
    try:
        registry = RedisRegistry(client, RedisKeys("t"), node="n1")
        await registry.transition(entry(), State.WARM, bytes=7)
        redis_server.restart()  # no persistence: it comes back empty
        assert await registry.list() == []
        assert await registry.resync() == 1
        restored = await registry.get(f"{HASH_A}@cpu")
        assert restored is not None and restored.state == State.WARM and restored.bytes == 7
        assert await registry.resync() == 0
    finally:
        await client.aclose()


async def test_bad_entry_keys_are_refused(redis: object) -> None:
    registry = RedisRegistry(redis, RedisKeys("t"), node="n1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await registry.get("no-device")
