"""Data and state under hostile input and faults: many tensors, full shared memory,
one policy for eviction and for old versions."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.models import model_files, write_model
from tests.pool_env import segments_of
from tests.servers import Backend
from warmpool.attachment import attach
from warmpool.config import Settings
from warmpool.errors import CapacityError, NotWarmError
from warmpool.pool.entries import Pool
from warmpool.pool.eviction import choose_victims, entry_candidate, inherits_pin, superseded
from warmpool.pool.registry.base import PoolEntry, State
from warmpool.tiers.prefetch import prefetch


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


async def test_local_checkpoint_of_100000_tensors_warms_bit_exactly(
        tmp_path: Path, settings: Settings) -> None:
    """More tensors in one read than one preadv takes (IOV_MAX): every read is split,
    and the whole checkpoint arrives bit-exact through the default (pread) loader."""
    directory = tmp_path / "moe"
    directory.mkdir()
    gen = torch.Generator().manual_seed(7)
    tensors = {f"experts.{i}.w": torch.randint(-2**31, 2**31 - 1, (4,), dtype=torch.int32,
                                                generator=gen)
               for i in range(100_000)}
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text("{}")
    result = await prefetch(str(directory), settings=settings)
    assert result.entry.state == State.WARM and result.loader == "pread"
    expected = load_file(str(directory / "model.safetensors"))
    with attach(str(directory), settings=settings) as weights:
        assert len(weights) == 100_000
        for name, tensor in expected.items():
            assert torch.equal(_bits(weights[name]), _bits(tensor)), name
    assert len(segments_of(settings)) == 1


def _in_small_shm(code: str, size: str = "4m") -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new process whose /dev/shm is a private tmpfs of ``size``
    (a user and mount namespace: no root needed, nothing else on the machine sees it)."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-Urm", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("no user namespaces here (unshare -Urm)")
    script = (f"mount -t tmpfs -o size={size} tmpfs /dev/shm && "
              f"exec {shlex.quote(sys.executable)} -c {shlex.quote(textwrap.dedent(code))}")
    return subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True,
                          text=True, timeout=300, env={**os.environ}, check=False)


def test_a_model_that_fits_the_capacity_but_not_dev_shm_fails_cleanly(
        tmp_path: Path, settings: Settings) -> None:
    """/dev/shm fuller than the capacity thinks: the prefetch is refused with a
    CapacityError (not SIGBUS in the filler), recorded failed, and no segment stays; a
    segment the kernel cannot back is refused at creation, not half-way through a fill."""
    directory = tmp_path / "big"
    directory.mkdir()
    save_file({"w": torch.ones(6 << 20, dtype=torch.uint8)}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text("{}")
    code = f"""
        import asyncio, json, os
        from warmpool.config import Settings
        from warmpool.errors import CapacityError
        from warmpool.pool.entries import Pool
        from warmpool.pool.host import SHM_DIR
        from warmpool.tiers.prefetch import prefetch

        settings = Settings.load(host_capacity=1 << 30)
        async def main():
            out = {{}}
            try:
                await prefetch({str(directory)!r}, settings=settings)
                out["prefetch"] = "warm"
            except CapacityError as exc:
                out["prefetch"] = str(exc)
            out["states"] = [(e.state.value, e.error) for e in await Pool(settings).entries()]
            try:
                Pool(settings).host.create("ab" * 32, 8 << 20)
                out["create"] = "created"
            except CapacityError as exc:
                out["create"] = str(exc)
            out["left"] = sorted(os.listdir(SHM_DIR))
            print(json.dumps(out))
        asyncio.run(main())
    """
    proc = _in_small_shm(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert "needs" in out["prefetch"] and "bytes" in out["prefetch"]
    assert [s for s, _ in out["states"]] == ["failed"]
    assert "needs" in out["states"][0][1]
    assert "cannot hold" in out["create"] and "free" in out["create"]
    assert out["left"] == []


# --- the eviction policy (pure) ------------------------------------------------------

def _entry(name: str, *, nbytes: int = 10, state: State = State.WARM, pinned: bool = False,
           leases: int = 0, attached: float | None = None, created: float = 0.0,
           uri: str = "", device: str = "cpu") -> PoolEntry:
    return PoolEntry(uri=uri or f"file:///{name}/", content_hash=name, device=device,
                     state=state, bytes=nbytes, pinned=pinned, leases=leases,
                     last_attached_at=attached, created_at=created)


def test_policy_evicts_least_recently_used_sparing_leases_pins_and_streams() -> None:
    entries = [_entry("old", attached=1), _entry("older", attached=None, created=0.5),
               _entry("leased", leases=1, attached=0), _entry("pinned", pinned=True, created=0),
               _entry("streaming", state=State.STREAMING, created=0), _entry("new", attached=9)]
    def pick(needed: int, room: int) -> list[str]:
        return [e.content_hash for e in choose_victims(
            map(entry_candidate, entries), needed, room, who="m", device="cpu")]

    assert pick(5, 5) == []
    assert pick(15, 5) == ["older"]
    assert pick(25, 0) == ["older", "old", "new"]
    assert pick(10, -100) == ["older"]  # room below zero (an over-full tier) counts as none
    with pytest.raises(CapacityError) as caught:
        pick(40, 5)  # only 30 bytes are evictable
    assert caught.value.needed == 40 and caught.value.free == 35
    assert "leased, pinned or still streaming" in str(caught.value)


def test_workers_use_the_same_policy() -> None:
    """The GPU worker's residents go through the same function: same order, same refusal."""
    from types import SimpleNamespace

    from warmpool.workers.residents import choose_victims as worker_choose

    residents = [SimpleNamespace(nbytes=10, evictable=True, last_attached=t, created_at=0.0,
                                 name=n) for n, t in (("b", 2.0), ("a", 1.0), ("c", None))]
    victims = worker_choose(residents, 25, 5, who="m", device="cuda:0")  # type: ignore[arg-type]
    assert [v.name for v in victims] == ["c", "a"]
    with pytest.raises(CapacityError):
        worker_choose(residents, 50, 5, who="m", device="cuda:0")  # type: ignore[arg-type]


def test_new_version_supersedes_every_warm_old_one_pinned_or_leased() -> None:
    current = _entry("v3", uri="file:///m/", created=3)
    entries = [current, _entry("v1", uri="file:///m/", pinned=True),
               _entry("v2", uri="file:///m/", leases=2),
               _entry("gone", uri="file:///m/", state=State.EVICTED),
               _entry("gpu", uri="file:///m/", device="cuda:0"),
               _entry("other", uri="file:///other/")]
    old = superseded(entries, current)
    assert [e.content_hash for e in old] == ["v1", "v2"]
    assert inherits_pin(old) and not inherits_pin(old[1:])


async def test_prefetch_of_a_new_version_retires_a_pinned_old_one_and_keeps_the_pin(
        tmp_path: Path, settings: Settings) -> None:
    """One rule for old versions (the controller's dispatch applies the same function):
    the pin belongs to the model, so the new version is pinned and the old bytes go."""
    directory = tmp_path / "m"
    write_model(directory, shards=1, seed=1)
    pool = Pool(settings)
    v1 = (await prefetch(str(directory), settings=settings, pool=pool)).entry
    await pool.registry.put(replace(v1, pinned=True))
    shutil.rmtree(directory)
    write_model(directory, shards=1, seed=2)
    v2 = (await prefetch(str(directory), settings=settings, pool=pool)).entry
    assert v2.content_hash != v1.content_hash
    states = {e.content_hash: (e.state, e.pinned) for e in await pool.entries()}
    assert states[v1.content_hash] == (State.EVICTED, False)
    assert states[v2.content_hash] == (State.WARM, True)
    assert len(segments_of(settings)) == 1


# --- the metadata cache stays bounded -------------------------------------------------

def _cached(settings: Settings) -> set[str]:
    return {p.name for p in settings.cache_dir.glob("*") if len(p.name) == 64}


async def test_cache_prune_bounds_count_and_age_but_keeps_what_is_used(
        tmp_path: Path, settings: Settings) -> None:
    from warmpool.model.cache import MetadataCache
    from warmpool.model.uri import parse_uri

    cache = MetadataCache(settings.cache_dir)
    hashes = []
    for seed in range(5):
        directory = tmp_path / f"m{seed}"
        write_model(directory, shards=1, seed=seed)
        hashes.append((await cache.fetch(parse_uri(str(directory)))).content_hash)
    now = time.time()
    for age, h in zip((5000, 4000, 30, 20, 10), hashes, strict=True):  # seconds unused
        os.utime(settings.cache_dir / h, (now - age, now - age))
    # hashes[0] is the oldest and expired, but in use: it stays, and counts in the bound.
    removed = cache.prune({hashes[0]}, max_models=3, max_age_s=1000)
    assert sorted(removed) == sorted([hashes[1], hashes[2]])  # expired; then the LRU one
    assert _cached(settings) == {hashes[0], hashes[3], hashes[4]}
    assert cache.prune({hashes[0]}, max_models=1) == [hashes[4], hashes[3]]
    assert _cached(settings) == {hashes[0]}


async def test_prefetch_keeps_the_cache_bounded_sparing_leased_versions(
        tmp_path: Path, settings: Settings) -> None:
    """Every re-upload adds a cache directory; prefetch prunes to cache_max_models, and
    a version a serving process still holds keeps its metadata."""
    bounded = replace(settings, cache_max_models=2)
    directory = tmp_path / "m"
    versions = []
    held = None
    for seed in range(4):
        if directory.exists():
            shutil.rmtree(directory)
        write_model(directory, shards=1, seed=seed)
        versions.append((await prefetch(str(directory), settings=bounded)).entry.content_hash)
        if seed == 0:
            held = attach(str(directory), settings=bounded)
    assert held is not None
    try:
        assert _cached(settings) == {versions[0], versions[3]}
    finally:
        held.close()


# --- the same content under two URIs ----------------------------------------------------

def test_prefetch_reports_the_uri_asked_for_and_its_aliases(tmp_path: Path,
                                                            settings: Settings) -> None:
    """`prefetch b --json` of bytes already warm as a reports b (what was asked), and a
    as the alias it shares them with; not a, as if b had not been asked for."""
    from tests.pool_env import run_cli

    write_model(tmp_path / "a", shards=1, seed=5)
    # Hard links: a local file's etag is its inode and times, so only a link is the
    # "same upload" under two names here (an object store compares its etags).
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=os.link)
    a, b = (f"file://{tmp_path / m}/" for m in "ab")
    for path, uri, aliases, warm in ((tmp_path / "a", a, [], False),
                                     (tmp_path / "b", b, [a], True),
                                     (tmp_path / "a", a, [b], True)):
        proc = run_cli("prefetch", str(path), "--json")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert (report["uri"], report["aliases"], report["already_warm"]) == (uri, aliases, warm)


async def test_identical_files_under_two_uris_are_resident_once_and_named_by_both(
        tmp_path: Path, settings: Settings, s3_backend: Backend) -> None:
    """Upload the same checkpoint under models/a/ and models/b/: one content hash, one
    segment, attachable and listed under both URIs; evicting b or re-uploading a never
    pulls the bytes from under the other name."""
    expected = write_model(tmp_path / "src", shards=1, seed=11)
    for prefix in ("models/a/", "models/b/"):
        for name, data in model_files(tmp_path / "src").items():
            s3_backend.put(prefix + name, data)
    a, b = (str(s3_backend.uri_for(f"models/{m}/")) for m in "ab")
    pool = Pool(settings)
    first = await prefetch(a, settings=settings, pool=pool)
    second = await prefetch(b, settings=settings, pool=pool)
    assert second.already_warm and second.entry.content_hash == first.entry.content_hash
    assert len(segments_of(settings)) == 1
    [entry] = await pool.entries()
    assert entry.uris == [a, b]
    for uri in (a, b):
        with attach(uri, settings=settings) as weights:
            assert weights.uri == uri
            assert_bit_exact(weights, expected)

    # Evicting b releases the name, not the bytes a still names.
    released = await pool.evict(b)
    assert released.state == State.WARM and released.uris == [a]
    with pytest.raises(NotWarmError):
        attach(b, settings=settings)
    with attach(a, settings=settings) as weights:
        assert_bit_exact(weights, expected)

    # b again, then a re-upload of a: a's new version is warm, b keeps the old bytes.
    await prefetch(b, settings=settings, pool=pool)
    changed = write_model(tmp_path / "src2", shards=1, seed=12)
    for name, data in model_files(tmp_path / "src2").items():
        s3_backend.put("models/a/" + name, data)
    new = await prefetch(a, settings=settings, pool=pool)
    assert new.entry.content_hash != entry.content_hash
    warm = {e.content_hash: e.uris for e in await pool.entries() if e.state == State.WARM}
    assert warm == {entry.content_hash: [b], new.entry.content_hash: [a]}
    with attach(b, settings=settings) as weights:
        assert_bit_exact(weights, expected)
    with attach(a, settings=settings) as weights:
        assert_bit_exact(weights, changed)
    # The last name of the old bytes goes: so do they.
    assert (await pool.evict(b)).state == State.EVICTED
    assert len(segments_of(settings)) == 1


def assert_bit_exact(weights: Any, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(weights) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(_bits(weights[name]), _bits(tensor)), name
