"""Settings precedence, byte sizes, streamer variables, URIs, and credential redaction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from warmpool.config import Settings, StreamerOptions, parse_bytes
from warmpool.contract.redis_client import redact
from warmpool.errors import ConfigError, InvalidURIError
from warmpool.model.uri import parse_uri


@pytest.mark.parametrize("text, expected", [
    ("16GiB", 16 << 30), ("500MB", 500_000_000), ("1e9", 10**9), ("0", 0), ("-1", -1),
    (" 2 gib ", 2 << 30), ("4_096", 4096), (None, None), ("", None), (7, 7),
])
def test_byte_sizes(text: object, expected: int | None) -> None:
    assert parse_bytes(text) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["lots", "12XB", "-5"])
def test_bad_byte_sizes_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_bytes(bad)


def test_flags_beat_environment_beat_config_file(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "warmpool.json"
    config.write_text(json.dumps({"host_capacity": "1GiB", "watch": ["s3://b/models/"],
                                  "streamer": {"concurrency": 3, "memory_limit": "64MiB"}}))
    monkeypatch.delenv("WARMPOOL_HOST_CAPACITY", raising=False)
    monkeypatch.delenv("WARMPOOL_WATCH", raising=False)
    s = Settings.load(config)
    assert s.host_capacity == 1 << 30 and s.watch == ("s3://b/models/",)
    assert s.streamer.concurrency == 3 and s.streamer.memory_limit == 64 << 20
    monkeypatch.setenv("WARMPOOL_HOST_CAPACITY", "2GiB")
    assert Settings.load(config).host_capacity == 2 << 30
    assert Settings.load(config, host_capacity=5).host_capacity == 5


def test_unknown_setting_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "w.json"
    config.write_text('{"hots_capacity": 1}')
    with pytest.raises(ConfigError, match="hots_capacity"):
        Settings.load(config)


def test_controller_section_of_the_config_file_under_the_environment(tmp_path: Path) -> None:
    from warmpool.config import ControllerOptions

    config = tmp_path / "warmpool.toml"
    config.write_text('[controller]\ndebounce_s = 0.5\nmax_inflight = 8\nkey_prefix = "wp"\n')
    section = Settings.load(config).controller
    options = ControllerOptions.load(section, environ={"WARMPOOL_MAX_INFLIGHT": "4"})
    assert (options.debounce_s, options.max_inflight, options.key_prefix) == (0.5, 4, "wp")
    assert options.heartbeat_s == ControllerOptions().heartbeat_s  # untouched: the default
    with pytest.raises(ConfigError, match="debounce"):
        ControllerOptions.load({"debounce": 1}, environ={})
    with pytest.raises(ConfigError, match="controller.max_inflight in the config file"):
        ControllerOptions.load({"max_inflight": "many"}, environ={})
    with pytest.raises(ConfigError, match="WARMPOOL_HEARTBEAT_S"):
        ControllerOptions.load({}, environ={"WARMPOOL_HEARTBEAT_S": "soon"})
    config.write_text('controller = 3\n')
    with pytest.raises(ConfigError, match="mapping"):
        Settings.load(config)


def test_streamer_variables_use_engine_names_and_respect_the_operator() -> None:
    env = StreamerOptions(concurrency=12, memory_limit=1 << 30).environment({})
    assert env["RUNAI_STREAMER_CONCURRENCY"] == "12"
    assert env["RUNAI_STREAMER_MEMORY_LIMIT"] == str(1 << 30)
    operator = {"RUNAI_STREAMER_CONCURRENCY": "5", "RUNAI_STREAMER_FS_STRATEGY": "sync_buffered"}
    env = StreamerOptions().environment(operator)
    assert env["RUNAI_STREAMER_CONCURRENCY"] == "5"  # set by hand: kept
    assert env["RUNAI_STREAMER_FS_STRATEGY"] == "sync_buffered"
    # SGLang's name for the S3 endpoint, which the 0.17 streamer ignores, is mapped.
    env = StreamerOptions().environment({"RUNAI_STREAMER_S3_ENDPOINT": "http://s3.local:9000"})
    assert env["AWS_ENDPOINT_URL"] == "http://s3.local:9000"
    assert StreamerOptions(distributed=True).environment({})["RUNAI_STREAMER_DIST"] == "1"


@pytest.mark.parametrize("text, scheme, bucket, prefix", [
    ("s3://b/models/llama", "s3", "b", "models/llama/"),
    ("gs://b/m/", "gs", "b", "m/"),
    ("gcs://b/m", "gs", "b", "m/"),
    ("az://container/p/q", "az", "container", "p/q/"),
    ("s3://b", "s3", "b", ""),
])
def test_uris(text: str, scheme: str, bucket: str, prefix: str) -> None:
    uri = parse_uri(text)
    assert (uri.scheme, uri.bucket, uri.prefix) == (scheme, bucket, prefix)
    assert parse_uri(str(uri)) == uri


def test_local_paths_become_file_uris(tmp_path: Path) -> None:
    assert parse_uri(tmp_path) == parse_uri(f"file://{tmp_path}")
    assert str(parse_uri(tmp_path)) == f"file://{tmp_path}/"


@pytest.mark.parametrize("bad", ["ftp://x/y", "s3://", "s3://b/../etc", "s3://user:pw@b/x",
                                 "s3://b/x?versionId=1", "", "file://host/x"])
def test_bad_uris(bad: str) -> None:
    with pytest.raises(InvalidURIError):
        parse_uri(bad)


def test_redis_passwords_are_redacted() -> None:
    assert redact("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert "pw" not in redact("rediss://user:pw@h/1")
    assert redact("redis://h:1/0") == "redis://h:1/0"
    assert "p@ss" not in redact("redis://u:p@ss@h:1/0") and "ss@" not in redact("redis://u:p@ss@h/0")
    sentinel = "redis+sentinel://:m4ster@a:26379,b/svc/2?sentinel_password=s3nt"
    assert redact(sentinel) == "redis+sentinel://:***@a:26379,b/svc/2?sentinel_password=***"


def test_sentinel_urls() -> None:
    from warmpool.contract.redis_client import SentinelURL

    url = SentinelURL.parse("redis+sentinel://:m4ster@a:26380,b,[::1]:5/svc/2"
                            "?sentinel_password=s3nt")
    assert url.sentinels == (("a", 26380), ("b", 26379), ("::1", 5))
    assert (url.service, url.db, url.password, url.sentinel_password) == (
        "svc", 2, "m4ster", "s3nt")
    assert SentinelURL.parse("redis+sentinel://h/mymaster").db == 0
    for bad in ("redis+sentinel://h", "redis+sentinel:///svc", "redis+sentinel://h:x/svc",
                "redis+sentinel://h/svc/zero"):
        with pytest.raises(ConfigError):
            SentinelURL.parse(bad)


def test_loader_choice() -> None:
    """auto: pread for local files (runai in a distributed group, which splits the
    reads), runai for object stores, our own client for az:// (no streamer support
    against connection-string accounts)."""
    from warmpool.errors import StreamError
    from warmpool.loading.streaming import choose_loader

    local, s3, az = parse_uri("/models/m"), parse_uri("s3://b/m/"), parse_uri("az://c/m/")
    assert choose_loader(local) == "pread"
    assert choose_loader(local, group=True) == "runai"
    assert choose_loader(s3) == "runai"
    assert choose_loader(az) == "native"
    assert choose_loader(local, "runai") == "runai"
    with pytest.raises(StreamError):
        choose_loader(s3, "pread")
    with pytest.raises(StreamError):
        choose_loader(az, "runai")


def test_the_example_deployment_config_is_valid() -> None:
    """deploy/warmpool.yaml is what operators copy: every key in it must load."""
    from warmpool.config import ControllerOptions

    example = Path(__file__).resolve().parent.parent / "deploy" / "warmpool.yaml"
    settings = Settings.load(example)
    options = ControllerOptions.load(settings.controller, environ={})
    assert settings.watch and settings.host_capacity == 400 << 30
    assert options.debounce_s == 2 and options.key_prefix == "warmpool"
