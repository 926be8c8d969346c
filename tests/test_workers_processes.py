"""A real worker process (``cpu:0``, shm-fd buffers) under the real supervisor: attaches
from other processes with descriptors passed over the socket, the connection as the
lease, the CLI, and supervision (SIGKILL → lost → restarted)."""

from __future__ import annotations

import json
import os
import signal
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.models import write_model
from tests.workers_env import (
    assert_bit_exact,
    poll,
    run_client,
    settings_for,
    supervised_workers,
    write_even_model,
)
from warmpool.attachment import attach
from warmpool.config import Settings
from warmpool.errors import LeaseHeldError, WarmpoolError
from warmpool.pool.registry.base import State
from warmpool.pool.registry.files import FileRegistry
from warmpool.workers.cli import app
from warmpool.workers.client import call, evict_via_workers, prefetch_via_workers, workers_status
from warmpool.workers.discovery import read_records
from warmpool.workers.gpu_attach import attach_gpu


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = settings_for(tmp_path_factory.mktemp("wp"))
    with supervised_workers(settings, "cpu:0"):
        yield settings


def leases_on(settings: Settings, content_hash: str) -> int | None:
    for worker in workers_status(settings):
        for resident in worker.get("residents", []):
            if resident["content_hash"] == content_hash:
                return int(resident["leases"])
    return None


def test_a_separate_process_attaches_bit_exact_and_its_death_ends_its_lease(
        pool: Settings, tmp_path: Path) -> None:
    model = tmp_path / "m"
    write_model(model, shards=3)
    result = prefetch_via_workers(str(model), device="cpu:0", settings=pool)
    assert (result["state"], result["transport"], result["already_warm"]) == (
        "warm", "shm-fd", False)
    holder = run_client(textwrap.dedent(f"""
        import time
        from pathlib import Path
        from tests.workers_env import assert_bit_exact, reference
        from warmpool.config import Settings
        from warmpool.workers.gpu_attach import attach_gpu
        attached = attach_gpu({str(model)!r}, "cpu:0", Settings.load(), holder="test holder")
        assert_bit_exact(attached.tensors, reference(Path({str(model)!r})))
        print("verified", len(attached.tensors), attached.transport, flush=True)
        time.sleep(120)
        """), pool.runtime_dir)
    try:
        line = holder.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("verified"), line + holder.stderr.read()  # type: ignore[union-attr]
        assert line.split()[2] == "shm-fd"
        content_hash = str(result["content_hash"])
        assert leases_on(pool, content_hash) == 1
        with pytest.raises(LeaseHeldError):
            evict_via_workers(str(model), device="cpu:0", settings=pool, grace_s=0.2)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        poll(lambda: leases_on(pool, content_hash) == 0, timeout=10,
                 what="the dead holder's lease to end")
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait()
    entry = evict_via_workers(str(model), device="cpu:0", settings=pool)
    assert entry["state"] == "evicted"


def test_the_registry_records_device_transport_and_last_attach(pool: Settings,
                                                               tmp_path: Path) -> None:
    model = tmp_path / "m"
    expected = write_model(model, seed=3)
    result = prefetch_via_workers(str(model), device="cpu:0", settings=pool)
    with attach_gpu(str(result["content_hash"])[:12], "cpu:0", pool) as attached:
        assert attached.device == "cpu:0" and attached.uri == result["uri"]
        assert_bit_exact(attached.tensors, expected)
    assert prefetch_via_workers(str(model), device="cpu:0", settings=pool)["already_warm"]
    # The public entry point routes any device but "cpu" to the worker tier.
    with attach(str(model), device="cpu:0", settings=pool) as model_view:
        assert model_view.transport == "shm-fd"
        assert_bit_exact(model_view, expected)
    entry = FileRegistry(pool.runtime_dir).get_sync(f"{result['content_hash']}@cpu:0")
    assert entry is not None
    assert (entry.state, entry.transport, entry.loader) == (State.WARM, "shm-fd", "pread")
    assert entry.last_attached_at is not None
    assert [s for s, _ in entry.history] == ["pending", "streaming", "warm"]


def test_workers_cli_status_reports_the_worker(pool: Settings) -> None:
    result = CliRunner().invoke(app, ["status", "--json", "--runtime-dir",
                                      str(pool.runtime_dir)])
    assert result.exit_code == 0, result.output
    (worker,) = json.loads(result.output)
    assert worker["ok"] and worker["device"] == "cpu:0" and worker["uuid"] == "cpu:0"


def test_a_killed_worker_is_marked_lost_and_restarted(pool: Settings, tmp_path: Path) -> None:
    model = tmp_path / "m"
    expected = write_model(model, seed=5)
    registry = FileRegistry(pool.runtime_dir)
    result = prefetch_via_workers(str(model), device="cpu:0", settings=pool)
    key = f"{result['content_hash']}@cpu:0"
    held = attach_gpu(str(model), "cpu:0", pool)
    (old,) = read_records(pool.runtime_dir)

    os.kill(old.pid, signal.SIGKILL)

    lost = poll(lambda: (e := registry.get_sync(key)) is not None
                    and e.state == State.LOST and e, timeout=15, what="entry marked lost")
    assert "SIGKILL" in (lost.error or "")
    new = poll(lambda: [r for r in read_records(pool.runtime_dir) if r.pid != old.pid],
                   timeout=30, what="a restarted worker")[0]
    assert call(new, {"op": "ping"})["pid"] == new.pid
    # The serving process noticed, and its weights did not go with the worker.
    assert held.worker_gone.wait(5)
    assert_bit_exact(held.tensors, expected)
    held.close()
    again = prefetch_via_workers(str(model), device="cpu:0", settings=pool)
    assert not again["already_warm"]
    assert registry.get_sync(key).state == State.WARM  # type: ignore[union-attr]


def test_a_worker_killed_mid_stream_fails_the_load_and_leaves_nothing_streaming(
        pool: Settings, tmp_path: Path) -> None:
    """SIGKILL while the worker fills a 1 GiB buffer: the caller gets a clear error at
    once, the entry is `lost` (not stuck `streaming`), the restarted worker loads it."""
    model = tmp_path / "big"
    expected = write_even_model(model, files=4, per_file=16, tensor_bytes=16 << 20, seed=9)
    registry = FileRegistry(pool.runtime_dir)
    (worker,) = read_records(pool.runtime_dir)
    with ThreadPoolExecutor(1) as background:
        load = background.submit(prefetch_via_workers, str(model), device="cpu:0",
                                 settings=pool)
        streaming = poll(lambda: next((e for e in registry.list_sync()
                                           if e.uri.endswith("/big/") and
                                           e.state == State.STREAMING), None),
                             timeout=60, interval=0.002, what="the load to start streaming")
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(WarmpoolError) as failed:
            load.result(timeout=30)
    assert "worker" in str(failed.value).lower(), failed.value
    entry = poll(lambda: (e := registry.get_sync(streaming.key)) is not None
                     and e.state != State.STREAMING and e, timeout=15,
                     what="the entry to leave `streaming`")
    assert entry.state == State.LOST and "SIGKILL" in (entry.error or "")
    poll(lambda: [r for r in read_records(pool.runtime_dir) if r.pid != worker.pid],
             timeout=30, what="a restarted worker")
    result = prefetch_via_workers(str(model), device="cpu:0", settings=pool)
    assert not result["already_warm"]
    with attach_gpu(str(model), "cpu:0", pool) as attached:
        assert_bit_exact(attached.tensors, expected)
    evict_via_workers(str(model), device="cpu:0", settings=pool)
