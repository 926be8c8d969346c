"""Groups of two ``cpu:N`` workers: a replicated group (gloo) in which runai's
distributed mode splits the reads and every rank ends with every tensor, and the sharded
layout in which each rank holds only its own files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.models import write_model
from tests.workers_env import (
    assert_bit_exact,
    direct_workers,
    settings_for,
    write_even_model,
    write_sharded_model,
)
from warmpool.config import Settings
from warmpool.errors import CapacityError, ConfigError
from warmpool.pool.registry.base import State
from warmpool.pool.registry.files import FileRegistry
from warmpool.workers.client import prefetch_via_workers, workers_status
from warmpool.workers.gpu_attach import attach_gpu

MiB = 1 << 20


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = settings_for(tmp_path_factory.mktemp("tp"))
    with direct_workers(settings, ["cpu:0", "cpu:1"], capacity="4MiB"):
        yield settings


def test_each_rank_reads_about_half_and_both_end_bit_exact(group: Settings,
                                                           tmp_path: Path) -> None:
    model = tmp_path / "m"
    expected = write_even_model(model, files=2, per_file=8, tensor_bytes=64 << 10)
    total = sum(t.numel() * t.element_size() for t in expected.values())

    result = prefetch_via_workers(str(model), device="cpu:0", tp=2, settings=group)

    assert result["loader"] == "runai-distributed" and result["devices"] == ["cpu:0", "cpu:1"]
    reads = [int(rank["read_bytes"]) for rank in result["ranks"]]
    # Each rank asked storage for about half the tensor bytes (plus its own header reads);
    # together they read every byte once, not twice.
    for read in reads:
        assert 0.4 * total <= read <= 0.6 * total + (64 << 10), reads
    assert total <= sum(reads) <= total + 2 * (64 << 10), reads
    for device in ("cpu:0", "cpu:1"):
        with attach_gpu(str(model), device, group) as attached:
            assert_bit_exact(attached.tensors, expected)
    again = prefetch_via_workers(str(model), device="cpu:0", tp=2, settings=group)
    assert again["already_warm"]


def test_a_worker_joins_one_group_after_another(group: Settings, tmp_path: Path) -> None:
    """Each load forms and tears down its own group: the next one forms again."""
    for seed in (11, 12):
        model = tmp_path / f"m{seed}"
        expected = write_even_model(model, files=2, per_file=4, tensor_bytes=16 << 10,
                                    seed=seed)
        result = prefetch_via_workers(str(model), device="cpu:0", tp=2, settings=group)
        assert result["loader"] == "runai-distributed"
        with attach_gpu(str(model), "cpu:1", group) as attached:
            assert_bit_exact(attached.tensors, expected)


def test_a_group_refused_for_lack_of_room_leaves_no_rank_half_loaded(group: Settings,
                                                                     tmp_path: Path) -> None:
    model = tmp_path / "big"
    write_even_model(model, files=2, per_file=8, tensor_bytes=512 << 10)  # 8 MiB > 4 MiB
    with pytest.raises(CapacityError, match="rank") as caught:
        prefetch_via_workers(str(model), device="cpu:0", tp=2, settings=group)
    assert caught.value.needed >= 8 * MiB
    for worker in workers_status(group):
        assert all(r["bytes"] < 8 * MiB for r in worker["residents"])
    states = {e.device: e.state for e in FileRegistry(group.runtime_dir).list_sync()
              if e.bytes >= 8 * MiB or e.uri.endswith("/big/")}
    assert states == {"cpu:0": State.FAILED, "cpu:1": State.FAILED}


def test_sharded_layout_gives_each_rank_only_its_own_files(group: Settings,
                                                           tmp_path: Path) -> None:
    model = tmp_path / "sharded"
    per_rank = write_sharded_model(model, ranks=2, parts=2)
    result = prefetch_via_workers(str(model), device="cpu:0", tp=2, sharding="sharded",
                                  settings=group)
    assert result["devices"] == ["cpu:0", "cpu:1"] and result["sharding"] == "sharded"
    for rank, expected in enumerate(per_rank):
        with attach_gpu(str(model), f"cpu:{rank}", group) as attached:
            assert attached.layout.files == [f"model-rank-{rank}-part-{p}.safetensors"
                                             for p in range(2)]
            assert_bit_exact(attached.tensors, expected)


def test_sharded_layout_refuses_a_group_of_the_wrong_size(group: Settings,
                                                          tmp_path: Path) -> None:
    model = tmp_path / "sharded"
    write_sharded_model(model, ranks=2)
    with pytest.raises(ConfigError, match="sharded for ranks"):
        prefetch_via_workers(str(model), device="cpu:0", tp=1, sharding="sharded",
                             settings=group)


def test_each_device_has_its_own_worker_and_its_own_entry(group: Settings,
                                                          tmp_path: Path) -> None:
    model = tmp_path / "m"
    expected = write_model(model, seed=3)
    for device in ("cpu:0", "cpu:1"):
        prefetch_via_workers(str(model), device=device, settings=group)
        with attach_gpu(str(model), device, group) as attached:
            assert attached.device == device
            assert_bit_exact(attached.tensors, expected)
    content_hash = attached.content_hash
    entries = {e.device: e.state for e in FileRegistry(group.runtime_dir).list_sync()
               if e.content_hash == content_hash}
    assert entries == {"cpu:0": State.WARM, "cpu:1": State.WARM}
