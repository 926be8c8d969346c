"""``warmpool export`` and ``warmpool status`` for engine layouts, without an engine: the
one-line refusals, and the engine column. The export itself runs in tests/test_vllm_export.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.models import write_model
from warmpool.config import Settings
from warmpool.engine_layouts import export_sync
from warmpool.errors import ConfigError, ExportError
from warmpool.integrations.vllm_export import ExportOptions, _warm_first
from warmpool.model.uri import parse_uri
from warmpool.operations import metadata
from warmpool.pool.engine_key import EngineKey
from warmpool.pool.host import HostTier

KEY = EngineKey(checkpoint="cd" * 32, engine="vllm", engine_version="0.32.0",
                dtype="bfloat16", tp_size=2, rank=1)
URI = "file:///models/tiny/"


def warmpool(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m warmpool``: the module form must work too (vLLM's spawned processes
    re-import the main module, so export needs a main guard either way)."""
    return subprocess.run([sys.executable, "-m", "warmpool", *args], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))


def test_export_without_vllm_says_where_to_run_it(settings: Settings) -> None:
    done = warmpool("export", "s3://bucket/models/m/", "--tp", "2")
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert "vLLM cannot be imported by" in line and "install vllm in that environment" in line


def test_export_refuses_an_engine_it_cannot_export(settings: Settings) -> None:
    done = warmpool("export", "s3://bucket/models/m/", "--engine", "sglang")
    assert done.returncode == 2
    assert "engine 'sglang' cannot export yet; choose one of vllm" in done.stderr
    assert "Traceback" not in done.stderr


def test_status_shows_an_engine_layouts_key_in_its_own_column(settings: Settings) -> None:
    export_sync(KEY, [("w", torch.arange(6, dtype=torch.float32))], checkpoint_uri=URI,
                settings=settings)
    table = warmpool("status")
    assert table.returncode == 0, table.stderr
    header = next(line for line in table.stdout.splitlines() if "state" in line)
    assert header.split("┃")[7].strip() == "engine"
    row = next(line for line in table.stdout.splitlines() if "warm" in line)
    cells = [c.strip() for c in row.split("│")]
    assert cells[7] == KEY.label() and cells[8] == URI, row
    [entry] = json.loads(warmpool("status", "--json").stdout)
    assert entry["engine"] == KEY.to_json()


def test_a_cold_checkpoint_is_warmed_first_or_refused_with_on_cold_fail(
        settings: Settings, tmp_path: Path) -> None:
    """The controller runs the export with ``--on-cold fail``: a checkpoint evicted since
    it was warmed must fail the export (the controller warms it again as asked), never go
    back to the controller as a plain deploy that replaces the request."""
    write_model(tmp_path / "m", shards=1)
    uri = str(parse_uri(str(tmp_path / "m")))
    cached = metadata(uri, settings=settings)
    host = HostTier(settings.runtime_dir)
    with pytest.raises(ExportError, match="not warm on the host tier"):
        _warm_first(uri, cached.content_hash, settings, "fail")
    assert host.resident(cached.content_hash) is None
    _warm_first(uri, cached.content_hash, settings, "warm")
    assert host.resident(cached.content_hash) is not None
    _warm_first(uri, cached.content_hash, settings, "fail")  # warm now: nothing to refuse
    with pytest.raises(ConfigError, match="--on-cold 'later'"):
        ExportOptions(on_cold="later")


def test_the_export_report_is_found_among_the_engines_logs() -> None:
    """The controller and the tests read ``warmpool export --json`` with one parser: the
    report ends stdout after the engine's own log lines, and stderr may follow it."""
    import json as json_

    from warmpool.integrations.vllm_export import parse_report

    report = {"uri": "s3://b/m/", "layouts": [{"label": "vllm tp2 r0", "key": {"tp": 2}}]}
    text = json_.dumps(report, indent=1)
    logs = "INFO 12-06 loading {weights}\n{not json\n"
    assert parse_report(text) == report
    assert parse_report(logs + text + "\n") == report
    assert parse_report(logs + text + "\nWARNING stderr after it: }\n") == report
    for bad in ("", "INFO only logs\n", logs + "{\n \"uri\": 1"):
        with pytest.raises(ValueError):
            parse_report(bad)
