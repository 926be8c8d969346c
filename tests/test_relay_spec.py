"""Relay settings from the config file's ``relays:`` list: what is refused, and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from warmpool.config import Settings
from warmpool.errors import ConfigError
from warmpool.relay.spec import parse_specs, read_token
from warmpool.relay.sqs import region_of, unwrap


def test_a_config_file_lists_relays_and_bad_entries_are_refused_by_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WARMPOOL_RELAY_TOKEN", raising=False)
    config = tmp_path / "w.yaml"
    config.write_text("relays:\n  - kind: sqs\n    queue_url: https://sqs.eu-west-1.amazonaws"
                      ".com/1/q\n  - kind: http\n    listen: 127.0.0.1:0\n    insecure: true\n")
    specs = parse_specs(Settings.load(config).relays)
    assert [(s.kind, s.label) for s in specs] == [("sqs", "sqs"), ("http", "http")]
    for entries, message in (
            ([{"kind": "kafka"}], "relay kind 'kafka'"),
            ([{"kind": "sqs"}], "needs queue_url"),
            ([{"kind": "sqs", "queue_url": "u", "wait_s": 30}], "0 to 20 seconds"),
            ([{"kind": "sqs", "queue_url": "u", "queue": "x"}], "unknown relay setting(s) 'queue'"),
            ([{"kind": "http", "listen": "0.0.0.0:80", "insecure": True}], "loopback"),
            ([{"kind": "http", "listen": "127.0.0.1:80"}], "shared secret"),
            ([{"kind": "http", "listen": "nope", "insecure": True}], "HOST:PORT"),
            ([{"kind": "sqs", "queue_url": "a"}, {"kind": "sqs", "queue_url": "b"}],
             "share a name")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_specs(tuple(entries))
    with pytest.raises(ConfigError, match="'relays' must be a list"):
        Settings.load(None, relays={"kind": "sqs"})


def test_the_secret_comes_from_a_file_or_the_environment(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("  abc \n")
    (tmp_path / "t").chmod(0o600)
    assert read_token(tmp_path / "t", {"WARMPOOL_RELAY_TOKEN": "env"}) == "abc"
    assert read_token(None, {"WARMPOOL_RELAY_TOKEN": " env "}) == "env"
    assert read_token(None, {}) is None
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "empty").chmod(0o600)
    with pytest.raises(ConfigError, match="is empty"):
        read_token(tmp_path / "empty", {})


def test_queue_urls_name_their_region_and_sns_envelopes_are_unwrapped() -> None:
    assert region_of("https://sqs.eu-west-1.amazonaws.com/123/q") == "eu-west-1"
    assert region_of("https://ap-south-1.queue.amazonaws.com/123/q") == "ap-south-1"
    assert region_of("http://127.0.0.1:5000/123/q") is None
    inner = '{"Records": []}'
    envelope = ('{"Type": "Notification", "TopicArn": "arn:aws:sns:x", "Message": '
                '"{\\"Records\\": []}"}')
    assert unwrap(envelope) == inner.encode()
    assert unwrap(inner) == inner.encode()
    assert unwrap("not json") == b"not json"


def test_every_boolean_is_a_real_boolean_and_numbers_are_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``insecure: "false"`` once turned authentication off (a non-empty string is true)."""
    monkeypatch.delenv("WARMPOOL_RELAY_TOKEN", raising=False)
    config = tmp_path / "w.yaml"
    config.write_text('relays:\n  - kind: http\n    listen: 127.0.0.1:0\n'
                      '    insecure: "false"\n')
    with pytest.raises(ConfigError, match=r"relays\[http\]\.insecure: 'false' is not true "
                                          "or false"):
        parse_specs(Settings.load(config).relays)
    for entry, message in (
            ({"allow_force": "yes"}, "allow_force: 'yes' is not true or false"),
            ({"allow_local_paths": 1}, "allow_local_paths: 1 is not true or false"),
            ({"rate": "fast"}, "rate: 'fast' is not a number"),
            ({"burst": 1.5}, "burst: 1.5 is not an integer"),
            ({"rate": float("nan")}, "rate nan"),
            ({"max_connections": 0}, "max_connections 0"),
            ({"max_body": 0}, "max_body 0"),
            ({"request_prefixes": "s3://a/"}, "is not a list of strings"),
            ({"allowed_origins": [1]}, "is not a list of strings")):
        raw = {"kind": "http", "listen": "127.0.0.1:0", "insecure": True, **entry}
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(
                "]", r"\]").replace("(", r"\(")):
            parse_specs((raw,))
    config.write_text("streamer:\n  distributed: \"false\"\n")
    with pytest.raises(ConfigError, match="distributed in .*'false' is not usable: not a "
                                          "boolean"):
        Settings.load(config)
    config.write_text("streamer:\n  distributed: false\n")
    assert Settings.load(config).streamer.distributed is False


def test_token_files_must_be_private_and_tokens_long(tmp_path: Path) -> None:
    token = tmp_path / "t"
    token.write_text("a-long-enough-relay-token\n")
    token.chmod(0o640)
    with pytest.raises(ConfigError, match="mode 0640: other users may read it; chmod 600"):
        read_token(token, {})
    token.chmod(0o600)
    assert read_token(token, {}) == "a-long-enough-relay-token"
    raw = {"kind": "http", "listen": "127.0.0.1:0", "token_file": str(token),
           "requests_token_file": str(token)}
    with pytest.raises(ConfigError, match="requests token must differ"):
        parse_specs((raw,))
    short = tmp_path / "short"
    short.write_text("short")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="is 5 bytes; use at least 16"):
        parse_specs(({"kind": "http", "listen": "127.0.0.1:0", "token_file": str(short)},))
