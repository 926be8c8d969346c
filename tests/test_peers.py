"""Peers: nodes fill from each other over NIXL, and the fleet reads the bucket once.

Real parts only: ``warmpool serve`` processes (each its own NIXL agent, as on real nodes)
on one Redis, moto's S3 server behind a front that counts every byte it serves, and a
reader in this process that goes through the same prefetch as a node. What is checked:
the bucket's bytes, bit-exact weights on every node, and what happens when a seeder dies,
evicts, or holds a corrupted range.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from safetensors.torch import save_file

from tests.cli_process import CliProcess
from tests.controller_harness import assert_bit_exact, s3_event
from tests.poll import poll
from tests.redis_server import RedisServer
from tests.s3_counter import CountingFront, counting_front
from tests.servers import S3Backend, Server
from warmpool.config import ConfigError, PeerSettings, Settings
from warmpool.contract.keys import RedisKeys
from warmpool.contract.seeds import Seed, ranges
from warmpool.loading.checksums import range_sum, range_sums
from warmpool.loading.peers import _files_over
from warmpool.loading.stats import STATS
from warmpool.model.identity import INDEX_FILE
from warmpool.model.uri import parse_uri
from warmpool.pool.host import SHM_DIR, HostTier

pytest.importorskip("nixl", reason="the peers extra (pip install 'warmpool[peers]')")

KEYS = RedisKeys()
MiB = 1 << 20
FAST = {"WARMPOOL_DEBOUNCE_S": "0.3", "WARMPOOL_HEARTBEAT_S": "0.5",
        "WARMPOOL_RECHECK_S": "1", "WARMPOOL_CLAIM_IDLE_S": "2",
        "WARMPOOL_SHUTDOWN_GRACE_S": "5"}


# --- pure parts ------------------------------------------------------------------------------
def test_peers_are_off_unless_asked_and_never_listen_everywhere_by_default(
        tmp_path: Path) -> None:
    assert Settings().peers.enabled is False
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"peers": {"enabled": True}}))
    with pytest.raises(ConfigError, match="interface"):
        Settings.load(path)
    path.write_text(json.dumps({"peers": {"interface": "eth0", "range_bytes": 1000}}))
    with pytest.raises(ConfigError, match="range_bytes: must be"):
        Settings.load(path)
    path.write_text(json.dumps({"peers": {"interface": "eth0", "secret": 1}}))
    with pytest.raises(ConfigError, match="secret"):
        Settings.load(path)
    path.write_text(json.dumps({"peers": {"interface": "all", "max_peers": 3}}))
    assert Settings.load(path).peers == PeerSettings(enabled=True, interface="all",
                                                     max_peers=3)


def test_a_checksum_per_range_finds_one_flipped_bit() -> None:
    buf = torch.randint(0, 256, (5 * MiB + 17,), dtype=torch.uint8)
    sums = range_sums(buf, buf.numel(), MiB)
    assert len(sums) == 6 and len(set(sums)) == 6
    buf[3 * MiB + 5] ^= 1
    assert [range_sum(buf, o, n) for o, n in ranges(buf.numel(), MiB)] != list(sums)
    assert range_sum(buf, 3 * MiB, MiB) != sums[3]
    assert range_sum(buf, 2 * MiB, MiB) == sums[2]


def _seed(**changes: Any) -> dict[str, Any]:
    seed = {"node": "n1", "agent": "n1", "content_hash": "a" * 64, "total_bytes": 3 * MiB,
            "layout_digest": "b" * 32, "region": {"addr": 1 << 20, "size": 3 * MiB},
            "range_bytes": MiB, "sums": ["c" * 32] * 3}
    seed.update(changes)
    return seed


@pytest.mark.parametrize("bad", [
    {"sums": ["c" * 32] * 2},  # a checksum short: a range could go unchecked
    {"sums": ["not hex" * 5] * 3},
    {"total_bytes": -1}, {"range_bytes": 0}, {"total_bytes": True},
    {"content_hash": "../../etc"}, {"node": "a b"}, {"agent": ""}, {"region": []},
    {"layout_digest": None},
])
def test_a_malformed_seed_is_refused(bad: dict[str, Any]) -> None:
    assert Seed.from_json(json.dumps(_seed())).node == "n1"
    with pytest.raises((ValueError, TypeError)):
        Seed.from_json(json.dumps(_seed(**bad)))


def test_a_bad_range_sends_exactly_the_files_it_touches_to_the_store() -> None:
    from warmpool.model.safetensors import SafetensorsHeader, TensorInfo
    from warmpool.pool.layout import plan_layout

    headers = []
    for k in range(3):
        tensors = (TensorInfo(f"t{k}", "U8", (MiB,), 0, MiB),)
        headers.append((f"f{k}", SafetensorsHeader(f"f{k}", MiB + 16, 8, tensors)))
    layout = plan_layout("a" * 64, headers)
    assert _files_over(layout, [(0, 10)]) == ["f0"]
    assert _files_over(layout, [(MiB - 1, 2)]) == ["f0", "f1"]
    assert _files_over(layout, []) == []


# --- real processes ----------------------------------------------------------------------------
def write_model(directory: Path, *, shards: int = 3, mb: int = 3, seed: int = 0
                ) -> dict[str, torch.Tensor]:
    """A checkpoint of ``shards`` files of about ``mb`` MiB each: several ranges a file."""
    gen = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    expected: dict[str, torch.Tensor] = {}
    weight_map = {}
    for k in range(shards):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {f"layers.{k}.w": torch.randn((mb * MiB // 8, 2), generator=gen),
                   f"layers.{k}.b": torch.randint(0, 255, (1000 + k,), generator=gen,
                                                  dtype=torch.uint8)}
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        expected.update(tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "seed": seed}))
    return expected


class Node:
    """One ``warmpool serve``: its own node name, runtime and cache directories."""

    def __init__(self, name: str, root: Path, redis_url: str, env: dict[str, str], *,
                 watch: list[Any] | None = None, peers: bool = True) -> None:
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"wp-{name}-"))  # short: socket paths
        self.settings = Settings(runtime_dir=self.dir / "run", cache_dir=self.dir / "cache",
                                 node=name)
        config = {"node": name, "runtime_dir": str(self.settings.runtime_dir),
                  "cache_dir": str(self.settings.cache_dir), "redis_url": redis_url,
                  "watch": watch or []}
        if peers:
            config["peers"] = {"enabled": True, "interface": "lo", "range_bytes": MiB,
                               "timeout_s": 10}
        (self.dir / "config.json").write_text(json.dumps(config))
        config_env = {**env, **FAST, "WARMPOOL_CONFIG": str(self.dir / "config.json")}
        self.proc = CliProcess(root / f"{name}.log", "serve", "--metrics-port", "-1",
                               env=config_env)

    def close(self) -> None:
        self.proc.kill()
        HostTier(self.settings.runtime_dir).remove_all()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def front(moto_server: Server) -> Iterator[CountingFront]:
    with counting_front(moto_server.endpoint) as counted:
        yield counted


@pytest.fixture
def nodes(tmp_path: Path, redis_server: RedisServer, moto_server: Server,
          front: CountingFront, s3_backend: S3Backend,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Node]]:
    # every client reaches the bucket through the counting front: the nodes and the
    # reader in this process (the test's own uploads go straight to moto)
    monkeypatch.setenv("AWS_ENDPOINT_URL", front.endpoint)
    started: list[Node] = []
    env = {**moto_server.env, "AWS_ENDPOINT_URL": front.endpoint}

    def start(name: str, **kw: Any) -> Node:
        node = Node(name, tmp_path, redis_server.url, env, **kw)
        started.append(node)
        return node

    yield start
    for node in started:
        node.close()


def entries(client: redis.Redis, uri: str) -> dict[str, dict[str, Any]]:
    """Node -> entry of ``uri``'s model on the host tier."""
    found = {}
    for key in client.smembers(KEYS.entries_index):
        raw = client.hget(key, "entry")
        if raw is None:
            continue
        entry = json.loads(raw)
        if uri in [entry["uri"], *entry.get("aliases", [])] and entry["device"] == "cpu":
            found[entry["node"]] = entry
    return found


def upload(backend: S3Backend, prefix: str, src: Path, client: redis.Redis) -> int:
    """Put every file and announce it as S3 would; returns the bytes of the weights."""
    weights = 0
    for path in sorted(src.iterdir(), key=lambda p: p.name == INDEX_FILE):
        data = path.read_bytes()
        backend.put(prefix + path.name, data)
        client.publish(KEYS.events_channel, s3_event(backend.bucket, prefix + path.name, data))
        weights += len(data) if path.suffix == ".safetensors" else 0
    return weights


def test_an_upload_for_every_node_reads_the_bucket_once(
        nodes: Callable[..., Node], redis_server: RedisServer, s3_backend: S3Backend,
        front: CountingFront, tmp_path: Path) -> None:
    prefix_uri = str(s3_backend.uri_for("fleet/"))
    fleet = [nodes(f"n{k}", watch=[{"uri": prefix_uri, "nodes": "all"}]) for k in range(3)]
    for node in fleet:
        node.proc.wait_event("serving")
    client = redis.Redis.from_url(redis_server.url)
    expected = write_model(tmp_path / "src")
    weights = upload(s3_backend, "fleet/m/", tmp_path / "src", client)
    uri = str(s3_backend.uri_for("fleet/m/"))

    def all_warm() -> dict[str, dict[str, Any]] | None:
        found = entries(client, uri)
        failed = [e for e in found.values() if e["state"] == "failed"]
        assert not failed, failed
        return found if sum(e["state"] == "warm" for e in found.values()) == 3 else None

    warm: dict[str, dict[str, Any]] = poll(all_warm, "the model warm on all three nodes", 180)
    read = front.bytes_of(".safetensors")
    assert read <= 1.05 * weights, (read, weights)  # the bucket, once
    for node in fleet:
        assert_bit_exact(parse_uri(uri), node.settings, expected)
    from_peers = sorted(e["peer_bytes"] for e in warm.values())
    size = next(iter(warm.values()))["bytes"]
    assert from_peers[0] == 0 and from_peers[1:] == [size, size], warm
    # the first fill was one node's: the others waited for it, and said so
    waited = [n.name for n in fleet if n.proc.event("first_fill_wait")]
    assert len(waited) == 2, waited
    status = subprocess.run([sys.executable, "-m", "warmpool", "status", "--cluster",
                             "--json", "--redis", redis_server.url], capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    model = next(m for m in json.loads(status.stdout) if m["uri"] == uri)
    assert model["peer_bytes"] == 2 * size and model["store_bytes"] == size


# --- a reader in this process, against one seeder ---------------------------------------------
@pytest.fixture
def seeded(nodes: Callable[..., Node], redis_server: RedisServer, s3_backend: S3Backend,
           tmp_path: Path) -> tuple[Node, str, dict[str, torch.Tensor], str]:
    """A node that holds the model warm and seeds it: (node, uri, tensors, content hash)."""
    seeder = nodes("seeder")
    seeder.proc.wait_event("serving")
    expected = write_model(tmp_path / "src", seed=7)
    for path in sorted((tmp_path / "src").iterdir()):
        s3_backend.put("m/" + path.name, path.read_bytes())
    uri = str(s3_backend.uri_for("m/"))
    client = redis.Redis.from_url(redis_server.url)
    client.publish(KEYS.events_channel, json.dumps({"action": "deploy", "uri": uri}))
    warm = poll(lambda: (entries(client, uri).get("seeder") or {}).get("state") == "warm"
                and entries(client, uri)["seeder"], "the seeder warm", 120)
    content_hash = warm["content_hash"]
    poll(lambda: client.exists(KEYS.seed(content_hash, "seeder")), "its seed", 30)
    return seeder, uri, expected, content_hash


def reader_settings(redis_url: str, *, peers: bool = True) -> Settings:
    root = Path(tempfile.mkdtemp(prefix="wp-reader-"))
    return Settings(runtime_dir=root / "run", cache_dir=root / "cache", node="reader",
                    redis_url=redis_url,
                    peers=PeerSettings(enabled=peers, interface="lo" if peers else "",
                                       range_bytes=MiB, timeout_s=5))


def read_as_a_node(settings: Settings, uri: str, on_range: Callable[[], None] | None = None
                   ) -> Any:
    """A prefetch exactly as a node's controller runs it (the pool's registry is the
    fleet's Redis); ``on_range`` runs once, when the first range has arrived."""
    from redis.asyncio import Redis as AsyncRedis

    from warmpool.pool.entries import Pool
    from warmpool.pool.registry.redis import RedisRegistry
    from warmpool.tiers.prefetch import prefetch

    fired: list[bool] = []

    def progress(total: int) -> Callable[[int], None]:
        def on(n: int) -> None:
            if on_range is not None and not fired:
                fired.append(True)
                on_range()
        return on

    async def run() -> Any:
        client = AsyncRedis.from_url(settings.redis_url or "")
        try:
            pool = Pool(settings, RedisRegistry(client, KEYS, settings.node))
            return await prefetch(uri, settings=settings, pool=pool, loader="native",
                                  progress=progress)
        finally:
            await client.aclose()

    return asyncio.run(run())


def leftovers(settings: Settings, client: redis.Redis) -> tuple[list[str], list[bytes]]:
    """Partial segments of the reader in /dev/shm, and reading keys left in Redis."""
    host = HostTier(settings.runtime_dir)
    published = {r.segment for r in host.residents()}
    ours = [p.name for p in SHM_DIR.iterdir() if p.name.startswith(host.prefix)
            and p.name not in published]
    return ours, list(client.scan_iter(f"{KEYS.prefix}:peer-reading:*"))


def test_a_node_reads_a_warm_model_from_its_peer_not_the_bucket(
        seeded: tuple[Node, str, dict[str, torch.Tensor], str], front: CountingFront,
        redis_server: RedisServer) -> None:
    seeder, uri, expected, _ = seeded
    settings = reader_settings(redis_server.url)
    before = front.bytes_of(".safetensors")
    result = read_as_a_node(settings, uri)
    assert result.loader == "peer" and result.entry.peer_bytes == result.entry.bytes
    # from the bucket only the headers the metadata cache reads: no weight bytes
    assert front.bytes_of(".safetensors") - before < 16 * 1024
    assert_bit_exact(parse_uri(uri), settings, expected)
    assert leftovers(settings, redis.Redis.from_url(redis_server.url)) == ([], [])
    # the seeder lent a lease for the read, and let it go when the read ended
    assert seeder.proc.event("seeding") is not None
    HostTier(settings.runtime_dir).remove_all()


def test_a_seeder_killed_mid_transfer_leaves_the_rest_to_the_bucket(
        seeded: tuple[Node, str, dict[str, torch.Tensor], str], front: CountingFront,
        redis_server: RedisServer) -> None:
    seeder, uri, expected, _ = seeded
    settings = reader_settings(redis_server.url)
    STATS.take()
    result = read_as_a_node(settings, uri, lambda: os.kill(seeder.proc.proc.pid,
                                                           signal.SIGKILL))
    assert seeder.proc.proc.wait(timeout=10) == -signal.SIGKILL
    assert result.entry.state.value == "warm" and "native" in result.loader
    fallbacks, _, _ = STATS.take()
    assert fallbacks >= 1
    assert_bit_exact(parse_uri(uri), settings, expected)
    assert leftovers(settings, redis.Redis.from_url(redis_server.url)) == ([], [])
    HostTier(settings.runtime_dir).remove_all()


def test_a_corrupted_range_on_the_seeder_is_caught_and_read_from_the_bucket(
        seeded: tuple[Node, str, dict[str, torch.Tensor], str], front: CountingFront,
        redis_server: RedisServer) -> None:
    seeder, uri, expected, content_hash = seeded
    resident = HostTier(seeder.settings.runtime_dir).resident(content_hash)
    assert resident is not None and resident.arena is None
    with open(SHM_DIR / resident.segment, "r+b") as seg:  # as the owner, after the seed
        seg.seek(MiB + 123)
        byte = seg.read(1)
        seg.seek(MiB + 123)
        seg.write(bytes([byte[0] ^ 0xFF]))
    settings = reader_settings(redis_server.url)
    STATS.take()
    before = front.bytes_of(".safetensors")
    result = read_as_a_node(settings, uri)
    _, mismatches, _ = STATS.take()
    assert mismatches == 1
    assert result.loader == "peer+native"
    assert 0 < result.entry.peer_bytes < result.entry.bytes
    assert 0 < front.bytes_of(".safetensors") - before < result.entry.bytes
    assert_bit_exact(parse_uri(uri), settings, expected)
    HostTier(settings.runtime_dir).remove_all()


def test_a_forced_evict_on_the_seeder_during_a_read_never_gives_wrong_bytes(
        seeded: tuple[Node, str, dict[str, torch.Tensor], str],
        redis_server: RedisServer) -> None:
    seeder, uri, expected, content_hash = seeded

    def evict() -> None:
        done = subprocess.run([sys.executable, "-m", "warmpool", "evict", uri, "--force"],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "WARMPOOL_CONFIG": str(seeder.dir /
                                                                        "config.json")})
        assert done.returncode == 0, done.stderr

    settings = reader_settings(redis_server.url)
    result = read_as_a_node(settings, uri, evict)
    assert result.entry.state.value == "warm"
    assert_bit_exact(parse_uri(uri), settings, expected)
    assert HostTier(seeder.settings.runtime_dir).resident(content_hash) is None
    HostTier(settings.runtime_dir).remove_all()


def test_with_peers_off_a_node_reads_the_bucket_as_before(
        seeded: tuple[Node, str, dict[str, torch.Tensor], str], front: CountingFront,
        redis_server: RedisServer) -> None:
    _, uri, expected, _ = seeded
    settings = reader_settings(redis_server.url, peers=False)
    before = front.bytes_of(".safetensors")
    result = read_as_a_node(settings, uri)
    assert result.loader == "native" and result.entry.peer_bytes == 0
    assert front.bytes_of(".safetensors") - before >= result.entry.bytes * 0.95
    assert_bit_exact(parse_uri(uri), settings, expected)
    HostTier(settings.runtime_dir).remove_all()


# --- what anyone who can write to Redis may send a seeder ----------------------------------
def test_a_seeder_answers_only_well_formed_asks_and_lends_only_while_the_reader_reads(
        seeded: tuple[Node, str, dict[str, torch.Tensor], str],
        redis_server: RedisServer) -> None:
    from warmpool.pool.leases import Leases

    seeder, _, _, content_hash = seeded
    client = redis.Redis.from_url(redis_server.url)
    asks = KEYS.peer_asks("seeder")
    for junk in [b"not json", b"[]", b"{}", json.dumps({"id": "x y", "content_hash":
                                                       content_hash}).encode(),
                 json.dumps({"id": "a", "content_hash": "../../etc/passwd"}).encode(),
                 json.dumps({"id": "b" * 5000, "content_hash": content_hash}).encode(),
                 b"\xff\xfe" * 100]:
        client.rpush(asks, junk)
    # an ask for a model it does not seed: a plain no
    client.rpush(asks, json.dumps({"id": "other", "content_hash": "f" * 64}))
    answer = client.blpop([KEYS.peer_grant("other")], timeout=10)
    assert answer is not None and json.loads(answer[1]) == {"ok": False,
                                                            "why": "not seeded here"}
    for junk_id in ("x y", "a", "b" * 5000):  # nothing was granted to the malformed ones
        assert not client.exists(KEYS.peer_grant(junk_id))
    # a real ask: a lease is held for the reader while its key lives, and no longer
    leases = Leases(seeder.settings.runtime_dir)
    key = f"{content_hash}@cpu"
    assert leases.count(key) == 0
    client.set(KEYS.peer_reading("r1"), "reader", px=60_000)
    client.rpush(asks, json.dumps({"id": "r1", "reader": "reader",
                                   "content_hash": content_hash}))
    answer = client.blpop([KEYS.peer_grant("r1")], timeout=10)
    assert answer is not None and json.loads(answer[1])["ok"] is True
    assert leases.count(key) == 1
    holders = leases.holders(key)
    assert holders and "peer:reader" in json.dumps(holders)
    # the same id again is refused: one lease per read
    client.rpush(asks, json.dumps({"id": "r1", "reader": "reader",
                                   "content_hash": content_hash}))
    answer = client.blpop([KEYS.peer_grant("r1")], timeout=10)
    assert answer is not None and json.loads(answer[1])["ok"] is False
    client.delete(KEYS.peer_reading("r1"))  # the read ended (or its reader's key expired)
    poll(lambda: leases.count(key) == 0, "the lease let go", 10)
    assert seeder.proc.proc.poll() is None  # and the node is still serving


# --- a device worker fills its own buffer from peers -------------------------------------
def _worker_reads_from_a_peer(seeded: tuple[Node, str, dict[str, torch.Tensor], str],
                              front: CountingFront, redis_server: RedisServer,
                              device: str) -> None:
    from dataclasses import replace

    from tests.workers_env import InProcessWorkers
    from warmpool.pool.registry.files import FileRegistry
    from warmpool.workers.client import prefetch_via_workers
    from warmpool.workers.gpu_attach import attach_gpu

    _, uri, expected, content_hash = seeded
    settings = replace(reader_settings(redis_server.url), node="gpu-node")
    before = front.bytes_of(".safetensors")

    async def run() -> None:
        workers = InProcessWorkers(settings)
        await workers.start(device)
        try:
            result = await asyncio.to_thread(prefetch_via_workers, uri, device=device,
                                             settings=settings)
            assert result["loader"] == "peer", result
            entry = await FileRegistry(settings.runtime_dir).get(f"{content_hash}@{device}")
            assert entry is not None and entry.peer_bytes == entry.bytes > 0
            # it reads from peers, but offers its own buffer only under seed_devices (a
            # seeding worker publishes within a second)
            await asyncio.sleep(1.5)
            assert not redis.Redis.from_url(redis_server.url).exists(
                KEYS.seed(content_hash, f"gpu-node@{device}"))
            with await asyncio.to_thread(attach_gpu, content_hash[:16], device,
                                         settings) as model:
                for name, tensor in expected.items():
                    got = model.tensors[name]
                    assert torch.equal(got.reshape(-1).view(torch.uint8).cpu(),
                                       tensor.reshape(-1).view(torch.uint8)), name
        finally:
            await workers.stop_all()

    asyncio.run(run())
    assert front.bytes_of(".safetensors") - before < 16 * 1024  # headers only


def test_a_worker_fills_its_device_buffer_straight_from_a_peer(
        seeded: tuple[Node, str, dict[str, torch.Tensor], str], front: CountingFront,
        redis_server: RedisServer) -> None:
    """A ``cpu:N`` worker: the same code as on a GPU, with the buffer in host memory."""
    _worker_reads_from_a_peer(seeded, front, redis_server, "cpu:0")


@pytest.mark.cuda
def test_a_gpu_worker_reads_a_peer_into_device_memory(
        seeded: tuple[Node, str, dict[str, torch.Tensor], str], front: CountingFront,
        redis_server: RedisServer) -> None:
    """NIXL's VRAM descriptors: a peer's host memory read straight into the GPU's buffer
    (GPUDirect RDMA on a NIC that has it, a UCX staging copy elsewhere); the checksums
    are taken from a host copy of each range."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _worker_reads_from_a_peer(seeded, front, redis_server, "cuda:0")


def test_a_first_fill_whose_claimant_fails_is_taken_over_at_once(
        redis_server: RedisServer) -> None:
    """One node claims the first fill; another waits for its seed. The claimant fails
    (its claim is released): the waiter claims it and reads the bucket itself, without
    waiting out the claim's lifetime."""
    from redis.asyncio import Redis as AsyncRedis

    from warmpool.loading.peers import CLAIM_TTL_MS, PeerSource, first_fill

    settings = PeerSettings(enabled=True, interface="lo", wait_s=60)
    content_hash = "d" * 64

    async def run() -> None:
        client = AsyncRedis.from_url(redis_server.url)
        a = PeerSource(client, KEYS, "a", settings)
        b = PeerSource(client, KEYS, "b", settings)
        try:
            failed = False
            try:
                async with first_fill(a, content_hash) as seeds:
                    assert seeds == []  # a holds the claim: it reads the bucket
                    assert await client.get(KEYS.first_fill(content_hash)) == b"a"
                    waiter = asyncio.create_task(b.seeds_or_claim(content_hash))
                    await asyncio.sleep(1.0)
                    assert not waiter.done()  # b waits while a fills
                    raise RuntimeError("the bucket read failed")
            except RuntimeError:
                failed = True
            assert failed
            started = asyncio.get_running_loop().time()
            assert await asyncio.wait_for(waiter, 5) == ([], True)  # b took it over
            assert asyncio.get_running_loop().time() - started < CLAIM_TTL_MS / 1000 / 2
            assert await client.get(KEYS.first_fill(content_hash)) == b"b"
        finally:
            await client.aclose()

    asyncio.run(run())


def test_a_workers_buffer_is_a_seed_other_nodes_read_from(
        nodes: Callable[..., Node], s3_backend: S3Backend, front: CountingFront,
        redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``cpu:0`` worker process seeds its own buffer (on a GPU: VRAM, read GPU to GPU
    by another node's worker); a node without the model reads it from there, not the
    bucket; an evict on the worker withdraws the seed before the buffer goes."""
    from tests.workers_env import supervised_workers
    from warmpool.workers.client import evict_via_workers, prefetch_via_workers

    expected = write_model(tmp_path / "src", seed=3)
    for path in sorted((tmp_path / "src").iterdir()):
        s3_backend.put("w/" + path.name, path.read_bytes())
    uri = str(s3_backend.uri_for("w/"))
    root = Path(tempfile.mkdtemp(prefix="wp-w-"))
    seeder = Settings(runtime_dir=root / "run", cache_dir=root / "cache", node="gpu-a",
                      redis_url=redis_server.url)
    config = root / "config.json"  # what the worker reads, as under `warmpool serve`
    config.write_text(json.dumps({
        "node": "gpu-a", "redis_url": redis_server.url, "cache_dir": str(root / "cache"),
        "peers": {"enabled": True, "interface": "lo", "seed_devices": True}}))
    monkeypatch.setenv("WARMPOOL_CONFIG", str(config))
    monkeypatch.delenv("WARMPOOL_NODE", raising=False)
    client = redis.Redis.from_url(redis_server.url)
    try:
        with supervised_workers(seeder, "cpu:0"):
            loaded = prefetch_via_workers(uri, device="cpu:0", settings=seeder)
            content_hash = loaded["content_hash"]
            seed_key = KEYS.seed(content_hash, "gpu-a@cpu:0")
            raw = poll(lambda: client.get(seed_key), "the worker's seed", 30)
            assert Seed.from_json(raw).node == "gpu-a@cpu:0"
            reader = reader_settings(redis_server.url)
            before = front.bytes_of(".safetensors")
            result = read_as_a_node(reader, uri)
            assert result.loader == "peer" and result.entry.peer_bytes == result.entry.bytes
            assert front.bytes_of(".safetensors") - before < 16 * 1024
            assert_bit_exact(parse_uri(uri), reader, expected)
            HostTier(reader.runtime_dir).remove_all()
            evict_via_workers(uri, device="cpu:0", settings=seeder)
            poll(lambda: not client.exists(seed_key), "the seed withdrawn", 10)
    finally:
        HostTier(root / "run").remove_all()
        shutil.rmtree(root, ignore_errors=True)


def test_seeds_in_redis_are_untrusted_a_bad_one_is_skipped_not_followed(
        redis_server: RedisServer) -> None:
    """Anything in the seed keys: garbage, a seed naming another node or another model,
    a seed whose node's key expired. The reader lists only the well-formed ones that are
    what their key says, and drops the expired from the set."""
    from redis.asyncio import Redis as AsyncRedis

    from warmpool.loading.peers import PeerSource

    content_hash = "e" * 64
    client = redis.Redis.from_url(redis_server.url)
    good = _seed(node="n1", content_hash=content_hash)
    client.set(KEYS.seed(content_hash, "n1"), json.dumps(good))
    client.set(KEYS.seed(content_hash, "n2"), b"\x00garbage{")
    client.set(KEYS.seed(content_hash, "n3"), json.dumps({**good, "node": "n1"}))  # lies
    client.set(KEYS.seed(content_hash, "n4"), json.dumps(
        {**good, "node": "n4", "content_hash": "f" * 64}))  # another model's
    client.set(KEYS.seed(content_hash, "me"), json.dumps({**good, "node": "me"}))  # ours
    client.sadd(KEYS.seeds(content_hash), "n1", "n2", "n3", "n4", "n5", "me")  # n5: expired

    async def run() -> list[Seed]:
        aclient = AsyncRedis.from_url(redis_server.url)
        try:
            return await PeerSource(aclient, KEYS, "me", PeerSettings(
                enabled=True, interface="lo")).seeds(content_hash)
        finally:
            await aclient.aclose()

    assert [s.node for s in asyncio.run(run())] == ["n1"]
    assert b"n5" not in client.smembers(KEYS.seeds(content_hash))
