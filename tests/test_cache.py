"""The metadata cache: small files and headers into a content-hashed directory, atomically,
once per model however many coroutines or processes ask, against every storage backend."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.models import SAFETENSORS_DTYPES, model_files, write_model
from tests.servers import Backend
from warmpool.config import Settings
from warmpool.errors import IncompleteModelError, SafetensorsError, StorageError, UnsafeKeyError
from warmpool.model.cache import MANIFEST, CachedModel, MetadataCache, default_cache
from warmpool.model.identity import INDEX_FILE
from warmpool.model.uri import ModelURI
from warmpool.storage import ObjectInfo, Store, open_store

REPO = Path(__file__).resolve().parent.parent


class CountingStore(Store):
    """A real store, wrapped to record every call and to fail or slow down on demand."""

    def __init__(self, inner: Store, *, fail: dict[str, BaseException] | None = None,
                 delay: float = 0.0, marker: Path | None = None,
                 extra: list[ObjectInfo] | None = None, short_downloads: int = 0) -> None:
        super().__init__(inner.uri)
        self.inner = inner
        self.calls: list[tuple[str, str]] = []
        self.fail = fail or {}
        self.delay = delay
        self.marker = marker
        self.extra = extra or []
        self.short_downloads = short_downloads  # this many downloads come back truncated

    async def list(self) -> list[ObjectInfo]:
        self.calls.append(("list", ""))
        return sorted(await self.inner.list() + self.extra)

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        self.calls.append(("read", key))
        return await self.inner.read_range(key, start, length)

    async def download(self, key: str, dest: Path) -> int:
        self.calls.append(("download", key))
        if self.marker is not None:
            with open(self.marker, "a") as f:
                f.write(f"{os.getpid()} {key}\n")
        await asyncio.sleep(self.delay)
        if key in self.fail:
            raise self.fail[key]
        n = await self.inner.download(key, dest)
        if self.short_downloads > 0:
            self.short_downloads -= 1
            with open(dest, "r+b") as f:
                f.truncate(max(n - 1, 0))
        return n

    async def close(self) -> None:
        await self.inner.close()

    def downloads(self) -> list[str]:
        return [key for op, key in self.calls if op == "download"]


def upload(backend: Backend, prefix: str, files: dict[str, bytes]) -> ModelURI:
    for key, data in files.items():
        backend.put(prefix + key, data)
    return backend.uri_for(prefix)


def counting(uri: ModelURI, **kw: object) -> CountingStore:
    return CountingStore(open_store(uri), **kw)  # type: ignore[arg-type]


def leftovers(root: Path) -> list[str]:
    """Hash and temporary directories under the cache root (locks don't count)."""
    return sorted(p.name for p in root.glob("*") if p.name != ".locks") if root.exists() else []


@pytest.fixture
def cache(tmp_path: Path) -> MetadataCache:
    return MetadataCache(tmp_path / "cache")


@pytest.fixture
def source(tmp_path: Path) -> dict[str, bytes]:
    """The files of a three-shard checkpoint with an index, and a nested extra file."""
    write_model(tmp_path / "src", shards=3)
    return {**model_files(tmp_path / "src"), "original/params.json": b'{"dim": 5}\n'}


def non_weight(files: dict[str, bytes]) -> list[str]:
    return sorted(k for k in files if not k.endswith(".safetensors"))


# --- what a fetch produces -----------------------------------------------------------------


async def test_sharded_model_is_cached_with_headers_and_without_weights(
        backend: Backend, cache: MetadataCache, source: dict[str, bytes], tmp_path: Path) -> None:
    uri = upload(backend, "org/llama/", source)
    async with counting(uri) as store:
        model = await cache.fetch(uri, store)
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert model.complete and model.uri == uri
    assert model.cache_dir == cache.root / model.content_hash
    assert list(model.shards) == shards == list(model.headers)
    assert list(model.files) == non_weight(source)
    for key in model.files:  # byte-exact copies, nested keys included
        assert model.path(key).read_bytes() == source[key]
    assert not list(model.cache_dir.rglob("*.safetensors"))
    assert not [k for k in store.downloads() if k.endswith(".safetensors")]
    for key, header in model.headers.items():
        with safe_open(str(tmp_path / "src" / key), "pt") as f:
            assert sorted(t.name for t in header.tensors) == sorted(f.keys())
            for t in header.tensors:
                ref = f.get_tensor(t.name)
                assert (t.dtype, t.shape) == (SAFETENSORS_DTYPES[ref.dtype], tuple(ref.shape))
        assert header.file_size == len(source[key]) and key in header.file

    manifest = json.loads((model.cache_dir / MANIFEST).read_text())
    assert manifest["uri"] == str(uri) and manifest["content_hash"] == model.content_hash
    assert {o["key"]: o["size"] for o in manifest["objects"]} == {
        k: len(v) for k, v in source.items()}
    assert all(o["etag"] for o in manifest["objects"])
    assert manifest["shards"] == shards and manifest["files"] == non_weight(source)
    assert manifest["headers"] == {k: h.to_json() for k, h in model.headers.items()}
    assert manifest["skipped"] == [] and manifest["created_at"] > 0

    summary = model.to_json()
    assert summary["bytes"] == sum(h.data_bytes for h in model.headers.values()) > 0
    assert summary["tensors"] == sum(len(h.tensors) for h in model.headers.values())
    assert leftovers(cache.root) == [model.content_hash]


async def test_model_without_index_is_complete_with_config_and_one_file(
        backend: Backend, cache: MetadataCache, tmp_path: Path) -> None:
    write_model(tmp_path / "src", shards=1, with_index=False, extra_files=False)
    uri = upload(backend, "plain/", model_files(tmp_path / "src"))
    assert (await cache.inspect(uri)).complete
    model = await cache.fetch(uri)
    assert model.shards == ("model.safetensors",) and model.files == ("config.json",)
    assert len(model.headers["model.safetensors"].tensors) == 7


async def test_missing_shard_is_incomplete_and_named(backend: Backend, cache: MetadataCache,
                                                     source: dict[str, bytes]) -> None:
    gone = "model-00002-of-00003.safetensors"
    uri = upload(backend, "partial/", {k: v for k, v in source.items() if k != gone})
    listing = await cache.inspect(uri)
    assert not listing.complete and listing.completeness.missing == (gone,)
    with pytest.raises(IncompleteModelError) as info:
        await cache.fetch(uri)
    assert info.value.missing == [gone]
    assert gone in str(info.value) and str(uri) in str(info.value)
    assert leftovers(cache.root) == []


async def test_missing_config_without_index_is_incomplete(local_backend: Backend,
                                                          cache: MetadataCache,
                                                          tmp_path: Path) -> None:
    backend = local_backend
    write_model(tmp_path / "src", shards=1, with_index=False)
    files = {k: v for k, v in model_files(tmp_path / "src").items() if k != "config.json"}
    uri = upload(backend, "noconfig/", files)
    assert (await cache.inspect(uri)).completeness.missing == ("config.json",)
    with pytest.raises(IncompleteModelError, match="config.json"):
        await cache.fetch(uri)
    assert leftovers(cache.root) == []


async def test_model_completes_when_the_last_shard_arrives(local_backend: Backend,
                                                           cache: MetadataCache,
                                                           source: dict[str, bytes]) -> None:
    backend = local_backend
    last = "model-00003-of-00003.safetensors"
    uri = upload(backend, "arriving/", {k: v for k, v in source.items() if k != last})
    first = await cache.inspect(uri)
    backend.put("arriving/" + last, source[last])
    second = await cache.inspect(uri)
    assert not first.complete and second.complete
    assert first.content_hash != second.content_hash
    assert (await cache.fetch(uri)).content_hash == second.content_hash


# --- identity: hits read nothing, changes make a new entry --------------------------------


async def test_second_fetch_of_unchanged_model_reads_only_the_listing(
        backend: Backend, cache: MetadataCache, source: dict[str, bytes]) -> None:
    uri = upload(backend, "m/", source)
    first = await cache.fetch(uri)
    for fresh in (cache, MetadataCache(cache.root)):  # same instance, and a new process's
        async with counting(uri) as store:
            again = await fresh.fetch(uri, store)
            listing = await fresh.inspect(uri, store)
        assert store.calls == [("list", ""), ("list", "")]
        assert again == first and listing.complete
        assert listing.content_hash == first.content_hash


async def test_changed_object_gives_a_new_hash_and_directory(backend: Backend,
                                                             cache: MetadataCache,
                                                             source: dict[str, bytes]) -> None:
    uri = upload(backend, "m/", source)
    old = await cache.fetch(uri)
    new_config = source["config.json"].replace(b"{", b'{"revision": 2, ', 1)
    backend.put("m/config.json", new_config)
    new = await cache.fetch(uri)
    assert new.content_hash != old.content_hash and new.cache_dir != old.cache_dir
    assert new.path("config.json").read_bytes() == new_config
    assert old.path("config.json").read_bytes() == source["config.json"]  # kept until pruned
    assert cache.load(old.content_hash) is not None
    assert cache.prune({new.content_hash}) == [old.content_hash]
    assert leftovers(cache.root) == [new.content_hash]


# --- refusals and failures leave nothing behind -----------------------------------------


@pytest.mark.parametrize("key", ["../evil.json", "/etc/passwd", "a/../../b.json", "a//b",
                                 "./x", "sub\\..\\x"])
async def test_hostile_key_in_listing_is_refused(tmp_path: Path, cache: MetadataCache,
                                                 key: str) -> None:
    write_model(tmp_path / "src", shards=1)
    store = CountingStore(open_store(ModelURI("file", "", f"{tmp_path}/src/")),
                          extra=[ObjectInfo(key, 3, "e")])
    with pytest.raises(UnsafeKeyError) as info:
        await cache.fetch(store.uri, store)
    assert repr(key) in str(info.value) and info.value.key == key
    with pytest.raises(UnsafeKeyError):
        await cache.inspect(store.uri, store)
    assert store.downloads() == [] and leftovers(cache.root) == []
    assert not (tmp_path / "evil.json").exists()


async def test_key_that_is_both_file_and_directory_is_refused(tmp_path: Path,
                                                              cache: MetadataCache) -> None:
    write_model(tmp_path / "src", shards=1)
    store = CountingStore(open_store(ModelURI("file", "", f"{tmp_path}/src/")),
                          extra=[ObjectInfo("config.json/x", 1, "e")])
    with pytest.raises(UnsafeKeyError, match="both a file and a directory"):
        await cache.fetch(store.uri, store)
    assert leftovers(cache.root) == []


async def test_failed_download_leaves_no_entry_and_no_temp_dir(
        backend: Backend, cache: MetadataCache, source: dict[str, bytes]) -> None:
    uri = upload(backend, "m/", source)
    async with counting(uri, delay=0.05,
                        fail={"tokenizer.json": StorageError("boom", key="tokenizer.json")}
                        ) as store:
        with pytest.raises(StorageError, match="boom"):
            await cache.fetch(uri, store)
    assert leftovers(cache.root) == []
    model = await cache.fetch(uri)  # the lock was released; a retry succeeds
    assert leftovers(cache.root) == [model.content_hash]


async def test_corrupt_shard_header_fails_naming_the_file(local_backend: Backend,
                                                          cache: MetadataCache,
                                                          source: dict[str, bytes]) -> None:
    backend = local_backend
    bad = "model-00002-of-00003.safetensors"
    uri = upload(backend, "m/", {**source, bad: source[bad][:20]})
    with pytest.raises(SafetensorsError) as info:
        await cache.fetch(uri)
    assert bad in str(info.value)
    assert leftovers(cache.root) == []


async def test_short_download_is_retried_once_then_refused(tmp_path: Path,
                                                           cache: MetadataCache) -> None:
    write_model(tmp_path / "src", shards=1, extra_files=False)
    uri = ModelURI("file", "", f"{tmp_path}/src/")
    flaky = counting(uri, short_downloads=1)
    model = await cache.fetch(uri, flaky)
    assert flaky.downloads() == ["config.json", "config.json"]
    assert model.path("config.json").read_bytes() == (tmp_path / "src/config.json").read_bytes()

    (tmp_path / "src/config.json").write_text('{"changed": true}')
    broken = counting(uri, short_downloads=2)
    with pytest.raises(StorageError, match="config.json: downloaded") as info:
        await cache.fetch(uri, broken)
    assert info.value.key == "config.json"
    assert leftovers(cache.root) == [model.content_hash]


async def test_cancelled_fetch_leaves_nothing_and_releases_the_lock(
        tmp_path: Path, cache: MetadataCache) -> None:
    write_model(tmp_path / "src", shards=2)
    uri = ModelURI("file", "", f"{tmp_path}/src/")
    task = asyncio.create_task(cache.fetch(uri, counting(uri, delay=5)))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftovers(cache.root) == []
    model = await asyncio.wait_for(cache.fetch(uri), 10)
    assert leftovers(cache.root) == [model.content_hash]


async def test_invalid_cache_entry_is_ignored_and_rebuilt(cache: MetadataCache,
                                                          source: dict[str, bytes],
                                                          tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    for key, data in source.items():
        (tmp_path / "m" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "m" / key).write_bytes(data)
    uri = ModelURI("file", "", f"{tmp_path}/m/")
    model = await cache.fetch(uri)
    manifest_path = model.cache_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    shard = model.shards[0]
    name = next(iter(manifest["headers"][shard]["tensors"]))
    manifest["headers"][shard]["tensors"][name]["shape"] = [10**6]
    manifest_path.write_text(json.dumps(manifest))
    assert cache.load(model.content_hash) is None
    rebuilt = await cache.fetch(uri)  # from the store again
    assert (rebuilt.headers, rebuilt.files) == (model.headers, model.files)

    model.path("tokenizer.json").unlink()
    assert cache.load(model.content_hash) is None
    assert (await cache.fetch(uri)).path("tokenizer.json").read_bytes() == \
        source["tokenizer.json"]
    assert leftovers(cache.root) == [model.content_hash]
    assert cache.load("../" + model.content_hash) is None


async def test_legacy_and_oversized_files_are_skipped(tmp_path: Path,
                                                      cache: MetadataCache) -> None:
    write_model(tmp_path / "src", shards=1)
    (tmp_path / "src/pytorch_model.bin").write_bytes(b"\0" * 64)
    (tmp_path / "src/big.json").write_bytes(b" " * 4096)
    cache = MetadataCache(cache.root, max_file_bytes=1024)
    uri = ModelURI("file", "", f"{tmp_path}/src/")
    store = counting(uri)
    model = await cache.fetch(uri, store)
    assert model.skipped == ("big.json", "pytorch_model.bin")
    assert not {"big.json", "pytorch_model.bin"} & set(store.downloads() + list(model.files))
    assert json.loads((model.cache_dir / MANIFEST).read_text())["skipped"] == list(model.skipped)


def test_stale_temp_dirs_are_swept_on_start(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    old, fresh = root / f".tmp-{'a' * 64}-old", root / f".tmp-{'b' * 64}-new"
    for d in (old, fresh):
        (d / "files").mkdir(parents=True)
    hour_ago = time.time() - 2 * 3600
    os.utime(old, (hour_ago, hour_ago))
    MetadataCache(root)
    assert not old.exists() and fresh.exists()


def test_default_cache_uses_the_settings_dir(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARMPOOL_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache(Settings.load()).root == tmp_path / "c"


# --- one download per model, however many ask --------------------------------------------


async def test_concurrent_fetches_in_one_process_download_each_file_once(
        backend: Backend, tmp_path: Path, source: dict[str, bytes]) -> None:
    uri = upload(backend, "m/", source)
    root = tmp_path / "cache"
    # More fetches than the default executor has threads: waiting for the lock must not
    # starve the downloads of the one that holds it.
    stores = [counting(uri, delay=0.02) for _ in range(12)]
    models = await asyncio.wait_for(asyncio.gather(
        *(MetadataCache(root).fetch(uri, s) for s in stores)), 60)
    downloads = sorted(k for s in stores for k in s.downloads())
    index_reads = [k for s in stores for op, k in s.calls if op == "read" and k == INDEX_FILE]
    assert downloads == sorted(set(non_weight(source)) - {INDEX_FILE})
    assert index_reads == [INDEX_FILE]
    assert len({m.cache_dir for m in models}) == 1 and len(set(map(_frozen, models))) == 1
    for s in stores:
        await s.close()


def _frozen(model: CachedModel) -> str:
    return json.dumps(model.to_json(), sort_keys=True)


RACER = """
import asyncio, json, os, sys, time, types
from pathlib import Path

# warmpool/__init__ imports attach, hence torch: seconds per process on a small CI box.
# The cache needs none of it, so the racers load the package's modules without it.
package = types.ModuleType("warmpool")
package.__path__ = [os.path.join(os.getcwd(), "warmpool")]
sys.modules["warmpool"] = package

from warmpool.model.cache import MetadataCache
from warmpool.storage import Store, open_store
from warmpool.model.uri import parse_uri

root, uri, marker, me = Path(sys.argv[1]), parse_uri(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]


class Marking(Store):
    def __init__(self, inner):
        super().__init__(inner.uri)
        self.inner = inner

    async def list(self):
        return await self.inner.list()

    async def read_range(self, key, start, length):
        return await self.inner.read_range(key, start, length)

    async def close(self):
        await self.inner.close()

    async def download(self, key, dest):
        with open(marker, "a") as f:
            f.write(f"{os.getpid()} {key}\\n")
        await asyncio.sleep(0.1)  # wide enough for the other process to arrive
        return await self.inner.download(key, dest)


(marker.parent / f"ready-{me}").touch()
while not (marker.parent / "go").exists():
    time.sleep(0.005)


async def main():
    async with Marking(open_store(uri)) as store:
        model = await MetadataCache(root).fetch(uri, store)
    print(json.dumps({"dir": str(model.cache_dir), "hash": model.content_hash}))

asyncio.run(main())
"""


# The lock is the same for every backend; one object store beside local files shows that
# the remote clients behave in two processes too (the in-process race runs on all four).
@pytest.mark.parametrize("backend", ["local", "s3"], indirect=True)
async def test_two_processes_racing_download_each_file_once(
        backend: Backend, tmp_path: Path, source: dict[str, bytes]) -> None:
    uri = upload(backend, "m/", source)
    root, marker = tmp_path / "cache", tmp_path / "race" / "downloads"
    marker.parent.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(RACER), str(root), str(uri),
                               str(marker), str(i)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 60
        while not all((marker.parent / f"ready-{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [p.communicate() for p in procs if p.poll() is not None]
            await asyncio.sleep(0.02)
        (marker.parent / "go").touch()
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    results = [json.loads(out) for out, _ in outputs]
    assert results[0] == results[1]
    lines = marker.read_text().splitlines()
    downloaded = sorted(line.split()[1] for line in lines)
    assert downloaded == sorted(set(non_weight(source)) - {INDEX_FILE})
    assert len({line.split()[0] for line in lines}) == 1  # all by one process
    assert leftovers(root) == [results[0]["hash"]]


def test_large_non_weight_files_and_code_are_skipped_unless_the_node_says_otherwise() -> None:
    """Three 500 MB 'tokenizers' were cached (1.5 GB): the cap is per file (64 MiB by
    default), and code files are downloaded only for a node with cache_code."""
    from warmpool.model.cache import _plan_files
    from warmpool.storage.base import ObjectInfo

    objects = [ObjectInfo(f"extra-{i}.json", 500 << 20, "e") for i in range(3)]
    objects += [ObjectInfo("config.json", 700, "c"), ObjectInfo("modeling_evil.py", 900, "p"),
                ObjectInfo("sub/kernel.so", 900, "s"), ObjectInfo("tokenizer.json", 30 << 20, "t")]
    files, skipped = _plan_files(objects)
    assert sorted(o.key for o in files) == ["config.json", "tokenizer.json"]
    assert sorted(o.key for o in skipped) == ["extra-0.json", "extra-1.json", "extra-2.json",
                                               "modeling_evil.py", "sub/kernel.so"]
    files, skipped = _plan_files(objects, code=True, max_file_bytes=1 << 30)
    assert sorted(o.key for o in skipped) == []
    assert len(files) == len(objects)
