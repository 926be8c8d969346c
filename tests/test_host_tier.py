"""The host tier end to end: prefetch into shared memory, attach from other processes,
leases, capacity eviction, and failures that leave nothing behind."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.models import write_model
from tests.pool_env import run_cli, run_python, segments_of
from warmpool.attachment import attach
from warmpool.config import Settings
from warmpool.errors import (
    CapacityError,
    LeaseHeldError,
    NotWarmError,
    SafetensorsError,
    StorageError,
    StreamError,
)
from warmpool.pool.entries import Pool
from warmpool.pool.refs import ModelRef
from warmpool.pool.registry.base import State
from warmpool.tiers.prefetch import prefetch


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def reference(model_dir: Path) -> dict[str, torch.Tensor]:
    """What safetensors itself reads from the same files."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def assert_bit_exact(attached: object, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(attached) == sorted(expected)  # type: ignore[arg-type]
    for name, tensor in expected.items():
        assert same_bits(attached[name], tensor), name  # type: ignore[index]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    write_model(directory, shards=3)
    return directory


@pytest.mark.parametrize("loader", ["runai", "native", "pread"])
async def test_prefetch_then_attach_is_bit_exact(model_dir: Path, settings: Settings,
                                                 loader: str) -> None:
    result = await prefetch(str(model_dir), settings=settings, loader=loader)  # type: ignore[arg-type]
    assert result.entry.state == State.WARM and result.loader == loader
    expected = reference(model_dir)
    assert result.entry.tensors == len(expected)
    with attach(str(model_dir), settings=settings) as weights:
        assert weights.transport == "shm"
        assert_bit_exact(weights, expected)


async def test_every_dtype_and_odd_shape_survives(tmp_path: Path, settings: Settings) -> None:
    directory = tmp_path / "odd"
    directory.mkdir()
    tensors = {
        "bf16": torch.randn(7, 5).bfloat16(), "fp16": torch.randn(3, 3).half(),
        "fp32": torch.randn(11), "fp64": torch.randn(2, 2).double(),
        "int8": torch.randint(-128, 127, (9,), dtype=torch.int8),
        "int64": torch.randint(-2**40, 2**40, (3,)), "uint8": torch.arange(5, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4), "f8": torch.randn(6).to(torch.float8_e4m3fn),
    }
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text("{}")
    await prefetch(str(directory), settings=settings)
    with attach(str(directory), settings=settings) as weights:
        assert_bit_exact(weights, tensors)
        assert weights["scalar"].dim() == 0 and weights["empty"].numel() == 0


async def test_views_share_one_mapping_and_are_read_only(model_dir: Path,
                                                         settings: Settings) -> None:
    await prefetch(str(model_dir), settings=settings)
    with attach(str(model_dir), settings=settings) as weights:
        storages = {t.untyped_storage().data_ptr() for t in weights.values()}
        assert len(storages) == 1  # every tensor is a view of the one segment
        with pytest.raises(TypeError):
            weights["x"] = torch.zeros(1)  # type: ignore[index]
    # A write through a view must fault, not silently change weights others share.
    name = next(iter(reference(model_dir)))
    code = textwrap.dedent(f"""
        from warmpool.attachment import attach
        w = attach({str(model_dir)!r})
        w[{name!r}].view(-1)[0] = 0
        print("WROTE")
    """)
    proc = run_python(code)
    assert "WROTE" not in proc.stdout and proc.returncode == -signal.SIGSEGV


async def test_attach_in_new_process_after_prefetcher_exit_and_source_deleted(
        model_dir: Path, settings: Settings, tmp_path: Path) -> None:
    proc = run_cli("prefetch", str(model_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for field in ("uri", "content_hash", "state", "device", "bytes", "tensors", "seconds"):
        assert field in report
    assert report["state"] == "warm" and report["device"] == "cpu"
    # Keep a reference copy, then remove the source: attach must not need it.
    ref_file = tmp_path / "reference.safetensors"
    save_file(reference(model_dir), str(ref_file))
    shutil.rmtree(model_dir)
    code = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file
        from warmpool import attach
        expected = load_file({str(ref_file)!r})
        with attach({report['content_hash'][:16]!r}) as w:
            assert sorted(w) == sorted(expected)
            for k, t in expected.items():
                assert torch.equal(w[k].reshape(-1).view(torch.uint8),
                                   t.reshape(-1).view(torch.uint8)), k
        print("OK", len(expected))
    """)
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK")


TORCH_BLOCKED_CLI = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch imported by an operator command")
sys.meta_path.insert(0, NoTorch())
from warmpool.cli import main
sys.argv = ["warmpool", *sys.argv[1:]]
main()
"""


async def test_operator_commands_do_not_import_torch(model_dir: Path,
                                                     settings: Settings) -> None:
    """status, metadata and evict answer in a fraction of a second because they never
    import torch (seconds on a small machine); only streaming and attaching need it."""
    result = await prefetch(str(model_dir), settings=settings)
    for args in (["status", "--json"], ["metadata", str(model_dir), "--json"],
                 ["evict", str(model_dir)]):
        proc = subprocess.run([sys.executable, "-c", TORCH_BLOCKED_CLI, *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (args, proc.stderr)
    statuses = {e.state for e in await Pool(settings).entries()}
    assert result.entry.state == State.WARM and statuses == {State.EVICTED}


async def test_the_cli_prints_outside_text_as_it_is(tmp_path: Path, settings: Settings) -> None:
    """Paths, keys and error messages are not console markup: "[v2]" stays "[v2]"."""
    weird = tmp_path / "llama[v2][bold]"
    write_model(weird)
    for args in (["prefetch", str(weird)], ["metadata", str(weird)], ["status"]):
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr
        assert "llama[v2][bold]" in proc.stdout, (args, proc.stdout)
    proc = run_cli("metadata", str(tmp_path / "gone[x]"))
    assert proc.returncode != 0 and "gone[x]" in proc.stderr, proc.stderr


async def test_prefetch_of_warm_model_returns_at_once(model_dir: Path,
                                                      settings: Settings) -> None:
    first = await prefetch(str(model_dir), settings=settings)
    second = await prefetch(str(model_dir), settings=settings)
    assert not first.already_warm and second.already_warm
    assert second.entry.content_hash == first.entry.content_hash and second.loader == ""


async def test_changed_model_gets_a_new_entry(model_dir: Path, settings: Settings) -> None:
    first = await prefetch(str(model_dir), settings=settings)
    save_file({"extra": torch.ones(3)}, str(model_dir / "model-extra.safetensors"))
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    index["weight_map"]["extra"] = "model-extra.safetensors"
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    held = attach(first.entry.content_hash, settings=settings)  # a holder of version 1
    second = await prefetch(str(model_dir), settings=settings)
    assert second.entry.content_hash != first.entry.content_hash
    with attach(str(model_dir), settings=settings) as weights:  # the newest version
        assert same_bits(weights["extra"], torch.ones(3))
    states = {e.content_hash: e.state for e in await Pool(settings).entries()}
    assert states[first.entry.content_hash] == State.WARM  # leased: kept
    held.close()
    third_dir_change = model_dir / "generation_config.json"
    third_dir_change.write_text('{"do_sample": true}')
    third = await prefetch(str(model_dir), settings=settings)
    states = {e.content_hash: e.state for e in await Pool(settings).entries()}
    # Unleased older versions of the same URI are retired once the new one is warm.
    assert states[first.entry.content_hash] == State.EVICTED
    assert states[second.entry.content_hash] == State.EVICTED
    assert states[third.entry.content_hash] == State.WARM
    assert len(segments_of(settings)) == 1


def test_attach_of_cold_model_says_how_to_warm_it(model_dir: Path, settings: Settings) -> None:
    with pytest.raises(NotWarmError, match="warmpool prefetch"):
        attach(str(model_dir), settings=settings)
    proc = run_cli("attach", str(model_dir))
    assert proc.returncode == 1 and "warmpool prefetch" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_a_path_named_like_a_hash_is_that_path(tmp_path: Path, settings: Settings,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Hex digits name a hash prefix unless a file or directory of that name exists here
    (model folders are often named by a hash); ``./name`` is always the path."""
    named = tmp_path / "0123abcd"
    write_model(named, shards=2)
    warm = (await prefetch(str(named), settings=settings)).entry
    assert not warm.content_hash.startswith("0123abcd")
    monkeypatch.chdir(tmp_path)
    assert ModelRef.parse("0123abcd") == ModelRef.parse("./0123abcd") == ModelRef(warm.uri, False)
    with attach("0123abcd", settings=settings) as weights:
        assert weights.content_hash == warm.content_hash
        assert_bit_exact(weights, reference(named))
    prefix = warm.content_hash[:10]
    assert ModelRef.parse(prefix) == ModelRef(prefix, True)  # no such path here: a hash
    with attach(prefix, settings=settings) as weights:
        assert weights.uri == warm.uri
    monkeypatch.chdir(named)  # here "0123abcd" names no path, so it is a hash prefix
    with pytest.raises(NotWarmError):
        attach("0123abcd", settings=settings)
    with pytest.raises(NotWarmError):
        await Pool(settings).evict("0123abcd")
    monkeypatch.chdir(tmp_path)
    assert (await Pool(settings).evict("0123abcd")).content_hash == warm.content_hash


async def test_evict_refused_while_attached_then_allowed(model_dir: Path,
                                                         settings: Settings) -> None:
    await prefetch(str(model_dir), settings=settings)
    pool = Pool(settings)
    weights = attach(str(model_dir), settings=settings)
    assert [e.leases for e in await pool.entries()] == [1]
    with pytest.raises(LeaseHeldError):
        await pool.evict(str(model_dir))
    proc = run_cli("evict", str(model_dir))
    assert proc.returncode == 1 and "lease" in proc.stderr
    weights.close()
    evicted = await pool.evict(str(model_dir))
    assert evicted.state == State.EVICTED
    assert segments_of(settings) == []
    with pytest.raises(NotWarmError):
        attach(str(model_dir), settings=settings)


async def test_force_evict_keeps_existing_views_readable(model_dir: Path,
                                                         settings: Settings) -> None:
    await prefetch(str(model_dir), settings=settings)
    expected = reference(model_dir)
    weights = attach(str(model_dir), settings=settings)
    await Pool(settings).evict(str(model_dir), force=True)
    assert segments_of(settings) == []  # the name is gone at once...
    assert_bit_exact(weights, expected)  # ...the holder's mapping lives until it lets go
    weights.close()


async def test_sigkilled_lease_holder_frees_its_lease(model_dir: Path,
                                                      settings: Settings) -> None:
    await prefetch(str(model_dir), settings=settings)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from warmpool import attach
            w = attach({str(model_dir)!r})
            print("attached", flush=True)
            time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "attached"
        pool = Pool(settings)
        assert (await pool.entries())[0].leases == 1
        with pytest.raises(LeaseHeldError):
            await pool.evict(str(model_dir))
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert (await pool.entries())[0].leases == 0
        assert (await pool.evict(str(model_dir))).state == State.EVICTED
    finally:
        holder.kill()


async def test_capacity_evicts_least_recently_attached(tmp_path: Path,
                                                       settings: Settings) -> None:
    dirs = []
    for i in range(3):
        d = tmp_path / f"m{i}"
        write_model(d, shards=1, seed=i)
        dirs.append(d)
    probe = await prefetch(str(dirs[0]), settings=settings)
    size = probe.entry.bytes
    tight = Settings.load(host_capacity=2 * size + size // 2)  # room for two
    await prefetch(str(dirs[1]), settings=tight)
    time.sleep(0.01)
    attach(str(dirs[0]), settings=tight).close()  # m0 is now the most recently used
    await prefetch(str(dirs[2]), settings=tight)
    states = {e.uri: e.state for e in await Pool(tight).entries()}
    assert states[f"file://{dirs[0]}/"] == State.WARM
    assert states[f"file://{dirs[1]}/"] == State.EVICTED
    assert states[f"file://{dirs[2]}/"] == State.WARM
    assert len(segments_of(settings)) == 2


async def test_capacity_error_when_nothing_can_be_evicted(tmp_path: Path,
                                                          settings: Settings) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_model(a, shards=1, seed=1)
    write_model(b, shards=1, seed=2)
    size = (await prefetch(str(a), settings=settings)).entry.bytes
    tight = Settings.load(host_capacity=size + size // 2)
    held = attach(str(a), settings=tight)
    try:
        with pytest.raises(CapacityError) as info:
            await prefetch(str(b), settings=tight)
        assert info.value.needed >= size
    finally:
        held.close()
    states = {e.uri: e.state for e in await Pool(tight).entries()}
    assert states[f"file://{b}/"] == State.FAILED
    assert len(segments_of(settings)) == 1


async def test_corrupt_shard_is_refused_and_leaves_nothing(model_dir: Path,
                                                           settings: Settings) -> None:
    shard = sorted(model_dir.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 3])  # truncated: the last tensor runs off the end
    with pytest.raises(SafetensorsError) as info:
        await prefetch(str(model_dir), settings=settings)
    assert shard.name in str(info.value)
    entries = await Pool(settings).entries()
    assert [e.state for e in entries] == [State.FAILED] and shard.name in entries[0].error
    assert segments_of(settings) == []


@pytest.mark.parametrize("loader", ["runai", "native", "pread"])
async def test_file_changed_after_listing_fails_cleanly(model_dir: Path, settings: Settings,
                                                        loader: str) -> None:
    """A shard rewritten with other shapes between metadata and streaming."""
    from warmpool.model import cache as cache_module

    real_fetch = cache_module.MetadataCache.fetch

    async def fetch_then_rewrite(self, uri, store=None):  # type: ignore[no-untyped-def]
        cached = await real_fetch(self, uri, store)
        shard = model_dir / cached.shards[0]
        names = list(load_file(str(shard)))
        save_file({n: torch.zeros(2, 2, dtype=torch.int64) for n in names}, str(shard))
        return cached

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache_module.MetadataCache, "fetch", fetch_then_rewrite)
        with pytest.raises((StreamError, StorageError)):
            await prefetch(str(model_dir), settings=settings, loader=loader)  # type: ignore[arg-type]
    assert segments_of(settings) == []
    assert (await Pool(settings).entries())[0].state == State.FAILED


PREFETCH_THAT_STALLS = """
import asyncio, signal, sys, time
# Ctrl-C as in a terminal: a test run started in the background (CI, nohup) ignores
# SIGINT, and its children inherit that (the fill then finished and published).
signal.signal(signal.SIGINT, signal.default_int_handler)
from warmpool.config import Settings
from warmpool.tiers.prefetch import prefetch

def factory(total):
    held = []
    def on_chunk(n):  # the first piece is held until the test has sent its signal and
        print("streaming", flush=True)  # closed our stdin: the signal always lands while
        if not held:                     # the segment is half full
            held.append(n)
            sys.stdin.read()
    return on_chunk

asyncio.run(prefetch(sys.argv[1], settings=Settings.load(), progress=factory))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
async def test_interrupted_prefetch_leaves_no_segment(model_dir: Path, settings: Settings,
                                                      sig: signal.Signals) -> None:
    proc = subprocess.Popen([sys.executable, "-c", PREFETCH_THAT_STALLS, str(model_dir)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "streaming"
        assert any(".part-" in s for s in segments_of(settings))  # a partial exists now
        proc.send_signal(sig)
        assert proc.stdin is not None
        proc.stdin.close()  # the held piece goes on, the signal already there
        proc.wait(30)
    finally:
        proc.kill()
    if sig == signal.SIGINT:  # cleaned up by the process itself
        assert segments_of(settings) == []
    pool = Pool(settings)
    await pool.reclaim()  # what any next command does first
    assert segments_of(settings) == []
    entry = (await pool.entries())[0]
    assert entry.state == State.FAILED and "interrupted" in (entry.error or "")
    # And the model can still be warmed afterwards.
    assert (await prefetch(str(model_dir), settings=settings)).entry.state == State.WARM


async def test_an_interrupt_after_the_publish_leaves_no_segment(
        model_dir: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C lands after the segment got its final name but before the registry said
    warm (it happened once to the SIGINT case above, in a full run): the published
    segment and its record go with the partial, and the entry says interrupted — never a
    segment that the registry calls failed."""
    from warmpool.pool.registry.files import FileRegistry

    real = FileRegistry.transition

    async def interrupted(self, entry, state, **fields):  # type: ignore[no-untyped-def]
        if state == State.WARM:
            raise asyncio.CancelledError  # what asyncio.run's SIGINT handler delivers
        return await real(self, entry, state, **fields)

    monkeypatch.setattr(FileRegistry, "transition", interrupted)
    with pytest.raises(asyncio.CancelledError):
        await prefetch(str(model_dir), settings=settings)
    monkeypatch.undo()
    assert segments_of(settings) == []
    pool = Pool(settings)
    assert pool.host.residents() == []
    (entry,) = await pool.entries()
    assert entry.state == State.FAILED and entry.error == "interrupted"
    assert (await prefetch(str(model_dir), settings=settings)).entry.state == State.WARM


async def test_a_reclaim_beside_an_evict_in_progress_does_not_call_the_model_lost(
        model_dir: Path, settings: Settings) -> None:
    """An evict holds the entry's lock while it removes the segment and then writes
    ``evicted``. A reclaim in between (a deploy's prefetch starts with one) saw a warm
    entry without its segment and wrote ``lost`` over the evict's outcome; it must leave
    an entry that someone holds alone, and judge the registry as it is now."""
    from warmpool.locks import file_lock

    warm = (await prefetch(str(model_dir), settings=settings)).entry
    pool = Pool(settings)
    with file_lock(pool.host.lock_path(warm.key)):  # the evict, half-way
        pool.host.remove(warm.content_hash)
        await pool.reclaim()
        assert (await pool.registry.get(warm.key)).state == State.WARM  # untouched
        await pool.registry.transition(warm, State.EVICTED)
    await pool.reclaim()
    assert (await pool.registry.get(warm.key)).state == State.EVICTED
    # A segment that really vanished, with nobody at work on it, is still found.
    again = (await prefetch(str(model_dir), settings=settings)).entry
    pool.host.remove(again.content_hash)
    await pool.reclaim()
    assert (await pool.registry.get(again.key)).state == State.LOST


async def test_two_concurrent_prefetches_stream_once(model_dir: Path,
                                                     settings: Settings) -> None:
    a, b = await asyncio.gather(prefetch(str(model_dir), settings=settings),
                                prefetch(str(model_dir), settings=settings))
    assert sorted([a.already_warm, b.already_warm]) == [False, True]
    assert len(segments_of(settings)) == 1


def test_status_and_cli_round_trip(model_dir: Path, settings: Settings) -> None:
    assert run_cli("prefetch", str(model_dir)).returncode == 0
    proc = run_cli("status", "--json")
    assert proc.returncode == 0, proc.stderr
    [entry] = json.loads(proc.stdout)
    for field in ("uri", "content_hash", "state", "device", "bytes", "leases"):
        assert field in entry
    assert entry["state"] == "warm" and entry["leases"] == 0
    assert entry["uri"] == f"file://{model_dir}/"
    attached = run_cli("attach", str(model_dir), "--verify", "--json")
    assert attached.returncode == 0, attached.stderr
    assert json.loads(attached.stdout)["verified"] is True
    assert run_cli("evict", entry["content_hash"][:12]).returncode == 0
    assert json.loads(run_cli("status", "--json").stdout) == []  # live entries only
    [gone] = json.loads(run_cli("status", "--history", "--json").stdout)
    assert gone["state"] == "evicted" and gone["content_hash"] == entry["content_hash"]


def test_bad_uri_is_a_clear_error(settings: Settings) -> None:
    proc = run_cli("prefetch", "ftp://host/model")
    assert proc.returncode == 2 and "unsupported scheme" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = run_cli("prefetch", "/nonexistent/model/dir")
    assert missing.returncode == 1 and "no such directory" in missing.stderr


def test_runtime_dir_is_private(settings: Settings) -> None:
    Pool(settings)
    assert os.stat(settings.runtime_dir).st_mode & 0o777 == 0o700


async def test_prefetch_from_every_backend_is_bit_exact(backend, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                        settings: Settings,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """local and s3/gs through runai-model-streamer, az through our ranged reads."""
    from tests.models import model_files

    # moto reads a whole object per ranged GET: give the streamer's stall timer room.
    monkeypatch.setenv("RUNAI_STREAMER_S3_REQUEST_TIMEOUT_MS", "30000")
    source = tmp_path / "src"
    expected = write_model(source, shards=2, seed=7)
    for key, data in model_files(source).items():
        backend.put(f"models/m/{key}", data)
    uri = backend.uri_for("models/m/")
    # In its own process: runai-model-streamer keeps one object-store backend per process.
    proc = run_cli("prefetch", str(uri), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["state"] == "warm"
    assert report["loader"] == {"file": "pread", "az": "native"}.get(uri.scheme, "runai")
    shutil.rmtree(source)
    with attach(str(uri), settings=settings) as weights:
        assert_bit_exact(weights, expected)


async def test_second_object_store_in_one_process_falls_back_to_native(
        s3_backend, gcs_backend, tmp_path: Path, settings: Settings,  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch) -> None:
    """runai keeps the first object-store backend it opens; a second scheme must not
    be sent to it (it would read s3:// keys through the GCS client and fail)."""
    from tests.models import model_files

    monkeypatch.setenv("RUNAI_STREAMER_S3_REQUEST_TIMEOUT_MS", "30000")
    source = tmp_path / "src"
    expected = write_model(source, shards=2, seed=3)
    uris = []
    for backend in (gcs_backend, s3_backend):
        for key, data in model_files(source).items():
            backend.put(f"m/{key}", data)
        uris.append(str(backend.uri_for("m/")))
    code = textwrap.dedent(f"""
        import asyncio, json
        from warmpool.config import Settings
        from warmpool.tiers.prefetch import prefetch
        async def main():
            for uri in {uris!r}:
                r = await prefetch(uri, settings=Settings.load())
                print(json.dumps([uri, r.loader, r.entry.state.value]))
        asyncio.run(main())
    """)
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    loaders = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(l, s) for _, l, s in loaders] == [("runai", "warm"), ("native", "warm")]
    for uri in uris:
        with attach(uri, settings=settings) as weights:
            assert_bit_exact(weights, expected)


def test_pread_jobs_cover_every_byte_once() -> None:
    """The pread loader's plan: each tensor byte read exactly once, reads within a chunk."""
    from warmpool.loading.pread import plan_jobs
    from warmpool.model.safetensors import parse_header
    from warmpool.pool.layout import plan_layout

    data = __import__("safetensors.torch", fromlist=["save"]).save(
        {f"t{i}": torch.zeros(1000 + 37 * i, dtype=torch.int8) for i in range(50)})
    header = parse_header(data, file="a", file_size=len(data))
    layout = plan_layout("h", [("a.safetensors", header)])
    jobs = plan_jobs(layout, chunk=4096)
    covered = sorted((p.src, p.src + p.nbytes) for j in jobs for p in j.pieces)
    flat = [b for a, z in covered for b in range(a, z)]
    assert len(flat) == len(set(flat)) == sum(s.nbytes for s in layout.slots)
    assert all(j.nbytes <= 4096 for j in jobs)
    for j in jobs:  # each job is one contiguous file range
        at = j.start
        for p in j.pieces:
            assert p.src == at
            at += p.nbytes


async def test_model_of_more_tensors_than_one_read_takes_is_bit_exact(
        tmp_path: Path, settings: Settings) -> None:
    """Thousands of tiny tensors: more buffers than one ``preadv`` accepts (IOV_MAX), and
    the attach path (index, lazy views) over them."""
    from warmpool.loading.pread import IOV_MAX

    directory = tmp_path / "many"
    directory.mkdir()
    count = 2 * IOV_MAX + 5
    save_file({f"layers.{i}.w": torch.arange(i, i + 3, dtype=torch.int16) for i in range(count)},
              str(directory / "model.safetensors"))
    (directory / "config.json").write_text("{}")
    await prefetch(str(directory), settings=settings, loader="pread")
    with attach(str(directory), settings=settings) as weights:
        assert len(weights) == count and next(iter(weights)) == "layers.0.w"
        assert_bit_exact(weights, reference(directory))


async def test_streamer_memory_limit_reaches_the_streamer(model_dir: Path,
                                                           settings: Settings) -> None:
    """memory_limit (the engines' name) bounds runai's staging buffer: a limit below the
    largest tensor is refused by the streamer itself, and nothing is left behind; the
    smallest legal one (0 = the largest tensor only) still streams bit-exactly."""
    from dataclasses import replace

    too_small = replace(settings, streamer=replace(settings.streamer, memory_limit=16))
    with pytest.raises(StreamError):
        await prefetch(str(model_dir), settings=too_small, loader="runai")
    assert segments_of(settings) == []
    tight = replace(settings, streamer=replace(settings.streamer, memory_limit=0))
    await prefetch(str(model_dir), settings=tight, loader="runai")
    with attach(str(model_dir), settings=settings) as weights:
        assert_bit_exact(weights, reference(model_dir))


@pytest.mark.parametrize("piece_bytes", [4096, 1 << 20])
async def test_native_ranged_reads_span_and_split_tensors_bit_exactly(
        model_dir: Path, piece_bytes: int) -> None:
    """Native reads are file ranges that cover several small tensors or part of a large
    one: every byte lands in its slot whatever the piece size."""
    from warmpool.loading.native import stream_native
    from warmpool.model.safetensors import parse_header
    from warmpool.model.uri import parse_uri
    from warmpool.pool.layout import plan_layout
    from warmpool.pool.views import tensor_views
    from warmpool.storage import open_store

    headers = []
    for path in sorted(model_dir.glob("*.safetensors")):
        data = path.read_bytes()
        headers.append((path.name, parse_header(data, file=path.name, file_size=len(data))))
    layout = plan_layout("h", headers)
    target = torch.zeros(layout.total_bytes, dtype=torch.uint8)
    reads: list[int] = []
    async with open_store(parse_uri(str(model_dir))) as store:
        await stream_native(store, layout, target, progress=reads.append,
                            piece_bytes=piece_bytes, concurrency=3)
    assert sum(reads) == sum(s.nbytes for s in layout.slots)
    assert all(n <= piece_bytes for n in reads)
    assert_bit_exact(tensor_views(target, layout), reference(model_dir))
