"""A checkpoint is untrusted input: its config may name code of its own, claim layers it
does not have, or hold values transformers chokes on. None of it runs code, and each is
one clear warmpool error naming the file."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from tests.pool_env import run_cli, run_python
from tests.tiny_llama import write_tiny_llama
from warmpool.config import Settings
from warmpool.errors import CheckpointMismatchError, UntrustedCodeError
from warmpool.integrations.transformers import load_model
from warmpool.model.cache import default_cache
from warmpool.model.uri import parse_uri

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import LlamaConfig
class EvilConfig(LlamaConfig):
    model_type = "evil"
"""


def hostile_model(root: Path, marker: Path, **config_changes: object) -> Path:
    model = root / "model"
    write_tiny_llama(model, seed=1234)
    config = json.loads((model / "config.json").read_text())
    config.update(config_changes)
    (model / "config.json").write_text(json.dumps(config))
    (model / "evil.py").write_text(EVIL.format(marker=str(marker)))
    done = run_cli("prefetch", str(model))
    assert done.returncode == 0, done.stderr
    return model


def test_code_from_the_bucket_is_neither_cached_nor_run(settings: Settings,
                                                        tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    model = hostile_model(tmp_path, marker, auto_map={"AutoConfig": "evil.EvilConfig"})
    cache = default_cache(settings)
    cached = cache.load(asyncio.run(cache.inspect(parse_uri(str(model)))).content_hash)
    assert cached is not None
    assert "evil.py" in cached.skipped and not (cached.files_dir / "evil.py").exists()
    with pytest.raises(UntrustedCodeError, match="auto_map.*trust_remote_code=True"):
        load_model(str(model), settings=settings)
    # Opting in by the caller alone is not enough: the node never cached the code.
    with pytest.raises(CheckpointMismatchError):
        load_model(str(model), settings=settings, trust_remote_code=True)
    assert not marker.exists()
    # Under a terminal, transformers asked "run the custom code? [y/N]"; now no prompt.
    code = ("import sys\nfrom warmpool.integrations.transformers import load_model\n"
            "try:\n    load_model(sys.argv[1])\nexcept Exception as e:\n"
            "    print(type(e).__name__)\n")
    out = run_python(code, argv=[str(model)])
    assert out.stdout.strip() == "UntrustedCodeError", out.stderr
    assert not marker.exists()


def test_a_config_claiming_20000_layers_is_refused_before_building(settings: Settings,
                                                                   tmp_path: Path) -> None:
    model = hostile_model(tmp_path, tmp_path / "ran", num_hidden_layers=20_000)
    t0 = time.monotonic()
    with pytest.raises(CheckpointMismatchError, match="num_hidden_layers=20000, the "
                                                      "checkpoint holds 2 layers"):
        load_model(str(model), settings=settings)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("changes", [
    {"hidden_size": "sixty-four"},
    {"num_attention_heads": 0},
    {"rope_scaling": {"rope_type": "no-such-type", "factor": "x"}},
    {"num_hidden_layers": "2"},
], ids=["str-size", "zero-heads", "bad-rope", "str-layers"])
def test_a_config_transformers_chokes_on_is_a_checkpoint_error(
        settings: Settings, tmp_path: Path, changes: dict[str, object]) -> None:
    model = hostile_model(tmp_path, tmp_path / "ran", **changes)
    with pytest.raises(CheckpointMismatchError, match="config.json"):
        load_model(str(model), settings=settings)
