"""The host tier under planted files, corrupt records and killed writers: a file that is
not ours is never served, a bad record is skipped and reported, and what a killed
prefetch left is reclaimed by whatever command runs next."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.models import write_model
from tests.pool_env import run_cli, segments_of
from warmpool.attachment import attach
from warmpool.config import Settings
from warmpool.errors import NotWarmError
from warmpool.pool.host import SHM_DIR, HostTier
from warmpool.pool.registry.base import State
from warmpool.tiers import host as host_tier
from warmpool.tiers.prefetch import prefetch


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    write_model(tmp_path / "model", shards=2)
    return tmp_path / "model"


def _expected(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _plant(path: Path, size: int, *, foreign_uid: bool) -> None:
    """What another user (or a careless process) puts under a segment name."""
    path.write_bytes(b"\xab" * size)
    os.chmod(path, 0o644)
    if foreign_uid:
        os.chown(path, 65534, 65534)


@pytest.mark.parametrize("foreign_uid", [False, True])
async def test_a_planted_segment_is_never_served(model_dir: Path, settings: Settings,
                                                 foreign_uid: bool) -> None:
    if foreign_uid and os.getuid() != 0:
        pytest.skip("planting a file of another uid needs root")
    result = await prefetch(str(model_dir), settings=settings)
    host = HostTier(settings.runtime_dir)
    resident = host.resident(result.entry.content_hash)
    assert resident is not None
    segment = SHM_DIR / resident.segment
    segment.unlink()  # a reboot, or systemd's RemoveIPC; the runtime dir survives
    try:
        _plant(segment, result.entry.bytes, foreign_uid=foreign_uid)
        with pytest.raises(NotWarmError):
            attach(str(model_dir), settings=settings)
        # Never "already warm": the model is filled again under a fresh random name,
        # so a planted name blocks nothing.
        again = await prefetch(str(model_dir), settings=settings)
        assert not again.already_warm
        fresh = host.resident(result.entry.content_hash)
        assert fresh is not None and fresh.segment != resident.segment
        if foreign_uid:  # another user's file: it cannot be removed; left, never served
            assert segment.read_bytes()[:4] == b"\xab" * 4
    finally:
        segment.unlink(missing_ok=True)
    await prefetch(str(model_dir), settings=settings)  # once the name is free again
    with attach(str(model_dir), settings=settings) as weights:
        for name, tensor in _expected(model_dir).items():
            assert torch.equal(weights[name].reshape(-1).view(torch.uint8),
                               tensor.reshape(-1).view(torch.uint8))


async def test_a_record_naming_a_path_is_refused(model_dir: Path, settings: Settings,
                                                 tmp_path: Path) -> None:
    result = await prefetch(str(model_dir), settings=settings)
    record = settings.runtime_dir / "resident" / f"{result.entry.content_hash}@cpu.json"
    target = tmp_path / "secret"
    target.write_bytes(b"s" * result.entry.bytes)
    data = json.loads(record.read_text())
    data["segment"] = os.path.relpath(target, SHM_DIR)  # ../../tmp/.../secret
    record.write_text(json.dumps(data))
    with pytest.raises(NotWarmError):
        attach(str(model_dir), settings=settings)
    with pytest.raises(NotWarmError):
        attach(result.entry.content_hash, settings=settings)


KILLED_WRITER = textwrap.dedent("""
    import asyncio, os, signal, sys
    from warmpool.config import Settings
    from warmpool.locks import file_lock
    from warmpool.pool.entries import Pool
    from warmpool.pool.registry.base import PoolEntry, State

    async def main():
        pool = Pool(Settings.load())
        entry = PoolEntry(uri=sys.argv[1], content_hash="ab" * 32, device="cpu")
        with file_lock(pool.host.lock_path(entry.key)):
            entry = await pool.registry.transition(entry, State.STREAMING, bytes=1 << 20)
            segment = pool.host.create(entry.content_hash, 1 << 20)
            segment.buffer[:] = 7
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 mid-prefetch

    asyncio.run(main())
""")


@pytest.mark.parametrize("command", ["status", "evict", "metadata", "attach"])
def test_every_command_reclaims_a_killed_writers_segment(model_dir: Path, settings: Settings,
                                                         command: str) -> None:
    writer = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(model_dir / "x")],
                            capture_output=True, text=True, check=False, timeout=120)
    assert writer.returncode == -9, writer.stderr
    assert any(".part-" in s for s in segments_of(settings))
    args = {"status": ["status", "--json", "--history"], "evict": ["evict", "ab" * 32],
            "metadata": ["metadata", str(model_dir)], "attach": ["attach", "ab" * 32]}[command]
    done = run_cli(*args)
    assert "Traceback" not in done.stderr, done.stderr
    assert not any(".part-" in s for s in segments_of(settings)), command
    if command == "status":
        (entry,) = json.loads(done.stdout)
        assert entry["state"] == "failed" and "interrupted" in entry["error"]


async def test_corrupt_records_are_skipped_and_reported(model_dir: Path, settings: Settings,
                                                        tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_model(other, shards=1, seed=3)
    first = await prefetch(str(other), settings=settings)
    entries = settings.runtime_dir / "entries"
    (entries / f"{'0' * 64}@cpu.json").write_bytes(b"\x00garbage{")
    (entries / f"{'1' * 64}@cpu.json").write_text(json.dumps(
        {"uri": "/m", "content_hash": "1" * 64, "state": "exploded"}))
    (entries / f"{'2' * 64}@cpu.json").write_text(json.dumps(
        {"uri": "/m", "content_hash": "2" * 64, "state": "warm", "bytes": "many"}))
    os.mkfifo(entries / f"{'3' * 64}@cpu.json")
    (settings.runtime_dir / "resident" / f"{'4' * 64}@cpu.json").write_text("[[[[")
    os.mkfifo(settings.runtime_dir / "resident" / f"{'5' * 64}@cpu.json")
    done = run_cli("status", "--json", timeout=60)
    assert done.returncode == 0, done.stderr
    assert [e["content_hash"] for e in json.loads(done.stdout)] == [first.entry.content_hash]
    assert "skipping bad pool entry" in done.stderr
    await prefetch(str(model_dir), settings=settings)
    with attach(str(model_dir), settings=settings) as weights:
        assert len(weights) == len(_expected(model_dir))
    with attach(str(other), settings=settings) as weights:
        assert len(weights) == len(_expected(other))
    done = run_cli("evict", str(other), timeout=60)
    assert done.returncode == 0, done.stderr


async def test_a_fifo_lease_file_neither_counts_nor_hangs(model_dir: Path,
                                                          settings: Settings) -> None:
    result = await prefetch(str(model_dir), settings=settings)
    leases = settings.runtime_dir / "leases" / result.entry.key
    leases.mkdir(parents=True, exist_ok=True)
    fifo = leases / "999-abc.lease"
    os.mkfifo(fifo)
    # A process holding a lock on the FIFO: reading it would block for ever.
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys
        fd = os.open({str(fifo)!r}, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        done = run_cli("status", "--json", timeout=60)
        assert done.returncode == 0, done.stderr
        (entry,) = json.loads(done.stdout)
        assert entry["leases"] == 0 and entry["state"] == State.WARM.value
    finally:
        holder.kill()
        holder.wait()


async def test_a_forced_evict_between_lease_and_map_is_not_warm(
        model_dir: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    await prefetch(str(model_dir), settings=settings)
    real = host_tier.map_resident

    def evicted_first(resident):  # type: ignore[no-untyped-def]
        (SHM_DIR / resident.segment).unlink()  # `warmpool evict --force` wins the race here
        return real(resident)

    monkeypatch.setattr(host_tier, "map_resident", evicted_first)
    with pytest.raises(NotWarmError):
        attach(str(model_dir), settings=settings)
    assert not list((settings.runtime_dir / "leases").rglob("*.lease"))


def test_planted_names_and_a_directory_under_our_prefix_block_nothing(
        model_dir: Path, settings: Settings) -> None:
    """2,000 names another user planted under the pool's prefix (it is predictable: uid
    and runtime directory), and a directory of ours at a segment-like name: prefetch,
    status and evict all work; status reports them in one line, and no lock file is
    made for any of them."""
    if os.getuid() != 0:
        pytest.skip("planting files of another uid needs root")
    host = HostTier(settings.runtime_dir)
    planted = [SHM_DIR / f"{host.prefix}{i:064x}" for i in range(2000)]
    directory = SHM_DIR / f"{host.prefix}{'d' * 64}.{'0' * 16}"
    try:
        for path in planted:
            path.write_bytes(b"")
            os.chown(path, 65534, 65534)
        directory.mkdir()
        locks_before = set((settings.runtime_dir / "locks").glob("*"))
        done = run_cli("prefetch", str(model_dir))
        assert done.returncode == 0, done.stderr
        status = run_cli("status")
        assert status.returncode == 0, status.stderr
        foreign = [line for line in status.stderr.splitlines() if "pool's prefix" in line]
        assert len(foreign) <= 1 and "2001 name(s)" in status.stderr, status.stderr
        assert "IsADirectoryError" not in status.stderr + done.stderr
        evicted = run_cli("evict", str(model_dir), "--force")
        assert evicted.returncode == 0, evicted.stderr
        new_locks = set((settings.runtime_dir / "locks").glob("*")) - locks_before
        assert len(new_locks) <= 2, sorted(p.name for p in new_locks)  # the model's own
        assert all(path.exists() for path in planted) and directory.is_dir()
    finally:
        for path in planted:
            path.unlink(missing_ok=True)
        if directory.exists():
            directory.rmdir()


@pytest.mark.parametrize("name", ["m%41", "a#b", "a?b", "a\nb", "a b+c"],
                         ids=["percent", "hash", "question", "newline", "space-plus"])
def test_a_plain_path_is_the_path_byte_for_byte(settings: Settings, tmp_path: Path,
                                                name: str) -> None:
    """``/w/m%41`` once warmed ``/w/mA`` (another model), ``a\\nb`` warmed ``ab``, and a
    name with ``#`` or ``?`` could not be warmed at all, leaving a failed entry."""
    model = tmp_path / name
    write_model(model, shards=2)
    decoy = tmp_path / "mA"  # what a second decoding of m%41 would name
    write_model(decoy, shards=1)
    done = run_cli("prefetch", str(model), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    from warmpool.model.uri import parse_uri
    assert parse_uri(report["uri"]).path == model  # the URI names this directory
    verify = run_cli("attach", str(model), "--verify")
    assert verify.returncode == 0, verify.stderr + verify.stdout
    status = run_cli("status", "--json")
    uris = [e["uri"] for e in json.loads(status.stdout)]
    assert [parse_uri(u).path for u in uris] == [model]  # not mA, not ab, no failed entry
    assert "\n" not in "".join(uris)
    evicted = run_cli("evict", str(model))
    assert evicted.returncode == 0, evicted.stderr
    assert json.loads(run_cli("status", "--json").stdout) == []


def test_escape_sequences_in_names_never_reach_the_terminal(settings: Settings,
                                                           tmp_path: Path) -> None:
    """Whoever can write the registry (Redis, or the runtime directory) chooses the text
    `status` prints, and a directory name is chosen by whoever made it: an escape sequence
    there (retitle the terminal, clear the screen) once printed raw. Every line shows it
    escaped: ``%1B`` inside a URI, ``\\x1b`` elsewhere."""
    import time

    from warmpool.pool.registry.base import PoolEntry
    from warmpool.pool.registry.files import FileRegistry

    hostile = "\x1b]0;owned\x07\x1b[2J"
    FileRegistry(settings.runtime_dir).put_sync(PoolEntry(
        uri=f"file:///planted{hostile}/", content_hash="ab" * 32, device=f"cpu{hostile}",
        node="n", transport="shm", created_at=time.time(), history=[], state=State.FAILED,
        error=f"failed{hostile}"))
    model = tmp_path / f"a{hostile}"
    write_model(model, shards=1)
    for args in (("status", "--history"), ("prefetch", str(model)), ("status", "--history"),
                 ("evict", str(model)),
                 ("attach", str(model))):
        proc = run_cli(*args)
        assert proc.returncode == (1 if args[0] == "attach" else 0), proc.stderr
        text = proc.stdout + proc.stderr
        assert "\x1b" not in text and "\x07" not in text, (args, text)
        assert "%1B]0;owned%07%1B[2J" in text or "\\x1b]0;owned\\x07\\x1b[2J" in text, (args, text)
