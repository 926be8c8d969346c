"""The Python API a platform calls instead of the CLI: one result type per call, the same
whether this process, the workers or a controller did the work."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis
import torch
from safetensors.torch import load_file

import warmpool
from tests.models import write_model
from tests.pool_env import run_cli
from tests.redis_server import RedisServer
from warmpool.config import Settings
from warmpool.contract.keys import RedisKeys
from warmpool.pool.registry.base import PoolEntry, State
from warmpool.pool.registry.files import FileRegistry

NODE = "api-node"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    write_model(directory, shards=2)
    return directory


def _expected(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def test_prefetch_status_attach_evict_in_process(model_dir: Path, settings: Settings) -> None:
    expected = _expected(model_dir)
    first = warmpool.prefetch(str(model_dir))
    assert isinstance(first, warmpool.Prefetched)
    assert (first.via, first.device, first.devices, first.already_warm) == \
        ("process", "cpu", ("cpu",), False)
    assert first.tensors == len(expected)
    # the resident buffer: every tensor, each at an aligned offset
    assert first.bytes >= sum(t.numel() * t.element_size() for t in expected.values())
    assert first.to_json()["state"] == "warm"
    again = warmpool.prefetch(str(model_dir))
    assert again.already_warm and again.content_hash == first.content_hash

    [entry] = warmpool.status()
    assert isinstance(entry, warmpool.PoolEntry)
    assert (entry.state, entry.content_hash) == (warmpool.State.WARM, first.content_hash)
    with warmpool.attach(first.content_hash[:12]) as weights:
        for name, tensor in expected.items():
            got = weights[name]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape
            assert got.reshape(-1).view(torch.uint8).equal(tensor.reshape(-1).view(torch.uint8))

    evicted = warmpool.evict(str(model_dir))
    assert isinstance(evicted, warmpool.Evicted)
    assert (evicted.state, evicted.content_hash, evicted.via) == \
        ("evicted", first.content_hash, "process")
    assert warmpool.status() == []
    assert [e.state for e in warmpool.status(history=True)] == [State.EVICTED]
    with pytest.raises(warmpool.NotWarmError):
        warmpool.attach(str(model_dir))


def test_metadata_gives_the_cached_config_directory(model_dir: Path, settings: Settings) -> None:
    cached = warmpool.metadata(str(model_dir))
    assert isinstance(cached, warmpool.CachedModel)
    assert cached.files_dir.is_dir() and cached.files_dir.is_relative_to(settings.cache_dir)
    assert (cached.files_dir / "config.json").read_bytes() == \
        (model_dir / "config.json").read_bytes()


def test_the_api_works_when_called_from_a_running_event_loop(model_dir: Path,
                                                             settings: Settings) -> None:
    async def serving_code() -> list[PoolEntry]:
        warmpool.prefetch(str(model_dir))  # forgot asyncio.to_thread: still works
        return warmpool.status()

    [entry] = asyncio.run(serving_code())
    assert entry.state == State.WARM


def test_old_history_ages_out_and_live_entries_stay(settings: Settings) -> None:
    registry = FileRegistry(settings.runtime_dir)
    month_ago = time.time() - 30 * 24 * 3600

    def put(name: str, state: State, updated_at: float) -> None:
        registry.put_sync(PoolEntry(uri=f"file:///m/{name}/", content_hash=name * 16,
                                    state=state, updated_at=updated_at))

    put("aaaa", State.EVICTED, month_ago)
    put("bbbb", State.FAILED, month_ago)
    put("cccc", State.EVICTED, time.time())
    put("dddd", State.WARM, month_ago)  # old but live: never aged out
    listed = warmpool.status(history=True)
    assert sorted(e.content_hash[:4] for e in listed) == ["cccc", "dddd"]
    assert {e.content_hash[:4] for e in registry.list_sync()} == {"cccc", "dddd"}
    assert [e.content_hash[:4] for e in warmpool.status()] == ["dddd"]


@pytest.mark.parametrize("tuning", [{"loader": "native"}, {"concurrency": 4},
                                    {"memory_limit": "1GiB"}, {"distributed": True}])
def test_streamer_tuning_is_refused_by_a_controller_not_dropped(
        tuning: dict[str, object], model_dir: Path, settings: Settings,
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = RedisKeys()
    client = redis.Redis.from_url(redis_server.url)
    client.set(keys.node(NODE), "{}", ex=60)  # a controller's heartbeat
    monkeypatch.setenv("WARMPOOL_NODE", NODE)
    flag = "--" + next(iter(tuning)).replace("_", "-")
    with pytest.raises(warmpool.ConfigError, match=flag):
        warmpool.prefetch(str(model_dir), redis_url=redis_server.url,
                          **tuning)  # type: ignore[arg-type]
    assert client.xlen(keys.node_stream(NODE)) == 0  # nothing was asked of the controller
    client.close()


def test_the_cli_refuses_a_streamer_flag_a_controller_cannot_honour(
        model_dir: Path, settings: Settings, redis_server: RedisServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    keys = RedisKeys()
    client = redis.Redis.from_url(redis_server.url)
    client.set(keys.node(NODE), "{}", ex=60)
    monkeypatch.setenv("WARMPOOL_NODE", NODE)
    monkeypatch.setenv("WARMPOOL_REDIS_URL", redis_server.url)
    proc = run_cli("prefetch", str(model_dir), "--loader", "native", "--concurrency", "4")
    assert proc.returncode == 2
    assert "--loader, --concurrency: the controller of node api-node" in proc.stderr
    assert client.xlen(keys.node_stream(NODE)) == 0
    client.close()
