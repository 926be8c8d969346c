"""``warmpool export`` with vLLM, in vLLM's own virtualenv: the explicit export step, then
a fresh engine that attaches what it wrote; and a controller that runs it for a deploy
asking for an engine layout. See tests/test_vllm.py for how vLLM runs here."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.controller_harness import KEYS, Harness, ask, wait_until
from tests.engine_harness import (
    VLLM_CHILD,
    Served,
    log_lines,
    run,
    upload,
    vllm_engines,
    vllm_env,
    vllm_python,
)
from tests.servers import S3Backend, Server
from tests.test_vllm_zero_copy import VIEWS
from warmpool.integrations.vllm_export import parse_report
from warmpool.model.uri import parse_uri
from warmpool.pool.engine_key import EngineKey
from warmpool.pool.host import HostTier


@pytest.fixture(scope="module")
def cold_one(moto_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One tiny Llama in S3, not warm anywhere: the export must warm it first."""
    python = vllm_python()
    root = tmp_path_factory.mktemp("vllm_export")
    env = vllm_env(moto_server, root)
    local = root / "a"
    run([str(python), str(VLLM_CHILD), "make-models", json.dumps([{"out": str(local), "seed": 1}])],
         env, 300)
    backend = S3Backend(moto_server)
    upload(backend, local, "models/a/")
    uri = str(backend.uri_for("models/a/"))
    yield Served(env, {"a": uri}, {}, {"a": local})
    HostTier(root / "runtime").remove_all()


@pytest.mark.timeout(2400)
def test_export_step_then_a_fresh_engine_attaches_and_serves_the_same_tokens(
        cold_one: Served) -> None:
    """``python -m warmpool export URI --tp 2`` (the vLLM venv's Python) warms the cold
    checkpoint, writes one layout per rank and reports them; a fresh engine of the same
    key then starts from them (no export, views of the pool) with vLLM's own tokens."""
    uri = cold_one.uris["a"]
    output = run([str(vllm_python()), "-m", "warmpool", "export", uri, "--engine", "vllm",
                   "--tp", "2", "--dtype", "bfloat16", "--max-model-len", "128", "--json"],
                  cold_one.env, 1200)
    report = parse_report(output)
    runtime = HostTier(Path(cold_one.env["WARMPOOL_RUNTIME_DIR"]))
    assert report["uri"] == uri and runtime.resident(report["checkpoint"]) is not None
    keys = [EngineKey.from_json(x["key"]) for x in report["layouts"]]
    assert [(k.engine, k.dtype, k.tp_size, k.rank, k.checkpoint) for k in keys] == [
        ("vllm", "bfloat16", 2, r, report["checkpoint"]) for r in (0, 1)]
    for layout, key in zip(report["layouts"], keys, strict=True):
        resident = runtime.resident(key.content_hash)
        assert resident is not None and resident.engine == key.to_json()
        assert layout["content_hash"] == key.content_hash and layout["label"] == key.label()
        assert layout["bytes"] == resident.layout.total_bytes > 0

    files_dir = run([str(vllm_python()), "-m", "warmpool", "metadata", uri, "--files-dir"],
                     cold_one.env, 120).strip().splitlines()[-1]
    tp2 = {"tensor_parallel_size": 2}
    results, started = vllm_engines(replace(cold_one, files_dirs={"a": files_dir}), [
        {"name": "files", "llm": {"model": str(cold_one.local["a"]), **tp2}},
        {"name": "attach", "llm": {"model": files_dir, "load_format": "warmpool", **tp2}},
    ], timeout=1200)
    expected = results["files"]["tokens"]
    assert len({tuple(t) for t in expected}) > 1, "prompts must give different tokens"
    assert results["attach"] == {"tokens": expected}, started[-6000:]
    found = {m.group(2) for m in map(VIEWS.search, started.splitlines()) if m}
    assert found == {"0", "1"}, started[-6000:]
    assert not log_lines(started, "exported to the pool")


@pytest.mark.timeout(1800)
async def test_a_controller_exports_the_layout_a_deploy_asks_for(
        harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """With the vLLM venv's Python configured, a deploy with ``engine_layout`` ends with
    the checkpoint and the engine layout of its key warm, both in the registry."""
    caplog.set_level(logging.INFO, logger="warmpool.controller.routing")
    python = vllm_python()
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    model = tmp_path / "m"
    run([str(python), str(VLLM_CHILD), "make-models", json.dumps([{"out": str(model), "seed": 2}])],
         dict(os.environ), 300)
    uri = parse_uri(str(model))
    ctl = await harness.start(export_vllm_python=python, export_timeout_s=1200.0)
    await harness.xadd(ask("deploy", uri, request_id="x1", engine_layout={
        "engine": "vllm", "dtype": "bfloat16", "tp": 1, "max_model_len": 128,
        "compile": False}))  # the one compile of the suite is tests/test_vllm_compile.py
    reply = await _reply(harness, "x1", 1300)
    assert reply["state"] == "warm", reply

    async def layouts() -> list[Any]:
        return [e for e in await harness.entries() if e.engine is not None]

    [entry] = await wait_until(layouts, "the engine layout in the registry", 60)
    key = EngineKey.from_json(entry.engine)
    assert (key.engine, key.dtype, key.tp_size, key.rank) == ("vllm", "bfloat16", 1, 0)
    assert key.checkpoint == reply["content_hash"] and entry.state.value == "warm"
    assert re.search(r"#vllm-", entry.uri) and entry.node == ctl.node
    # Asked again, the layout is already warm: no second engine start.
    await harness.xadd(ask("deploy", uri, request_id="x2", engine_layout={
        "engine": "vllm", "dtype": "bfloat16", "tp": 1, "compile": False}))
    assert (await _reply(harness, "x2", 60))["state"] == "warm"
    done = [r.getMessage() for r in caplog.records if "engine layout(s)" in r.getMessage()]
    assert len(done) == 2 and "exported in" in done[0] and "already warm" in done[1], done


async def _reply(harness: Harness, request_id: str, timeout: float) -> dict[str, Any]:
    """The reply, polled: a BLPOP longer than the client's socket timeout would fail."""
    async def popped() -> Any:
        return await harness.redis.lpop(KEYS.reply(request_id))

    return dict(json.loads(await wait_until(popped, f"the reply to {request_id}", timeout)))

