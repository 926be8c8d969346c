"""SGLang serves from the pool: its own ``Engine`` with ``load_format="warmpool"`` against
``load_format="auto"`` on the same files.

SGLang runs in its own virtualenv (``.venv-sglang``, built by ``make sglang-venv``; ``make
test`` builds it), in subprocesses, since its torch and transformers pins are not ours. A
missing venv fails these tests: they are how CI knows the plugin works with the SGLang
release we name. Each ``Engine()`` start costs about 12 s here, so one process starts
several engines in a row, and every run is bounded (a loader failing inside SGLang's
scheduler process can leave ``Engine()`` waiting).

The engine is pointed at the metadata cache's files directory, which holds no weight
files: a load that fell back to reading files from the directory could not pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from tests.engine_harness import SGLANG_CHILD, Served, log_lines, run, sglang_engines, sglang_python
from tests.servers import REPO
from tests.tiny_llama import ENGINE_TEST, write_tiny_llama
from warmpool.pool.host import HostTier


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``a`` and ``b`` (other weights) warm on the host tier; ``cold`` and ``colder`` (a's
    weights beside a README of their own: other contents) only in the metadata cache."""
    sglang_python()
    root = tmp_path_factory.mktemp("sglang")
    env = {**os.environ, "WARMPOOL_RUNTIME_DIR": str(root / "runtime"),
           "WARMPOOL_CACHE_DIR": str(root / "cache"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "SGLANG_DISABLE_REQUEST_LOGGING": "1"}
    env.pop("WARMPOOL_REDIS_URL", None)
    local = {name: root / name for name in ("a", "b", "cold", "colder")}
    for name, seed in (("a", 1), ("b", 2)):
        write_tiny_llama(local[name], ENGINE_TEST, seed=seed, std=0.2, shard_size="1MB",
                         tokenizer=True)
    for name in ("cold", "colder"):
        shutil.copytree(local["a"], local[name])
        (local[name] / "README.md").write_text(f"a's weights, {name}: another content hash\n")
    uris = {name: f"file://{path}/" for name, path in local.items()}
    cli = [sys.executable, "-m", "warmpool.cli"]
    files_dirs = {}
    for name, uri in uris.items():
        if name in ("a", "b"):
            run([*cli, "prefetch", uri], env, 300)
        files_dirs[name] = run([*cli, "metadata", uri, "--files-dir"], env, 120).strip()
    yield Served(env, uris, files_dirs, local)
    HostTier(root / "runtime").remove_all()


def _refused(served: Served, engine: dict[str, Any], timeout: float) -> str:
    """Start one ``Engine()`` that must not start: SGLang's scheduler prints the loader's
    error and takes the whole process tree down (SIGQUIT to the parent, then SIGKILL), so
    it runs alone. Returns the output; asserts that no tokens came out."""
    done = subprocess.run([str(sglang_python()), str(SGLANG_CHILD), "run",
                           json.dumps([{"name": "refused", "engine": engine}])],
                          capture_output=True, text=True, env=served.env, timeout=timeout,
                          cwd=REPO)
    output = done.stdout + done.stderr
    assert '"tokens"' not in output, output[-6000:]
    assert done.returncode != 0 or '"error"' in output, output[-6000:]
    return output


def _file_digests(model: Path) -> dict[str, str]:
    """Each tensor of the checkpoint as float32 (exact for bf16), hashed as the child
    hashes what the engine holds."""
    out = {}
    for shard in sorted(model.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                values = f.get_tensor(name).float().numpy()
                out[name] = hashlib.sha256(values.tobytes()).hexdigest()
    return out


@pytest.mark.timeout(900)
def test_sglang_serves_from_the_pool_like_from_the_files(served: Served) -> None:
    """Greedy tokens through load_format="warmpool" are SGLang's own from the files, every
    parameter equals safetensors reading the checkpoint bit for bit, in both engines; a
    cold model is warmed first (and says so), or refused with on_cold="fail"."""
    for name in ("a", "cold", "colder"):
        assert not list(Path(served.files_dirs[name]).glob("*.safetensors")), \
            "SGLang's directory must hold no weights, or a fallback to the files could pass"
    expected_digests = _file_digests(served.local["a"])
    names = sorted(expected_digests)
    pool = {"load_format": "warmpool"}
    results, output = sglang_engines(served, [
        {"name": "files", "engine": {"model_path": str(served.local["a"])}, "weights": names},
        {"name": "pool", "engine": {"model_path": served.files_dirs["a"], **pool},
         "weights": names},
        {"name": "cold_warm", "engine": {"model_path": served.files_dirs["cold"], **pool}},
    ], timeout=700)
    expected = results["files"]["tokens"]
    assert len({tuple(t) for t in expected}) > 1, "prompts must give different tokens"
    assert results["files"]["digests"] == expected_digests  # the baseline reads the files
    assert results["pool"] == {"tokens": expected, "digests": expected_digests}
    assert log_lines(output, r"Loading weights took .* \(warmpool, host tier, rank 0\)"), \
        output[-6000:]
    assert results["cold_warm"] == {"tokens": expected, "digests": {}}
    assert log_lines(output, re.escape(f"{served.uris['cold']} is cold; warming it now"))
    output = _refused(served, {"model_path": served.files_dirs["colder"], **pool,
                               "model_loader_extra_config": json.dumps({"on_cold": "fail"})},
                      timeout=150)
    refused = log_lines(output, "NotWarmError: " + re.escape(f"{served.uris['colder']} is not warm")
                   + ".*on_cold is 'fail'")
    assert refused, output[-6000:]


@pytest.mark.timeout(300)
def test_sglang_refuses_weights_that_are_not_the_models(served: Served) -> None:
    """A pool entry of another content than the files SGLang was given is refused, with
    the reason in SGLang's log; no engine starts on the wrong weights."""
    output = _refused(served, {
        "model_path": served.files_dirs["a"], "load_format": "warmpool",
        "model_loader_extra_config": json.dumps({"uri": served.uris["b"]})}, timeout=150)
    assert log_lines(output, re.escape(f"the pool's entry for {served.uris['b']} is content")), \
        output[-6000:]
