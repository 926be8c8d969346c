"""The engine-agnostic half of the serving-engine plugins, without any engine installed:
which tier a rank's weights come from, warming a cold model, finding the model behind
the directory an engine was given, and the checks that keep a wrong model out."""

from __future__ import annotations

import logging
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.models import write_model
from tests.servers import REPO, S3Backend
from tests.test_host_tier import assert_bit_exact, reference
from warmpool.config import Settings
from warmpool.errors import CheckpointMismatchError, ConfigError, NotWarmError
from warmpool.integrations import sglang as sgl_plugin
from warmpool.integrations.weights import (
    LoaderOptions,
    NameTracker,
    check_same_model,
    missing_parameters,
    open_weights,
    resolve_model,
)
from warmpool.model.cache import MetadataCache
from warmpool.model.uri import parse_uri
from warmpool.pool.entries import Pool
from warmpool.pool.registry.base import State
from warmpool.tiers.prefetch import prefetch

LOGGER = "warmpool.integrations.weights"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    write_model(tmp_path / "model", shards=3)
    return tmp_path / "model"


async def test_warm_model_comes_from_the_host_tier_and_says_so(
        model_dir: Path, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    await prefetch(str(model_dir), settings=settings)
    caplog.set_level(logging.INFO, LOGGER)
    model, source = open_weights(str(model_dir), "cpu", settings=settings)
    with model:
        assert_bit_exact(model, reference(model_dir))
    assert (source.path, source.uri) == ("host", str(parse_uri(str(model_dir))))
    assert source.nbytes == model.layout.total_bytes > 0
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert lines == [source.describe()] and "from the host tier" in lines[0]


async def test_cold_model_fails_with_on_cold_fail_and_nothing_is_warmed(
        model_dir: Path, settings: Settings) -> None:
    with pytest.raises(NotWarmError, match=r"not warm .*on_cold is 'fail'") as info:
        open_weights(str(model_dir), "cpu", on_cold="fail", settings=settings)
    assert str(model_dir) in str(info.value)
    assert await Pool(settings).entries() == []


def test_cold_model_is_warmed_in_process_and_logged(
        model_dir: Path, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    model, source = open_weights(str(model_dir), "cpu", settings=settings)
    with model:
        assert_bit_exact(model, reference(model_dir))
    assert source.path == "warmed"
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("is cold; warming it now" in m for m in messages)
    assert any("after warming it" in m for m in messages)


async def test_cold_model_is_warmed_from_inside_a_running_event_loop(
        model_dir: Path, settings: Settings) -> None:
    """Engines may call their loader from a thread that runs an event loop."""
    model, source = open_weights(str(model_dir), "cpu", settings=settings)
    model.close()
    assert source.path == "warmed"
    entries = await Pool(settings).entries()
    assert [e.state for e in entries] == [State.WARM]


def test_unreachable_cold_uri_names_the_uri(s3_backend: S3Backend, settings: Settings) -> None:
    uri = str(s3_backend.missing_uri())
    with pytest.raises(NotWarmError, match="is not warm and warming it failed") as info:
        open_weights(uri, "cpu", settings=settings)
    assert uri in str(info.value)


def test_a_cold_content_hash_cannot_be_warmed(settings: Settings) -> None:
    with pytest.raises(NotWarmError, match="name the model by its URI"):
        open_weights("ab" * 32, "cpu", settings=settings)


def test_on_cold_must_be_warm_or_fail(settings: Settings) -> None:
    with pytest.raises(ValueError, match="on_cold"):
        open_weights("/nowhere", "cpu", on_cold="later", settings=settings)  # type: ignore[arg-type]


async def test_model_is_found_from_the_metadata_cache_files_directory(
        model_dir: Path, settings: Settings) -> None:
    cached = await MetadataCache(settings.cache_dir).fetch(parse_uri(str(model_dir)))
    ref = resolve_model(cached.files_dir)
    assert (ref.uri, ref.content_hash) == (str(cached.uri), cached.content_hash)
    named = resolve_model(str(cached.files_dir), "s3://other/prefix/")
    assert (named.uri, named.content_hash) == ("s3://other/prefix/", cached.content_hash)


def test_a_plain_directory_needs_the_uri(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="not a warmpool metadata cache directory"):
        resolve_model(model_dir)
    ref = resolve_model(model_dir, "s3://b/m/")
    assert (ref.uri, ref.content_hash) == ("s3://b/m/", None)


async def test_a_pool_entry_of_another_content_is_refused(
        tmp_path: Path, settings: Settings) -> None:
    write_model(tmp_path / "a", seed=1)
    write_model(tmp_path / "b", seed=2)
    cached = await MetadataCache(settings.cache_dir).fetch(parse_uri(str(tmp_path / "a")))
    await prefetch(str(tmp_path / "b"), settings=settings)
    ref = resolve_model(cached.files_dir, str(tmp_path / "b"))
    model, _ = open_weights(ref.uri, "cpu", settings=settings)
    with model, pytest.raises(CheckpointMismatchError, match="is content") as info:
        check_same_model(ref, model)
    assert ref.uri in str(info.value) and cached.content_hash[:12] in str(info.value)


def test_a_name_the_engine_lacks_is_named_in_the_error() -> None:
    tensors = {"model.embed.weight": torch.zeros(2), "model.bogus.weight": torch.zeros(2)}
    stream = NameTracker(tensors)
    params = {"model.embed.weight"}
    with pytest.raises(CheckpointMismatchError, match="'model.bogus.weight' of s3://b/m/") as info:
        try:
            for name, _ in stream:
                if name not in params:
                    raise KeyError(name)
        except KeyError as exc:
            raise stream.mismatch("s3://b/m/", "LlamaForCausalLM", exc) from exc
    assert "LlamaForCausalLM" in str(info.value)
    assert missing_parameters(["a", "b", "c"], ["b"]) == ["a", "c"]


@pytest.mark.parametrize(("extra", "expected"), [
    (None, LoaderOptions()), ({}, LoaderOptions()), ("", LoaderOptions()),
    ({"uri": "s3://b/m/", "on_cold": "fail"}, LoaderOptions("s3://b/m/", "fail")),
    ('{"on_cold": "fail"}', LoaderOptions(None, "fail")),
])
def test_loader_options_parse(extra: Any, expected: LoaderOptions) -> None:
    assert LoaderOptions.parse(extra) == expected


@pytest.mark.parametrize(("extra", "match"), [
    ({"url": "s3://b/m/"}, "unknown key"), ({"on_cold": "sometimes"}, "on_cold"),
    ({"uri": 3}, "uri must be a string")])
def test_loader_options_refuse_bad_input(extra: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LoaderOptions.parse(extra)


def test_sglang_load_format_swap_and_device_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """SGLang does not install without CUDA: its hook is checked against a stand-in
    config and a stand-in loader class."""
    class Loader:
        LOAD_FORMAT = "warmpool"

    class Config:
        def __init__(self, load_format: Any) -> None:
            self.load_format = load_format

    calls: list[Any] = []
    other = Config("safetensors")
    assert sgl_plugin._verify_load_format(lambda c: calls.append(c), other) is None
    assert calls == [other] and other.load_format == "safetensors"
    monkeypatch.setattr(sgl_plugin, "loader_class", lambda: Loader)
    ours = Config("WarmPool")
    assert sgl_plugin._verify_load_format(lambda c: calls.append(c), ours) is None
    assert ours.load_format is Loader
    assert sgl_plugin._verify_load_format(lambda c: calls.append(c), ours) is None
    assert calls == [other], "a resolved warmpool config must not reach SGLang's check"
    assert [sgl_plugin.names_warmpool(v) for v in ("warmpool", "WarmPool", "auto", None)] == [
        True, True, False, False]
    assert sgl_plugin.rank_device("cuda", 3) == "cuda:3"
    assert sgl_plugin.rank_device("cuda", None) == "cuda:0"
    assert sgl_plugin.rank_device("cpu", 0) == "cpu"


def test_plugins_import_without_their_engine_and_are_declared() -> None:
    code = ("import sys, warmpool.integrations.vllm, warmpool.integrations.sglang; "
            "print(sorted(m for m in ('vllm', 'sglang', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"
    points = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    assert points["vllm.general_plugins"] == {"warmpool": "warmpool.integrations.vllm:register"}
    assert points["sglang.srt.plugins"] == {"warmpool": "warmpool.integrations.sglang:register"}
