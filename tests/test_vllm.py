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
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.servers import REPO, S3Backend, Server
from warmpool.pool.host import HostTier

VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
CHILD = REPO / "tests" / "vllm_child.py"
RENAMED = "model.layers.1.mlp.up_proj.weight=model.layers.1.mlp.upp_proj.weight"


@dataclass(frozen=True)
class Served:
    env: dict[str, str]
    uris: dict[str, str]  # name -> s3:// URI
    files_dirs: dict[str, str]  # name -> metadata cache files directory
    local: dict[str, Path]  # name -> the model as written, weights included


def _vllm_python() -> Path:
    if not VLLM_PYTHON.exists():
        pytest.fail(f"{VLLM_PYTHON} is missing: build vLLM's test virtualenv with "
                    "`make vllm-venv` (make test does it first)", pytrace=False)
    return VLLM_PYTHON


def _vllm_env(moto_server: Server, root: Path) -> dict[str, str]:
    """The environment of a vLLM child: the S3 test server, a pool of its own under
    ``root``, CPU settings for two ranks, nothing from the hub, no controller."""
    env = {**os.environ, **moto_server.env,
           "WARMPOOL_RUNTIME_DIR": str(root / "runtime"), "WARMPOOL_CACHE_DIR": str(root / "cache"),
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    for name in moto_server.unset:
        env.pop(name, None)
    env.pop("WARMPOOL_REDIS_URL", None)
    return env


def _run(argv: list[str], env: dict[str, str], timeout: float) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=REPO)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{argv[:4]} exited {done.returncode}:\n{output[-6000:]}"
    return output


def _upload(backend: S3Backend, local: Path, prefix: str) -> None:
    for path in sorted(local.iterdir()):
        backend.put(prefix + path.name, path.read_bytes())


@pytest.fixture(scope="module")
def served(moto_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Four models in S3: ``a`` and ``bad_names`` warm on the host tier, ``b`` (other
    weights) warm, ``cold`` (a's weights plus a README, so another content) only in the
    metadata cache."""
    python = _vllm_python()
    root = tmp_path_factory.mktemp("vllm")
    env = _vllm_env(moto_server, root)
    local = {"a": root / "a", "b": root / "b", "bad_names": root / "bad_names"}
    _run([str(python), str(CHILD), "make-models", json.dumps([
        {"out": str(local["a"]), "seed": 1}, {"out": str(local["b"]), "seed": 2},
        {"out": str(local["bad_names"]), "seed": 1, "rename": RENAMED}])], env, 300)
    backend = S3Backend(moto_server)
    for name, path in local.items():
        _upload(backend, path, f"models/{name}/")
    _upload(backend, local["a"], "models/cold/")
    backend.put("models/cold/README.md", b"the same weights as a, another content hash\n")
    uris = {name: str(backend.uri_for(f"models/{name}/")) for name in (*local, "cold")}
    cli = [sys.executable, "-m", "warmpool.cli"]
    files_dirs = {}
    for name, uri in uris.items():
        if name != "cold":
            _run([*cli, "prefetch", uri], env, 300)
        files_dirs[name] = _run([*cli, "metadata", uri, "--files-dir"], env, 120).strip()
    yield Served(env, uris, files_dirs, local)
    HostTier(root / "runtime").remove_all()


def _engines(served: Served, spec: list[dict[str, Any]], timeout: float) -> tuple[
        dict[str, dict[str, Any]], str]:
    """Start one ``LLM()`` per spec entry in one vLLM process: results by name, and the
    process's whole output (vLLM's and the loader's log lines)."""
    output = _run([str(_vllm_python()), str(CHILD), "run", json.dumps(spec)], served.env,
                  timeout)
    results = {}
    for line in output.splitlines():
        if line.startswith("RESULT "):
            item = json.loads(line[len("RESULT "):])
            results[item.pop("name")] = item
    assert set(results) == {s["name"] for s in spec}, output[-6000:]
    return results, output


def _engine_log(output: str, pattern: str) -> list[str]:
    return [line for line in output.splitlines() if re.search(pattern, line)]


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
    results, output = _engines(served, [
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
    ranks = _engine_log(output, r"Loading weights took .* \(warmpool, host tier, rank [01]\)")
    assert {line[-2] for line in ranks} >= {"0", "1"}, output[-6000:]
    assert "error" in results["cold_fail"]
    refused = _engine_log(output, re.escape(f"{served.uris['cold']} is not warm") +
                          ".*on_cold is 'fail'")
    assert refused, output[-6000:]
    assert results["cold_warm"] == {"tokens": expected}
    assert _engine_log(output, re.escape(f"{served.uris['cold']} is cold; warming it now"))
    assert _engine_log(output, re.escape(f"{served.uris['cold']} from the host tier after "
                                         "warming it"))


@pytest.mark.timeout(1200)
def test_vllm_refuses_weights_that_are_not_the_models(served: Served) -> None:
    """Clear errors, and no engine: a URI that is cold and unreachable, a pool entry of
    another content than the files vLLM was given, a checkpoint name the module lacks."""
    unreachable = "s3://warmpool-no-such-bucket/m/"
    results, output = _engines(served, [
        {"name": "unreachable", "llm": {"model": served.files_dirs["a"], "load_format": "warmpool",
                                        "model_loader_extra_config": {"uri": unreachable}}},
        {"name": "other_model", "llm": {"model": served.files_dirs["a"], "load_format": "warmpool",
                                        "model_loader_extra_config": {"uri": served.uris["b"]}}},
        {"name": "bad_names", "llm": {"model": served.files_dirs["bad_names"],
                                      "load_format": "warmpool"}},
    ], timeout=1100)
    assert all("error" in r and "tokens" not in r for r in results.values()), results
    assert _engine_log(output, re.escape(unreachable) + " is not warm and warming it failed")
    assert _engine_log(output, re.escape(f"the pool's entry for {served.uris['b']} is content"))
    assert _engine_log(output, "checkpoint tensor 'model.layers.1.mlp.upp_proj.weight' of "
                       + re.escape(served.uris["bad_names"]) + " does not fit")
