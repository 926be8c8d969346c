"""vLLM's zero-copy start from an engine-layout entry, in vLLM's own virtualenv.

One engine loads through the pool with ``{"export": true}`` and writes each rank's
processed parameters into the pool; a fresh engine with the same key attaches them and
must give the same greedy tokens as vLLM's own load of the files. A changed key (another
dtype, another tensor-parallel size) must miss, say so, and still serve through the copy
path. See tests/test_vllm.py for how vLLM runs here.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

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
from warmpool.pool.engine_key import EngineKey
from warmpool.pool.host import HostTier

VIEWS = re.compile(r"\(warmpool, engine layout (\S+), rank (\d)\); (\d+) of (\d+) parameters "
                   r"\((\d+) of (\d+) bytes\) are views of the pool")


@pytest.fixture(scope="module")
def served_one(moto_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One tiny Llama in S3, warm on the host tier, and its metadata-cache directory."""
    python = vllm_python()
    root = tmp_path_factory.mktemp("vllm_zero_copy")
    env = vllm_env(moto_server, root)
    local = root / "a"
    run([str(python), str(VLLM_CHILD), "make-models", json.dumps([{"out": str(local), "seed": 1}])],
         env, 300)
    backend = S3Backend(moto_server)
    upload(backend, local, "models/a/")
    uri = str(backend.uri_for("models/a/"))
    cli = [sys.executable, "-m", "warmpool.cli"]
    run([*cli, "prefetch", uri], env, 300)
    files_dir = run([*cli, "metadata", uri, "--files-dir"], env, 120).strip()
    yield Served(env, {"a": uri}, {"a": files_dir}, {"a": local})
    HostTier(root / "runtime").remove_all()


@pytest.mark.timeout(2400)
def test_vllm_attaches_its_exported_layout_and_serves_the_same_tokens(
        served_one: Served) -> None:
    """TP=2 throughout (bf16 sums in another order would give other tokens at TP=1)."""
    tp2 = {"tensor_parallel_size": 2}
    pool = {"model": served_one.files_dirs["a"], "load_format": "warmpool"}
    results, output = vllm_engines(served_one, [
        {"name": "files", "llm": {"model": str(served_one.local["a"]), **tp2}},
        {"name": "export", "llm": {**pool, **tp2, "model_loader_extra_config": {"export": True}}},
        {"name": "attach", "llm": {**pool, **tp2}},
        {"name": "float16", "llm": {**pool, **tp2, "dtype": "float16"}},
        {"name": "tp1", "llm": {**pool}},
    ], timeout=2300)
    expected = results["files"]["tokens"]
    assert len({tuple(t) for t in expected}) > 1, "prompts must give different tokens"
    assert results["export"] == {"tokens": expected}
    assert results["attach"] == {"tokens": expected}, output[-6000:]

    # Each rank wrote its own entry, keyed by this engine's configuration.
    runtime = Path(served_one.env["WARMPOOL_RUNTIME_DIR"])
    keys = sorted((EngineKey.from_json(r.engine) for r in HostTier(runtime).residents()
                   if r.engine), key=lambda k: k.rank)
    assert [(k.engine, k.dtype, k.tp_size, k.rank) for k in keys] == [
        ("vllm", "bfloat16", 2, 0), ("vllm", "bfloat16", 2, 1)]
    exported = log_lines(output, r"engine layout vllm-\S+ of .* exported to the pool")
    assert len(exported) == 2, output[-6000:]

    # The attaching engine took both ranks from the entries, zero-copy where vLLM lets it.
    attached = [VIEWS.search(line) for line in output.splitlines()]
    found = {m.group(2): m for m in attached if m}
    assert set(found) == {"0", "1"}, output[-6000:]
    for match in found.values():
        views, params = int(match.group(3)), int(match.group(4))
        assert 0 < views <= params
        print(f"rank {match.group(2)}: {match.group(0)}")

    # Another dtype or TP size: a miss that names the difference, then the copy path.
    assert "tokens" in results["float16"] and "tokens" in results["tp1"], results
    assert log_lines(output, r"no engine layout for vllm-\S+,float16,.*tp=2.*"
                       r"dtype 'float16' != 'bfloat16'")
    assert log_lines(output, r"no engine layout for vllm-\S+,bfloat16,.*tp=1,rank=0.*"
                       r"tp_size 1 != 2")
    assert log_lines(output, r"Loading weights took .* \(warmpool, host tier, rank 0\)")
