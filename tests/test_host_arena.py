"""The host arena: chunks faulted once and reused model after model, without a byte of
the old model readable through the new one, without reuse under a lease, and without a
chunk shared by two fills or lost to a killed one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.models import write_model
from tests.pool_env import run_cli, segments_of
from tests.test_host_tier import assert_bit_exact, reference
from warmpool.attachment import attach
from warmpool.config import Settings
from warmpool.errors import LeaseHeldError
from warmpool.pool.arena import ArenaPlace, map_chunks, runs
from warmpool.pool.entries import Pool
from warmpool.pool.host import HostResident, HostTier
from warmpool.pool.registry.base import State
from warmpool.tiers.prefetch import prefetch

CHUNK = 1 << 20


@pytest.fixture
def arena(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The test's pool with the arena on, in 1 MiB chunks (its children too)."""
    monkeypatch.setenv("WARMPOOL_HOST_ARENA", "true")
    monkeypatch.setenv("WARMPOOL_HOST_ARENA_CHUNK", str(CHUNK))
    yield replace(settings, host_arena=True, host_arena_chunk=CHUNK)


SIZES = (700_001, 3, 1_000_003, 999_999, 17)


def write_sized(directory: Path, *, fill: str, seed: int = 0,
                sizes: tuple[int, ...] = SIZES) -> dict[str, torch.Tensor]:
    """A model of about 2.6 MiB (three chunks) with odd tensor sizes, so that the layout
    has padding between tensors and a tail in its last chunk: random bytes, or zeros."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i, n in enumerate(sizes):
        tensors[f"w{i}"] = (torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
                            if fill == "random" else torch.zeros(n, dtype=torch.uint8))
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "test", "seed": seed}))
    return tensors


def resident(settings: Settings, uri_part: str) -> HostResident:
    (found,) = [r for r in HostTier(settings.runtime_dir).residents() if uri_part in r.uri]
    assert found.arena is not None
    return found


def whole_span(found: HostResident) -> torch.Tensor:
    """Every byte of the model's chunks, tail included, as a reader could map them."""
    from warmpool.pool.arena import open_arena

    assert found.arena is not None
    fd = open_arena(found.arena)
    try:
        return map_chunks(fd, found.arena, writable=False)[1]
    finally:
        os.close(fd)


def test_runs_coalesce_consecutive_chunks() -> None:
    assert runs([4, 5, 6, 1, 2, 9]) == [(0, 4, 3), (3, 1, 2), (5, 9, 1)]
    assert runs([]) == []


def test_an_arena_place_from_a_record_is_checked() -> None:
    good = {"file": "x", "chunk_bytes": CHUNK, "chunks": [0, 3]}
    assert ArenaPlace.from_json(good).span == 2 * CHUNK
    for bad in ({**good, "chunks": [-1]}, {**good, "chunks": ["1"]}, {**good, "chunks": 3},
                {**good, "chunk_bytes": 1000}, {**good, "chunk_bytes": 0}, [1]):
        with pytest.raises((ValueError, KeyError, TypeError)):
            ArenaPlace.from_json(bad)


async def test_reuse_after_evict_is_bit_exact_and_leaks_nothing_of_the_old_model(
        tmp_path: Path, arena: Settings) -> None:
    noisy, quiet = tmp_path / "noisy", tmp_path / "quiet"
    # One tensor over almost all three chunks: its bytes lie under the padding and the
    # tail of the next model.
    write_sized(noisy, fill="random", seed=1, sizes=(3 * CHUNK - 300,))
    expected = write_sized(quiet, fill="zeros")
    first = await prefetch(str(noisy), settings=arena)
    old = resident(arena, "noisy")
    assert int(whole_span(old)[: old.layout.total_bytes].count_nonzero()) > 0
    await Pool(arena).evict(str(noisy))
    assert first.entry.state == State.WARM

    await prefetch(str(quiet), settings=arena)
    new = resident(arena, "quiet")
    assert new.arena is not None and old.arena is not None
    assert set(new.arena.chunks) == set(old.arena.chunks)  # the same pages, reused
    # Every byte of its chunks is zero: the tensors (zeros), the padding between them and
    # the tail of the last chunk, which the random model had filled before.
    assert whole_span(new).count_nonzero().item() == 0
    with attach(str(quiet), settings=arena) as weights:
        assert_bit_exact(weights, expected)
    assert len([s for s in segments_of(arena) if "arena" in s]) == 1
    assert not [s for s in segments_of(arena) if "arena" not in s]  # no segment of its own


async def test_a_model_spread_over_scattered_chunks_reads_as_one_buffer(
        tmp_path: Path, arena: Settings) -> None:
    """Three models, the middle one evicted: the next, larger model takes the freed
    chunks and new ones, not consecutive, and still attaches bit-exactly."""
    models = {}
    for i in range(3):
        models[i] = tmp_path / f"m{i}"
        write_sized(models[i], fill="random", seed=10 + i)
        await prefetch(str(models[i]), settings=arena)
    await Pool(arena).evict(str(models[1]))
    big = tmp_path / "big"
    expected = write_model(big, shards=2, seed=5)  # larger than one freed gap
    big_layout = await prefetch(str(big), settings=arena)
    placed = resident(arena, "big")
    assert placed.arena is not None and len(runs(placed.arena.chunks)) >= 1
    assert big_layout.entry.state == State.WARM
    with attach(str(big), settings=arena) as weights:
        assert_bit_exact(weights, expected)
    for i in (0, 2):
        with attach(str(models[i]), settings=arena) as weights:
            assert_bit_exact(weights, reference(models[i]))


async def test_scattered_chunks_map_in_order(tmp_path: Path, arena: Settings) -> None:
    """Chunks out of order in the file are laid side by side in buffer order."""
    host = HostTier(arena.runtime_dir, CHUNK)
    grant = host.arena.allocate("f" * 64 + "@cpu", 4 * CHUNK)
    try:
        fd = os.open(f"/dev/shm/{grant.place.file}", os.O_RDWR)
        for chunk in grant.place.chunks:
            os.pwrite(fd, bytes([chunk + 1]) * CHUNK, chunk * CHUNK)
        reordered = ArenaPlace(grant.place.file, CHUNK, tuple(reversed(grant.place.chunks)))
        whole = map_chunks(fd, reordered, writable=False)[1]
        os.close(fd)
        for position, chunk in enumerate(reordered.chunks):
            part = whole[position * CHUNK:(position + 1) * CHUNK]
            assert bool((part == chunk + 1).all())
    finally:
        host.arena.settle(grant)


async def test_a_lease_keeps_the_old_model_s_chunks_from_reuse(
        tmp_path: Path, arena: Settings) -> None:
    old_dir, next_dir, last_dir = tmp_path / "old", tmp_path / "next", tmp_path / "last"
    old_expected = write_sized(old_dir, fill="random", seed=2)
    write_sized(next_dir, fill="zeros")
    last_expected = write_sized(last_dir, fill="random", seed=3)
    await prefetch(str(old_dir), settings=arena)
    old = resident(arena, "old")
    assert old.arena is not None
    pool = Pool(arena)
    with attach(str(old_dir), settings=arena) as weights:
        with pytest.raises(LeaseHeldError):
            await pool.evict(str(old_dir))
        await pool.evict(str(old_dir), force=True)  # the holder keeps reading
        await prefetch(str(next_dir), settings=arena)
        taken = resident(arena, "next").arena
        assert taken is not None and not set(taken.chunks) & set(old.arena.chunks)
        assert_bit_exact(weights, old_expected)  # still the old model's bytes
        status = pool.host.arena.status()
        assert status is not None and status.free == 0  # the retired chunks are held
    # The lease ended: the old chunks are free, and the next fill takes them.
    await prefetch(str(last_dir), settings=arena)
    last = resident(arena, "last").arena
    assert last is not None and set(last.chunks) == set(old.arena.chunks)
    with attach(str(last_dir), settings=arena) as weights:
        assert_bit_exact(weights, last_expected)


ALLOCATE_AND_HOLD = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from warmpool.locks import try_lock
    from warmpool.pool.host import HostTier

    runtime, hashes = Path(sys.argv[1]), sys.argv[2].split(",")
    host = HostTier(runtime, int(sys.argv[3]))
    segments = []
    for content_hash in hashes:
        fd = try_lock(host.lock_path(content_hash + "@cpu"))  # a filler holds its entry
        assert fd is not None
        segment = host.create(content_hash, 3 * int(sys.argv[3]) - 5)
        segment.buffer.fill_(7)
        segments.append(segment)
    print(json.dumps([list(s.grant.place.chunks) for s in segments]), flush=True)
    sys.stdin.read()
""")


def hold_chunks(settings: Settings, hashes: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", ALLOCATE_AND_HOLD, str(settings.runtime_dir),
         ",".join(hashes), str(CHUNK)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def chunks_of(proc: subprocess.Popen[str]) -> list[list[int]]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else ""
    return json.loads(line)


async def test_two_processes_filling_at_once_never_share_a_chunk(arena: Settings) -> None:
    a = hold_chunks(arena, [f"{i:x}" * 64 for i in range(1, 6)])
    b = hold_chunks(arena, [f"{i:x}" * 64 for i in range(6, 11)])
    try:
        got = chunks_of(a) + chunks_of(b)
        flat = [c for chunks in got for c in chunks]
        assert len(got) == 10 and all(len(c) == 3 for c in got)
        assert len(flat) == len(set(flat)) == 30
    finally:
        for proc in (a, b):
            proc.kill()
            proc.wait(30)


async def test_a_filler_killed_mid_fill_gives_its_chunks_back(
        tmp_path: Path, arena: Settings) -> None:
    proc = hold_chunks(arena, ["a" * 64])
    try:
        (held,) = chunks_of(proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    pool = Pool(arena)
    await pool.reclaim()
    assert pool.host.residents() == []  # nothing half-filled was published
    model = tmp_path / "after"
    expected = write_sized(model, fill="zeros")
    await prefetch(str(model), settings=arena)
    placed = resident(arena, "after").arena
    assert placed is not None and set(placed.chunks) == set(held)  # given back, reused
    status = pool.host.arena.status()
    assert status is not None and status.size == 3 * CHUNK  # the arena did not grow
    assert not list(pool.host.arena.claims.iterdir())
    with attach(str(model), settings=arena) as weights:
        assert_bit_exact(weights, expected)


async def test_a_restarted_pool_rebuilds_the_free_list_from_the_records(
        tmp_path: Path, arena: Settings) -> None:
    dirs = [tmp_path / f"r{i}" for i in range(3)]
    for i, directory in enumerate(dirs):
        write_sized(directory, fill="random", seed=20 + i)
        await prefetch(str(directory), settings=arena)
    await Pool(arena).evict(str(dirs[1]))
    fresh = HostTier(arena.runtime_dir, CHUNK)  # nothing in memory: the files only
    status = fresh.arena.status()
    assert status is not None
    assert (status.size, status.used, status.free) == (9 * CHUNK, 6 * CHUNK, 3 * CHUNK)
    assert status.faulted == 3 * CHUNK


async def test_trim_gives_free_pages_back_and_keeps_what_is_asked(
        tmp_path: Path, arena: Settings) -> None:
    dirs = [tmp_path / f"t{i}" for i in range(3)]
    for i, directory in enumerate(dirs):
        write_sized(directory, fill="random", seed=30 + i)
        await prefetch(str(directory), settings=arena)
    pool = Pool(arena)
    for directory in dirs[1:]:
        await pool.evict(str(directory))
    assert pool.host.arena.trim(keep=2 * CHUNK) == 4 * CHUNK
    status = pool.host.arena.status()
    assert status is not None and (status.used, status.faulted) == (3 * CHUNK, 2 * CHUNK)
    result = run_cli("trim", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["given_back"] == 2 * CHUNK
    assert report["arena"]["size"] == 3 * CHUNK  # the free end of the file is cut off
    with attach(str(dirs[0]), settings=arena) as weights:  # a warm model keeps its pages
        assert_bit_exact(weights, reference(dirs[0]))
    shown = run_cli("status")
    assert "host arena" in shown.stdout and "0.003 GB" in shown.stdout


async def test_an_evict_trims_to_the_high_water_mark(tmp_path: Path, arena: Settings) -> None:
    keep = replace(arena, host_arena_keep=CHUNK)
    dirs = [tmp_path / f"h{i}" for i in range(2)]
    for i, directory in enumerate(dirs):
        write_sized(directory, fill="random", seed=40 + i)
        await prefetch(str(directory), settings=keep)
    pool = Pool(keep)
    await pool.evict(str(dirs[0]))
    status = pool.host.arena.status()
    assert status is not None and status.faulted == CHUNK


async def test_a_record_naming_chunks_it_cannot_own_is_not_attached(
        tmp_path: Path, arena: Settings) -> None:
    model = tmp_path / "forged"
    write_sized(model, fill="random")
    await prefetch(str(model), settings=arena)
    host = HostTier(arena.runtime_dir)
    found = resident(arena, "forged")
    record = host.records / f"{found.content_hash}@cpu.json"
    data = json.loads(record.read_text())
    for forged in ({**data["arena"], "file": "../etc/passwd"},          # not the arena
                   {**data["arena"], "chunks": data["arena"]["chunks"][:1]},  # too small
                   {**data["arena"], "chunk_bytes": 12345}):
        record.write_text(json.dumps({**data, "arena": forged}))
        assert host.resident(found.content_hash) is None
    record.write_text(json.dumps(data))
    assert host.resident(found.content_hash) is not None


async def test_the_arena_off_leaves_every_model_a_segment_of_its_own(
        model_dir: Path, settings: Settings) -> None:
    assert not settings.host_arena
    await prefetch(str(model_dir), settings=settings)
    assert not [s for s in segments_of(settings) if "arena" in s]
    assert HostTier(settings.runtime_dir).residents()[0].arena is None


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    write_model(directory, shards=2)
    return directory


async def test_a_second_uri_of_the_same_bytes_keeps_their_chunks(
        tmp_path: Path, arena: Settings) -> None:
    """Renaming a record (a second URI of identical files) keeps its place in the arena:
    it once dropped it, and the model was no longer warm under either name."""
    import shutil

    first, second = tmp_path / "a", tmp_path / "b"
    expected = write_sized(first, fill="random", seed=50)
    # Hard links: a local file's etag is its inode and times (as in test_data_state).
    shutil.copytree(first, second, copy_function=os.link)
    await prefetch(str(first), settings=arena)
    again = await prefetch(str(second), settings=arena)
    assert again.already_warm
    for name in (first, second):
        with attach(str(name), settings=arena) as weights:
            assert_bit_exact(weights, expected)


async def test_a_file_planted_where_the_arena_was_blocks_nothing(
        tmp_path: Path, arena: Settings) -> None:
    """The arena vanished (a reboot, systemd's RemoveIPC; the runtime directory stays)
    and someone put a file under its name: it is never mapped, and the next fill makes a
    new arena under a new random name instead of failing."""
    from warmpool.errors import NotWarmError
    from warmpool.pool.host import SHM_DIR

    model = tmp_path / "m"
    expected = write_sized(model, fill="random", seed=60)
    await prefetch(str(model), settings=arena)
    old = resident(arena, "m")
    planted = SHM_DIR / old.segment
    planted.unlink()
    planted.write_bytes(b"\xab" * (4 * CHUNK))
    planted.chmod(0o644)  # not a segment of ours: ours are 0600
    try:
        with pytest.raises(NotWarmError):
            attach(str(model), settings=arena)
        again = await prefetch(str(model), settings=arena)
        assert not again.already_warm
        fresh = resident(arena, "m")
        assert fresh.segment != old.segment
        with attach(str(model), settings=arena) as weights:
            assert_bit_exact(weights, expected)
        assert planted.read_bytes()[:4] == b"\xab" * 4  # left alone, never written
    finally:
        planted.unlink(missing_ok=True)


async def test_status_counts_what_a_worker_page_locked_while_it_holds_it(
        tmp_path: Path, arena: Settings) -> None:
    """A GPU worker announces the arena bytes it locked (no GPU here: the announcement
    itself, as the worker makes it); the kernel ends it with the worker."""
    from warmpool.pool.arena import Arena

    model = tmp_path / "m"
    write_sized(model, fill="random", seed=70)
    await prefetch(str(model), settings=arena)
    host = HostTier(arena.runtime_dir, CHUNK)
    marker = Arena.announce_locked(arena.runtime_dir, 3 * CHUNK)
    status = host.arena.status()
    assert status is not None and status.locked == 3 * CHUNK
    assert "page-locked by a GPU worker" in run_cli("status").stdout
    marker.release()
    status = host.arena.status()
    assert status is not None and status.locked == 0


def test_zero_gaps_clears_everything_but_the_tensors_in_batches() -> None:
    """More gaps than one batch (4096): every byte outside a tensor is cleared, every
    byte inside one kept."""
    from warmpool.pool.arena import zero_gaps
    from warmpool.pool.layout import Layout, Slot

    n = 5000
    slots = tuple(Slot(f"t{i}", "U8", (1 + i % 7,), 256 * i, 1 + i % 7, "f", 0)
                  for i in range(n))
    layout = Layout("0" * 64, 256 * n, slots)
    whole = torch.full((256 * n + 1000,), 0xFF, dtype=torch.uint8)
    zero_gaps(whole, layout)
    inside = torch.zeros_like(whole, dtype=torch.bool)
    for s in slots:
        inside[s.offset:s.offset + s.nbytes] = True
    assert bool((whole[inside] == 0xFF).all()) and bool((whole[~inside] == 0).all())


async def test_the_controller_s_metrics_show_the_arena(tmp_path: Path, arena: Settings) -> None:
    from prometheus_client import generate_latest

    from warmpool.controller.metrics import Metrics

    model = tmp_path / "m"
    write_sized(model, fill="random", seed=80)
    await prefetch(str(model), settings=arena)
    await Pool(arena).evict(str(model))
    metrics = Metrics()
    metrics.observe_arena(HostTier(arena.runtime_dir, CHUNK).arena.status())
    text = generate_latest(metrics.registry).decode()
    assert 'warmpool_host_arena_bytes{kind="faulted"} 3.145728e+06' in text
    assert 'warmpool_host_arena_bytes{kind="used"} 0.0' in text


async def test_a_refill_over_a_leased_record_keeps_the_old_chunks_from_reuse(
        tmp_path: Path, arena: Settings) -> None:
    """The registry lost the entry (a Redis restarted empty) while a reader still holds
    the model: the model is filled again and its record names new chunks; the chunks the
    reader maps stay out of reuse until its lease ends."""
    model, other = tmp_path / "m", tmp_path / "o"
    expected = write_sized(model, fill="random", seed=90)
    write_sized(other, fill="zeros")
    first = await prefetch(str(model), settings=arena)
    old = resident(arena, "m").arena
    assert old is not None
    pool = Pool(arena)
    with attach(str(model), settings=arena) as weights:
        await pool.registry.transition(first.entry, State.FAILED, error="lost track")
        again = await prefetch(str(model), settings=arena)
        assert not again.already_warm
        await prefetch(str(other), settings=arena)
        taken = {c for r in HostTier(arena.runtime_dir).residents() if r.arena
                 for c in r.arena.chunks}
        assert not taken & set(old.chunks)
        assert_bit_exact(weights, expected)


async def test_an_arena_keeps_its_chunk_size_when_the_setting_changes(
        tmp_path: Path, arena: Settings) -> None:
    """Records count in the arena's own chunks: a pool restarted with another
    host_arena_chunk must not allocate the live model's bytes again in other units."""
    first, second = tmp_path / "first", tmp_path / "second"
    expected = write_sized(first, fill="random", seed=95)
    write_sized(second, fill="zeros")
    await prefetch(str(first), settings=arena)
    bigger = replace(arena, host_arena_chunk=4 * CHUNK)
    await prefetch(str(second), settings=bigger)
    a, b = resident(arena, "first/").arena, resident(arena, "second/").arena
    assert a is not None and b is not None
    assert a.chunk_bytes == b.chunk_bytes == CHUNK and not set(a.chunks) & set(b.chunks)
    with attach(str(first), settings=arena) as weights:
        assert_bit_exact(weights, expected)
