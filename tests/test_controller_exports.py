"""A deploy that asks for an engine layout: the controller runs the configured engine
Python's ``warmpool export`` once the checkpoint is warm, and refuses clearly (recorded,
listed by ``warmpool status``) when none is configured or the export fails. Real Redis,
real controllers, real child processes; the run with vLLM itself is in
tests/test_vllm_export.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tests.controller_harness import FAST, Harness, ask, wait_until
from tests.models import write_model
from warmpool.config import Settings
from warmpool.contract.requests import EngineLayoutWant
from warmpool.errors import ConfigError
from warmpool.model.uri import parse_uri

LAYOUT = {"engine": "vllm", "tp": 1, "dtype": "bfloat16"}


def status_json(url: str, node: str) -> list[dict[str, object]]:
    done = subprocess.run([sys.executable, "-m", "warmpool", "status", "--json", "--redis", url],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "WARMPOOL_NODE": node})
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


async def test_an_engine_layout_without_an_engine_python_is_refused_and_listed(
        harness: Harness, tmp_path: Path) -> None:
    """The checkpoint is warmed; the layout is refused with what to configure, given up
    at once (no retry can help until a restart with the setting), kept desired with its
    ask, and ``warmpool status`` shows why."""
    model = tmp_path / "m"
    write_model(model, shards=1, seed=5)
    uri = parse_uri(str(model))
    ctl = await harness.start(export_vllm_python=None)
    await harness.xadd(ask("deploy", uri, engine_layout=LAYOUT, request_id="e1"))
    reply = await harness.reply("e1")
    assert reply["state"] == "failed", reply
    assert "no vllm Python configured" in reply["error"]
    assert "WARMPOOL_EXPORT_VLLM_PYTHON" in reply["error"]
    assert reply["content_hash"] and (await harness.wait_entry(uri)).state.value == "warm"

    failing = await ctl.failures.get(str(uri), "cpu")
    assert failing is not None and failing.given_up and failing.failures == 1
    assert "no vllm Python configured" in failing.error
    wanted = await ctl.desired.get(str(uri), "cpu")
    assert wanted is not None and wanted.engine_layout == EngineLayoutWant("vllm", "bfloat16", 1)
    assert await ctl.converge() == 0  # given up: no pass tries it again

    listed = [x for x in status_json(harness.server.url, ctl.node) if x["state"] == "failed"]
    assert [x["uri"] for x in listed] == [str(uri)]
    assert "no vllm Python configured" in str(listed[0]["error"])


async def test_a_failing_export_is_retried_with_backoff_then_given_up(
        harness: Harness, tmp_path: Path) -> None:
    """The configured Python runs ``-m warmpool export`` for real; this one has no vLLM,
    so each run fails with the child's own reason, and the failure machinery retries it
    (the checkpoint stays warm) until it gives up."""
    pytest.importorskip("warmpool")
    model = tmp_path / "m"
    write_model(model, shards=1, seed=6)
    uri = parse_uri(str(model))
    options = replace(FAST, failure_backoff_s=0.1, failure_backoff_cap_s=0.2, give_up_after=2,
                      recheck_s=0.2)
    ctl = await harness.start(options=options, export_vllm_python=Path(sys.executable))
    await harness.xadd(ask("pin", uri, engine_layout=LAYOUT, request_id="e2"))
    reply = await harness.reply("e2")
    assert reply["state"] == "failed" and reply["pinned"] is True, reply
    assert "vllm export of" in reply["error"] and "vLLM cannot be imported" in reply["error"]

    async def given_up() -> bool:
        record = await ctl.failures.get(str(uri), "cpu")
        return record is not None and record.given_up

    await wait_until(given_up, "the export to be given up")
    record = await ctl.failures.get(str(uri), "cpu")
    assert record is not None and record.failures == 2 and "install vllm" in record.error
    assert (await harness.wait_entry(uri)).pinned  # the checkpoint itself stayed warm


def test_the_engine_python_is_a_setting(tmp_path: Path, settings: Settings,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "warmpool.toml"
    config.write_text('[export]\nvllm_python = "/opt/vllm/bin/python"\ntimeout_s = 60\n')
    loaded = Settings.load(config)
    assert loaded.export_vllm_python == Path("/opt/vllm/bin/python")
    assert loaded.export_timeout_s == 60.0
    monkeypatch.setenv("WARMPOOL_EXPORT_VLLM_PYTHON", "/env/bin/python")
    assert Settings.load(config).export_vllm_python == Path("/env/bin/python")
    config.write_text('[export]\ntimeout_s = -1\n')
    with pytest.raises(ConfigError, match="export_timeout_s"):
        Settings.load(config)
    config.write_text('[export]\npython = "/bin/sh"\n')
    with pytest.raises(ConfigError, match="export_python"):
        Settings.load(config)
