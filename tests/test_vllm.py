"""vLLM serves from the pool: ``load_format="warmpool"`` against vLLM's own load.

vLLM runs in its own virtualenv (``.venv-vllm``, built by ``make vllm-venv``; ``make test``
builds it), in subprocesses, since its torch and transformers pins are not ours. A missing
venv fails these tests: they are how CI knows the plugin works. Each ``LLM()`` start-up
costs tens of seconds here, so one process starts several engines in a row.

The models come from the moto S3 server and vLLM is pointed at the metadata cache's files
directory, which holds no weight files: a load that fell back to reading files from the
directory could not pass.
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
from warmpool.pool.host import HostTier

RENAMED = "model.layers.1.mlp.up_proj.weight=model.layers.1.mlp.upp_proj.weight"


@pytest.fixture(scope="module")
def served(moto_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Four models in S3: ``a`` and ``bad_names`` warm on the host tier, ``b`` (other
    weights) warm, ``cold`` (a's weights plus a README, so another content) only in the
    metadata cache."""
    python = vllm_python()
    root = tmp_path_factory.mktemp("vllm")
    env = vllm_env(moto_server, root)
    local = {"a": root / "a", "b": root / "b", "bad_names": root / "bad_names"}
    run([str(python), str(VLLM_CHILD), "make-models", json.dumps([
        {"out": str(local["a"]), "seed": 1}, {"out": str(local["b"]), "seed": 2},
        {"out": str(local["bad_names"]), "seed": 1, "rename": RENAMED}])], env, 300)
    backend = S3Backend(moto_server)
    for name, path in local.items():
        upload(backend, path, f"models/{name}/")
    upload(backend, local["a"], "models/cold/")
    backend.put("models/cold/README.md", b"the same weights as a, another content hash\n")
    uris = {name: str(backend.uri_for(f"models/{name}/")) for name in (*local, "cold")}
    cli = [sys.executable, "-m", "warmpool.cli"]
    files_dirs = {}
    for name, uri in uris.items():
        if name != "cold":
            run([*cli, "prefetch", uri], env, 300)
        files_dirs[name] = run([*cli, "metadata", uri, "--files-dir"], env, 120).strip()
    yield Served(env, uris, files_dirs, local)
    HostTier(root / "runtime").remove_all()


@pytest.mark.timeout(1500)
def test_vllm_serves_from_the_pool_like_from_the_files(served: Served) -> None:
    """Greedy tokens through load_format="warmpool" with TP=2 (each rank takes its slice
    of the attached checkpoint) are vLLM's own from the files: with the URI found from the
    cache, and with it named, for a cold model, which on_cold="fail" refuses and the
    default warms (and says so)."""
    for name in ("a", "cold"):
        assert not list(Path(served.files_dirs[name]).glob("*.safetensors")), \
            "vLLM's directory must hold no weights, or a fallback to the files could pass"
    # Every engine runs TP=2: bf16 sums in another order give other tokens at TP=1.
    tp2 = {"tensor_parallel_size": 2}
    cold = {"model": served.files_dirs["cold"], "load_format": "warmpool"}
    results, output = vllm_engines(served, [
        {"name": "files", "llm": {"model": str(served.local["a"]), **tp2}},
        {"name": "pool_tp2", "llm": {"model": served.files_dirs["a"], "load_format": "warmpool",
                                     **tp2}},
        {"name": "cold_fail", "llm": {**cold, "model_loader_extra_config": {"on_cold": "fail"}}},
        {"name": "cold_warm", "llm": {**cold, **tp2, "model_loader_extra_config": {
            "uri": served.uris["cold"]}}},
    ], timeout=1400)
    expected = results["files"]["tokens"]
    assert len({tuple(t) for t in expected}) > 1, "prompts must give different tokens"
    assert results["pool_tp2"] == {"tokens": expected}
    ranks = log_lines(output, r"Loading weights took .* \(warmpool, host tier, rank [01]\)")
    assert {line[-2] for line in ranks} >= {"0", "1"}, output[-6000:]
    assert "error" in results["cold_fail"]
    refused = log_lines(output, re.escape(f"{served.uris['cold']} is not warm") +
                          ".*on_cold is 'fail'")
    assert refused, output[-6000:]
    assert results["cold_warm"] == {"tokens": expected}
    assert log_lines(output, re.escape(f"{served.uris['cold']} is cold; warming it now"))
    assert log_lines(output, re.escape(f"{served.uris['cold']} from the host tier after "
                                         "warming it"))


@pytest.mark.timeout(1200)
def test_vllm_refuses_weights_that_are_not_the_models(served: Served) -> None:
    """Clear errors, and no engine: a URI that is cold and unreachable, a pool entry of
    another content than the files vLLM was given, a checkpoint name the module lacks."""
    unreachable = "s3://warmpool-no-such-bucket/m/"
    results, output = vllm_engines(served, [
        {"name": "unreachable", "llm": {"model": served.files_dirs["a"], "load_format": "warmpool",
                                        "model_loader_extra_config": {"uri": unreachable}}},
        {"name": "other_model", "llm": {"model": served.files_dirs["a"], "load_format": "warmpool",
                                        "model_loader_extra_config": {"uri": served.uris["b"]}}},
        {"name": "bad_names", "llm": {"model": served.files_dirs["bad_names"],
                                      "load_format": "warmpool"}},
    ], timeout=1100)
    assert all("error" in r and "tokens" not in r for r in results.values()), results
    assert log_lines(output, re.escape(unreachable) + " is not warm and warming it failed")
    assert log_lines(output, re.escape(f"the pool's entry for {served.uris['b']} is content"))
    assert log_lines(output, "checkpoint tensor 'model.layers.1.mlp.upp_proj.weight' of "
                       + re.escape(served.uris["bad_names"]) + " does not fit")
