"""The compile cache, for real: ``warmpool export --compile`` in vLLM's virtualenv, then a
fresh vLLM process given only what ``warmpool engine-env --json`` prints (a fresh HOME,
the cache's TMPDIR, nothing else) generates vLLM's own tokens and adds nothing to the
cache: it compiled nothing. One compile, the tiny Llama (the suite's budget).
See tests/test_vllm.py for how vLLM runs here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine_harness import VLLM_CHILD, Served, log_lines, run, upload, vllm_env, vllm_python
from tests.servers import REPO, S3Backend, Server
from tests.test_vllm_zero_copy import VIEWS
from warmpool.integrations.vllm_export import parse_report
from warmpool.pool.host import HostTier

ARGS = ["--dtype", "bfloat16", "--max-model-len", "128"]


@pytest.fixture(scope="module")
def cold(moto_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    python = vllm_python()
    root = tmp_path_factory.mktemp("vllm_compile")
    env = vllm_env(moto_server, root)
    for name in ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR"):
        env.pop(name, None)
    local = root / "m"
    run([str(python), str(VLLM_CHILD), "make-models", json.dumps([{"out": str(local), "seed": 3}])],
        env, 300)
    backend = S3Backend(moto_server)
    upload(backend, local, "models/c/")
    yield Served(env, {"m": str(backend.uri_for("models/c/"))}, {}, {"m": local})
    HostTier(root / "runtime").remove_all()


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``path``: a file's size and modification time, a directory's
    name (its time changes when vLLM's rendezvous file comes and goes in TMPDIR)."""
    found = {}
    for top, dirs, files in os.walk(path):
        for name in dirs:
            found[os.path.relpath(os.path.join(top, name), path)] = (0, 0)
        for name in files:
            full = os.path.join(top, name)
            st = os.lstat(full)
            found[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns)
    return found


def engine_env(served: Served, *extra: str) -> dict[str, object]:
    """``warmpool engine-env --json`` run by warmpool's own Python, asking the vLLM
    virtualenv's Python for its versions (as a platform's start script would)."""
    done = subprocess.run([sys.executable, "-m", "warmpool", "engine-env", served.uris["m"],
                           "--python", str(vllm_python()), *ARGS, *extra, "--json"],
                          capture_output=True, text=True, env=served.env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout))


def start(served: Served, start_doc: dict[str, object], home: Path, name: str,
          check: bool = True) -> tuple[dict[str, object], str]:
    """One vLLM start in a fresh process with only the pool's variables and a fresh HOME
    (so no cache of a previous start: ~/.cache/vllm is empty)."""
    env = {k: v for k, v in served.env.items()
           if not k.startswith(("WARMPOOL_", "TORCHINDUCTOR", "VLLM_CACHE", "TRITON"))}
    env.update({"HOME": str(home), **dict(start_doc["env"])})  # type: ignore[arg-type]
    home.mkdir(exist_ok=True)
    spec = [{"name": name, "llm": {**dict(start_doc["llm_kwargs"]),  # type: ignore[arg-type]
                                   "enforce_eager": False}}]
    done = subprocess.run([str(vllm_python()), str(VLLM_CHILD), "run", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    output = done.stdout + done.stderr
    assert not check or done.returncode == 0, output[-6000:]
    results = [json.loads(line[len("RESULT "):]) for line in output.splitlines()
               if line.startswith("RESULT ")]
    assert len(results) == 1, output[-6000:]
    return results[0], output


@pytest.mark.timeout(2400)
def test_a_serving_start_with_the_exported_compile_cache_compiles_nothing(
        cold: Served, tmp_path: Path) -> None:
    uri = cold.uris["m"]
    missing = engine_env(cold)
    assert missing["compile_cache"] is None
    assert not {"TORCHINDUCTOR_CACHE_DIR", "TMPDIR", "WARMPOOL_COMPILE_CACHE"} & set(
        dict(missing["env"]))  # type: ignore[arg-type]
    assert f"warmpool export {uri} --engine vllm --compile" in str(missing["note"])

    output = run([str(vllm_python()), "-m", "warmpool", "export", uri, "--compile", *ARGS,
                  "--json"], cold.env, 1500)
    report = parse_report(output)
    cache = report["compile_cache"]
    assert cache is not None and cache["complete"], output[-4000:]
    path = Path(cache["path"])
    assert cache["bytes"] > 10_000_000  # Inductor's code and precompiled headers
    assert oct(path.stat().st_mode & 0o777) == oct(0o700) and path.stat().st_uid == os.geteuid()
    assert list((path / "tmp").glob("torchinductor_*/precompiled_headers"))
    assert list((path / "inductor").iterdir())

    doc = engine_env(cold)
    assert doc["compile_cache"] == str(path) and doc["note"] is None
    env = dict(doc["env"])  # type: ignore[arg-type]
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(path / "inductor")
    assert env["TMPDIR"] == str(path / "tmp") and env["VLLM_USE_AOT_COMPILE"] == "0"
    assert doc["model"] == report["files_dir"]
    assert "--load-format" in doc["serve_args"]  # type: ignore[operator]

    before = tree(path)
    served, served_log = start(cold, doc, tmp_path / "home", "cached")
    assert tree(path) == before, "the serving start wrote into the compile cache"
    found = {m.group(2) for m in map(VIEWS.search, served_log.splitlines()) if m}
    assert found == {"0"}, served_log[-6000:]  # and its weights were the pool's layout
    assert not log_lines(served_log, "exported to the pool")

    plain, _ = run_plain(cold, tmp_path / "plain-home")
    assert len({tuple(t) for t in plain["tokens"]}) > 1, "prompts must give different tokens"
    assert served["tokens"] == plain["tokens"], served

    # Another dtype is another key: no cache, and the note says what differs.
    other = engine_env(cold, "--dtype", "float32")
    assert other["compile_cache"] is None and "dtype 'float32' != 'bfloat16'" in str(other["note"])

    # A cache directory of another user is refused by the start itself, before it loads
    # or compiles anything; so is a symbolic link in its place.
    os.chown(path, 65534, 65534)
    try:
        refused, log = start(cold, doc, tmp_path / "home3", "refused", check=False)
    finally:
        os.chown(path, os.geteuid(), os.getegid())
    assert "belongs to uid 65534" in str(refused.get("error", "")) + log, log[-4000:]
    assert tree(path) == before


def run_plain(served: Served, home: Path) -> tuple[dict[str, object], str]:
    """vLLM's own start on the model's files: no pool, no compile cache (eager)."""
    # A short TMPDIR of its own: vLLM binds its ZMQ sockets there, and a path under
    # pytest's default base passes the 107-byte limit of a socket's path (CI failed so).
    home.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="wp-plain-") as tmp:
        env = {**served.env, "HOME": str(home), "TMPDIR": tmp}
        spec = [{"name": "plain", "llm": {"model": str(served.local["m"])}}]
        output = run([str(vllm_python()), str(VLLM_CHILD), "run", json.dumps(spec)], env,
                     900)
    [line] = [x for x in output.splitlines() if x.startswith("RESULT ")]
    result = dict(json.loads(line[len("RESULT "):]))
    assert "tokens" in result, output[-6000:]
    return result, output
