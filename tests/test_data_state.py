"""Data and state under hostile input and faults: many tensors, full shared memory,
one policy for eviction and for old versions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.pool_env import segments_of
from warmpool.config import Settings
from warmpool.pool.attachment import attach
from warmpool.pool.prefetch import prefetch
from warmpool.pool.registry.base import State


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
