"""Compile caches without an engine: the key, the private directories a cache must live
in, writing one (killed, failed, concurrent), what a serving start is told, and the
lifecycle (evicted with its model's last engine layout, bounded by compile_cache_max).
The engine itself compiling into one and a start compiling nothing is
tests/test_vllm_compile.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import pytest

from tests.models import write_model
from tests.test_engine_layout import KEY, URI, processed_params
from warmpool.compile.key import CompileKey, EngineRuntime, probe, probe_python
from warmpool.compile.serving import check_serving_environment, serving_start
from warmpool.compile.store import CACHE_ENV, CACHE_VARIABLES, CompileCaches, check_private
from warmpool.config import Settings
from warmpool.contract.requests import parse_request
from warmpool.engine_layouts import export_sync
from warmpool.errors import BadEvent, ConfigError, ExportError, UnsafeCacheError
from warmpool.pool.entries import Pool

RUNTIME = EngineRuntime("vllm", "0.32.0", "2.13.0+cpu", "cpu-x86_64-AVX512")
NOBODY = 65534


def key(checkpoint: str = KEY.checkpoint, **changes: object) -> CompileKey:
    base = CompileKey.of(checkpoint, RUNTIME, dtype="bfloat16", tp=2, max_model_len=128)
    return replace(base, **changes)  # type: ignore[arg-type]


def make(caches: CompileCaches, k: CompileKey, nbytes: int = 1000) -> Path:
    with caches.writing(k) as cache:
        (cache.path / "inductor" / "code.py").write_bytes(b"x" * nbytes)
    return cache.path


def test_every_field_of_the_key_changes_the_cache() -> None:
    base = key()
    other = {"checkpoint": "cd" * 32, "engine": "sglang", "engine_version": "0.33.0",
             "torch_version": "2.14.1", "device": "cuda-sm90-12.8", "dtype": "float16",
             "tp": 4, "max_model_len": 4096, "compilation": '{"mode":3}'}
    assert set(other) == {f.name for f in fields(CompileKey)}
    digests = {replace(base, **{name: value}).digest  # type: ignore[arg-type]
               for name, value in other.items()}
    assert len(digests | {base.digest}) == len(other) + 1
    assert CompileKey.from_json(json.loads(json.dumps(base.to_json()))) == base
    with pytest.raises(ValueError):
        CompileKey.from_json({**base.to_json(), "extra": 1})
    # Names of the same dtype are one key; the compilation config's key order is not.
    assert CompileKey.of("ab", RUNTIME, dtype="half", tp=1, max_model_len=None) == \
        CompileKey.of("ab", RUNTIME, dtype="float16", tp=1, max_model_len=None)
    a = CompileKey.of("ab", RUNTIME, dtype="auto", tp=1, max_model_len=None,
                      compilation={"a": 1, "b": 2})
    b = CompileKey.of("ab", RUNTIME, dtype="auto", tp=1, max_model_len=None,
                      compilation={"b": 2, "a": 1})
    assert a.digest == b.digest


def test_the_engine_python_is_asked_for_its_versions() -> None:
    """The same report in this process and from a child Python (what engine-env does
    with the engine's virtualenv); an engine that is not installed is one clear error."""
    here = probe("torch")
    assert here == probe_python(Path(sys.executable), "torch")
    assert here.device.startswith("cpu-") and here.torch_version == here.engine_version
    with pytest.raises(ConfigError, match="not installed"):
        probe("no-such-engine")
    with pytest.raises(ConfigError, match="could not report"):
        probe_python(Path(sys.executable), "no-such-engine")


def test_only_a_private_directory_of_ours_is_a_cache(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir(mode=0o700)
    check_private(good)
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o700)
    loose.chmod(0o755)
    with pytest.raises(UnsafeCacheError, match="mode 0755"):
        check_private(loose)
    link = tmp_path / "link"
    link.symlink_to(good)
    with pytest.raises(UnsafeCacheError, match="symbolic link"):
        check_private(link)
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)  # the suite runs as root here; see conftest
    with pytest.raises(UnsafeCacheError, match=f"belongs to uid {NOBODY}"):
        check_private(theirs)
    (tmp_path / "file").write_text("")
    with pytest.raises(UnsafeCacheError, match="not a directory"):
        check_private(tmp_path / "file")
    with pytest.raises(UnsafeCacheError, match="does not exist"):
        check_private(tmp_path / "missing")


def test_writing_a_cache_then_finding_it(settings: Settings) -> None:
    caches = CompileCaches(settings)
    k = key()
    assert caches.find(k) is None
    path = make(caches, k, 5000)
    found = caches.find(k)
    assert found is not None and found.complete and found.bytes >= 5000
    assert found.path == path and path.name == k.digest
    assert (path.stat().st_mode & 0o777) == 0o700 and (caches.root.stat().st_mode & 0o777) == 0o700
    env = found.environment()
    assert env[CACHE_ENV] == str(path) and env["VLLM_USE_AOT_COMPILE"] == "0"
    for var, sub in CACHE_VARIABLES.items():
        assert env[var] == str(path / sub) and (path / sub).is_dir()
    # A directory an engine variable names, opened up, is refused (never handed out).
    (path / "inductor").chmod(0o777)
    with pytest.raises(UnsafeCacheError, match="0777"):
        caches.find(k)
    (path / "inductor").chmod(0o700)
    # A second export of the key reuses the cache; one that fails does not lose it.
    with pytest.raises(RuntimeError), caches.writing(k):
        raise RuntimeError("the engine failed")
    assert caches.find(k) is not None and (path / "inductor" / "code.py").exists()


def test_a_failed_or_killed_export_leaves_no_cache(settings: Settings) -> None:
    caches = CompileCaches(settings)
    with pytest.raises(RuntimeError), caches.writing(key()) as cache:
        (cache.path / "inductor" / "half.py").write_text("half")
        raise RuntimeError("vLLM could not load the model")
    assert caches.all() == []
    # A killed export: its directory without complete.json, its lock let go.
    k = key(tp=1)
    caches.path(k).mkdir(mode=0o700, parents=True)
    (caches.path(k) / "key.json").write_text(json.dumps(k.to_json()))
    [left] = caches.all()
    assert not left.complete and caches.find(k) is None
    # ... which is never mixed into a new export's cache,
    (caches.path(k) / "stale.py").write_text("old")
    make(caches, k)
    assert not (caches.path(k) / "stale.py").exists()
    # and a sweep leaves alone the cache an export is writing now.
    k2 = key(tp=4)
    with caches.writing(k2):
        removed = caches.sweep([])  # k is complete, but no layout of its model is warm
        assert [c.key for c in removed] == [k] and caches.path(k2).is_dir()
    assert caches.find(k) is None and caches.find(k2) is not None


def test_two_exports_of_one_key_do_not_write_at_once(settings: Settings) -> None:
    caches = CompileCaches(settings)
    with caches.writing(key()):
        with pytest.raises(ExportError, match="another export is compiling"):
            with caches.writing(key()):
                pass


def test_a_cache_goes_with_the_last_engine_layout_of_its_model(settings: Settings) -> None:
    """Evicting rank 1 of a tp=2 model keeps its cache (rank 0 is warm); evicting rank 0
    too removes it. A cache of another dtype of the same model is not kept by them."""
    rank0, rank1 = replace(KEY, rank=0), KEY
    for k in (rank0, rank1):
        export_sync(k, processed_params().items(), checkpoint_uri=URI, settings=settings)
    caches = CompileCaches(settings)
    make(caches, key())
    make(caches, key(dtype="float16"))
    pool = Pool(settings)
    asyncio.run(pool.evict(rank1.content_hash))
    assert caches.find(key()) is not None and caches.find(key(dtype="float16")) is None
    asyncio.run(pool.evict(rank0.content_hash))
    assert caches.all() == []


def test_the_limit_removes_the_least_recently_used_first(settings: Settings) -> None:
    old, used, new = key(tp=1), key(tp=2), key(tp=4)
    for k in (old, used, new):
        make(CompileCaches(settings), k, 1000)
    sizes = {c.key: c.bytes for c in CompileCaches(settings).all()}
    caches = CompileCaches(replace(settings, compile_cache_max=sizes[used] + sizes[new]))
    now = time.time()
    for k, age in ((old, 300), (used, 200), (new, 100)):
        found = caches.find(k)
        assert found is not None
        caches.mark_used(found)
        os.utime(found.path / "used", (now - age, now - age))
    caches.mark_used(caches.find(used))  # type: ignore[arg-type]  # a start just used it
    removed = caches.enforce_limit(keep=new)
    assert [c.key for c in removed] == [old]
    assert caches.find(used) is not None and caches.find(new) is not None
    # The one just made goes last, even when it alone is over the limit.
    small = CompileCaches(replace(settings, compile_cache_max=500))
    assert [c.key for c in small.enforce_limit(keep=new)] == [used, new]


def test_a_serving_start_is_told_where_the_cache_is_or_how_to_make_one(
        settings: Settings, tmp_path: Path) -> None:
    files = tmp_path / "files"
    start = serving_start(URI, files, KEY.checkpoint, RUNTIME, dtype="bfloat16", tp=2,
                          max_model_len=128, compilation=None, settings=settings)
    assert start.compile_cache is None and CACHE_ENV not in start.env
    assert start.note and f"warmpool export {URI} --engine vllm --compile --dtype bfloat16 " \
        "--tp 2 --max-model-len 128" in start.note
    assert start.env["WARMPOOL_CACHE_DIR"] == str(settings.cache_dir)

    path = make(CompileCaches(settings), key())
    start = serving_start(URI, files, KEY.checkpoint, RUNTIME, dtype="bfloat16", tp=2,
                          max_model_len=128, compilation=None, settings=settings)
    assert start.compile_cache == str(path) and start.note is None
    assert start.env["TORCHINDUCTOR_CACHE_DIR"] == str(path / "inductor")
    rpc = Path(start.env["VLLM_RPC_BASE_PATH"])
    assert rpc.parent == settings.runtime_dir and (rpc.stat().st_mode & 0o777) == 0o700
    assert start.llm_kwargs == {"model": str(files), "load_format": "warmpool",
                                "model_loader_extra_config": {"uri": URI},
                                "tensor_parallel_size": 2, "dtype": "bfloat16",
                                "max_model_len": 128}
    assert start.to_json()["compile_key"] == key().to_json()
    # The shell form: eval'd by bash, it gives back the same variables and arguments.
    shown = subprocess.run(
        ["bash", "-c", 'eval "$1"; echo "$TORCHINDUCTOR_CACHE_DIR"; echo "$WARMPOOL_MODEL"; '
         'printf "%s\\n" $WARMPOOL_SERVE_ARGS', "_", start.shell()],
        capture_output=True, text=True, check=True).stdout.splitlines()
    assert shown == [str(path / "inductor"), str(files), *start.serve_args]
    # Another dtype has no cache: the note names the one there is, and what differs.
    other = serving_start(URI, files, KEY.checkpoint, RUNTIME, dtype="float32", tp=2,
                          max_model_len=128, compilation=None, settings=settings)
    assert other.compile_cache is None and "dtype 'float32' != 'bfloat16'" in str(other.note)


def test_a_serving_start_refuses_a_cache_that_is_not_private(settings: Settings) -> None:
    path = make(CompileCaches(settings), key())
    cache = CompileCaches(settings).find(key())
    assert cache is not None
    env = cache.environment()
    check_serving_environment(env)
    check_serving_environment({})  # no cache given: nothing to check
    with pytest.raises(UnsafeCacheError, match="is not the compile cache's"):
        check_serving_environment({**env, "TORCHINDUCTOR_CACHE_DIR": "/tmp/elsewhere"})
    os.chown(path / "tmp", NOBODY, NOBODY)
    with pytest.raises(UnsafeCacheError, match=f"belongs to uid {NOBODY}"):
        check_serving_environment(env)
    os.chown(path / "tmp", os.geteuid(), os.getegid())
    # A cache moved aside and a link put in its place: refused by the start and by find.
    aside = path.with_name("aside")
    path.rename(aside)
    path.symlink_to(aside)
    with pytest.raises(UnsafeCacheError, match="symbolic link"):
        check_serving_environment(env)
    with pytest.raises(UnsafeCacheError, match="symbolic link"):
        CompileCaches(settings).find(key())


def test_a_deploy_asks_to_compile_unless_it_says_not_to() -> None:
    doc = {"action": "deploy", "uri": "s3://b/m/", "engine_layout": {"engine": "vllm"}}
    want = parse_request(doc).engine_layout
    assert want is not None and want.compile
    off = parse_request({**doc, "engine_layout": {"engine": "vllm", "compile": False}})
    assert off.engine_layout is not None and not off.engine_layout.compile
    assert parse_request(off.to_doc()) == off and parse_request(
        parse_request(doc).to_doc()).engine_layout == want
    with pytest.raises(BadEvent, match="compile"):
        parse_request({**doc, "engine_layout": {"engine": "vllm", "compile": "yes"}})
    # A request cannot carry a compilation config (some of its options name code).
    with pytest.raises(BadEvent, match="unknown engine_layout fields"):
        parse_request({**doc, "engine_layout": {"engine": "vllm",
                                                "compilation_config": {"mode": 3}}})


def test_engine_env_without_the_engine_is_one_clear_error(tmp_path: Path,
                                                          settings: Settings) -> None:
    model = tmp_path / "m"
    write_model(model, shards=1, seed=1)
    env = {**os.environ, **settings.pool_environment()}
    done = subprocess.run([sys.executable, "-m", "warmpool", "engine-env", str(model),
                           "--python", sys.executable], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr  # a ConfigError
    assert "could not report its vllm and torch versions" in done.stderr, done.stderr


def test_status_lists_the_compile_caches(settings: Settings) -> None:
    make(CompileCaches(settings), key(), 2_000_000)
    env = {**os.environ, **settings.pool_environment()}
    env.pop("WARMPOOL_REDIS_URL", None)
    done = subprocess.run([sys.executable, "-m", "warmpool", "status"], capture_output=True,
                          text=True, env={**env, "COLUMNS": "250"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert key().label() in done.stdout and "complete" in done.stdout, done.stdout
