"""Sources that change or misbehave under a prefetch: an object replaced mid-stream never
yields a warm entry mixing versions, and a FIFO in a model directory fails at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from tests.models import model_files, write_model
from tests.pool_env import run_cli, segments_of
from warmpool.attachment import attach
from warmpool.config import Settings
from warmpool.model.cache import MetadataCache
from warmpool.pool.entries import Pool
from warmpool.pool.registry.base import State

#: Runs a prefetch whose first progress report replaces a shard with ``new`` (the same
#: size and tensors, other values): a re-upload landing between listing and streaming.
REPLACE_MID_STREAM = textwrap.dedent("""
    import asyncio, json, os, sys
    from warmpool.config import Settings
    from warmpool.tiers.prefetch import prefetch

    uri, loader, key, new_file = sys.argv[1:5]
    new = open(new_file, "rb").read() if new_file != "-" else None
    done = []

    def replace():
        if done:
            return
        done.append(1)
        if uri.startswith("s3://"):
            import boto3
            bucket, prefix = uri[5:].split("/", 1)
            client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
            if new is None:  # the object vanishes
                client.delete_object(Bucket=bucket, Key=prefix + key)
            else:
                client.put_object(Bucket=bucket, Key=prefix + key, Body=new)
        else:
            with open(os.path.join(uri, key), "r+b") as f:  # rewritten in place
                f.write(new)

    def factory(total):
        return lambda n: replace()

    result = asyncio.run(prefetch(uri, settings=Settings.load(), loader=loader,
                                  progress=factory))
    print(json.dumps(result.to_json()))
""")


def _files_now(source: dict[str, bytes]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, data in source.items():
        if key.endswith(".safetensors"):
            out.update(load(data))
    return out


@pytest.mark.parametrize("where, loader", [
    ("local", "pread"), ("local", "runai"), ("local", "native"),
    ("s3", "native"), ("s3", "runai"),
])
async def test_an_object_replaced_mid_stream_is_never_mixed(
        where: str, loader: str, tmp_path: Path, settings: Settings,
        request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    write_model(old_dir, shards=2, seed=0)
    write_model(new_dir, shards=2, seed=3)  # same shapes, other values
    old, new = model_files(old_dir), model_files(new_dir)
    key = max(k for k in old if k.endswith(".safetensors"))
    assert len(old[key]) == len(new[key]) and old[key] != new[key]
    if where == "s3":
        backend = request.getfixturevalue("s3_backend")
        monkeypatch.setenv("RUNAI_STREAMER_S3_REQUEST_TIMEOUT_MS", "30000")
        for k, data in old.items():
            backend.put(f"m/{k}", data)
        uri = str(backend.uri_for("m/"))
    else:
        uri = str(old_dir)
    listed = await MetadataCache(settings.cache_dir).inspect(__import__(
        "warmpool.model.uri", fromlist=["parse_uri"]).parse_uri(uri))
    (tmp_path / "new.bin").write_bytes(new[key])
    proc = subprocess.run([sys.executable, "-c", REPLACE_MID_STREAM, uri, loader, key,
                           str(tmp_path / "new.bin")], capture_output=True, text=True,
                          check=False, timeout=300, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    final = {**old, key: new[key]}
    assert report["content_hash"] != listed.content_hash  # the new version's hash
    with attach(uri, settings=settings) as weights:
        assert weights.content_hash == report["content_hash"]
        for name, tensor in _files_now(final).items():
            assert torch.equal(weights[name].reshape(-1).view(torch.uint8),
                               tensor.reshape(-1).view(torch.uint8)), name
    old_entry = await Pool(settings).registry.get(f"{listed.content_hash}@cpu")
    assert old_entry is None or old_entry.state != State.WARM
    assert not any(".part-" in s for s in segments_of(settings))


async def test_a_vanished_object_is_named_with_runai(s3_backend, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                     settings: Settings,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNAI_STREAMER_S3_REQUEST_TIMEOUT_MS", "30000")
    write_model(tmp_path / "m", shards=2)
    files = model_files(tmp_path / "m")
    for k, data in files.items():
        s3_backend.put(f"m/{k}", data)
    key = max(k for k in files if k.endswith(".safetensors"))
    proc = subprocess.run([sys.executable, "-c", REPLACE_MID_STREAM,
                           str(s3_backend.uri_for("m/")), "runai", key, "-"],
                          capture_output=True, text=True, check=False, timeout=300,
                          env=os.environ.copy())
    assert proc.returncode != 0
    assert key in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
    assert not segments_of(settings)


@pytest.mark.parametrize("what", ["shard", "tokenizer.json"])
def test_a_fifo_in_a_model_directory_fails_at_once(tmp_path: Path, settings: Settings,
                                                   what: str) -> None:
    model = tmp_path / "model"
    write_model(model, shards=2)
    victim = (max(model.glob("*.safetensors")) if what == "shard"
              else model / "tokenizer.json")
    victim.unlink()
    os.mkfifo(victim)
    done = run_cli("prefetch", str(model), timeout=120)
    assert done.returncode == 1 and "not a regular file" in done.stderr, done.stderr
    assert victim.name in done.stderr and "Traceback" not in done.stderr
    assert not list(settings.cache_dir.glob(".tmp-*"))
    assert not segments_of(settings)


async def test_a_shard_rewritten_in_place_with_its_mtime_restored_gets_a_new_hash(
        tmp_path: Path) -> None:
    """The same size, the same inode, the mtime set back (``touch -d``): the new bytes must
    not be published under the old content hash."""
    from warmpool.model.identity import content_hash
    from warmpool.model.uri import parse_uri
    from warmpool.storage import open_store

    model = tmp_path / "m"
    write_model(model, shards=2)
    shard = sorted(model.glob("*.safetensors"))[0]
    before = shard.stat()
    store = open_store(parse_uri(str(model)))
    old = content_hash(await store.list())
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor
    with open(shard, "r+b") as f:  # in place: the inode stays
        f.write(data)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = shard.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns)
    assert content_hash(await store.list()) != old
