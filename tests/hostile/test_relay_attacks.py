"""The webhook relay attacked as a web page, a stranger on the network and a slow client
would: each case is one that 0.2's relay lost (issue: hardening, part three).

Every case runs ``warmpool relay http`` as a real process against a real Redis, and
checks what reached the requests stream, not only the status code.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import redis

from tests.cli_process import Relay, relays  # noqa: F401 - the fixture
from tests.poll import poll
from tests.redis_server import RedisServer, free_port
from tests.test_relay_http import (
    KEYS,
    REQUESTS_TOKEN,
    TOKEN,
    post,
    s3_record,
    start_http,
    stream_payloads,
)

EVICT_FORCE = json.dumps({"action": "evict", "uri": "s3://models/llama/",
                          "force": True}).encode()
DEPLOY_ETC = json.dumps({"action": "deploy", "uri": "file:///etc/"}).encode()
#: One request that would warm the model on every node of the fleet.
DEPLOY_ALL = json.dumps({"action": "deploy", "uri": "s3://models/llama/",
                         "nodes": "all"}).encode()
UPLOAD = json.dumps({"Records": [s3_record("llama/config.json")]}).encode()


def raw_post(port: int, head: bytes, body: bytes = b"", *, timeout: float = 10.0) -> bytes:
    """Send bytes as they are (urllib would refuse them); the answer's first line."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + b"\r\n" + body)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.split(b"\r\n", 1)[0]


def head(port: int, *lines: bytes, length: int = 0) -> bytes:
    base = [b"POST / HTTP/1.1", b"Host: 127.0.0.1:%d" % port,
            b"Content-Type: application/json", b"Content-Length: %d" % length, *lines]
    return b"\r\n".join(base) + b"\r\n"


def test_a_web_page_cannot_drive_an_insecure_loopback_relay(
        relays: Callable[..., Relay], redis_server: RedisServer) -> None:
    """The cross-site shapes: a form-like text/plain POST, a JSON POST with a foreign
    Origin, and a DNS-rebinding Host; and requests with force or a local path."""
    relay, url = start_http(relays, redis_server.url, "--insecure", token=None)
    port = int(url.rsplit(":", 1)[1])
    for headers, status, reason in (
            ({"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
            ({"Content-Type": "application/x-www-form-urlencoded"}, 415,
             "unsupported_media_type"),
            ({"Origin": "http://evil.example"}, 403, "cross_origin"),
            ({"Origin": "null"}, 403, "cross_origin"),
            ({"Host": f"evil.example:{port}"}, 403, "bad_host")):
        for body, path, token in ((UPLOAD, "/", None), (EVICT_FORCE, "/requests",
                                                         REQUESTS_TOKEN)):
            got, answer = post(url, body, token=token, headers=headers, path=path)
            assert (got, answer.get("reason")) == (status, reason), (headers, path)
    # With its token, a request still may not force an evict, name a local path, or ask
    # for every node of the fleet.
    for body, reason in ((EVICT_FORCE, "force_refused"), (DEPLOY_ETC, "local_path_refused"),
                         (DEPLOY_ALL, "fleet_refused")):
        got, answer = post(url, body, token=REQUESTS_TOKEN, path="/requests")
        assert (got, answer["reason"]) == (403, reason)
    # Requests are not taken on the notification path, even with no secret there.
    got, answer = post(url, EVICT_FORCE, token=None)
    assert (got, answer["reason"]) == (403, "not_accepted")
    client = redis.Redis.from_url(redis_server.url)
    assert client.xlen(KEYS.requests_stream) == 0
    assert post(url, UPLOAD, token=None)[0] == 200  # the real sender still works
    assert client.xlen(KEYS.requests_stream) == 1
    client.close()
    assert relay.proc.poll() is None


def test_requests_need_their_own_token_and_the_operator_s_leave(
        relays: Callable[..., Relay], redis_server: RedisServer) -> None:
    # No requests token: POST /requests does not exist.
    _relay, url = start_http(relays, redis_server.url, requests_token=None)
    got, _answer = post(url, EVICT_FORCE, token=TOKEN, path="/requests")
    assert got in (404, 405)
    # With one: the notification token does not open it, nor the reverse.
    _relay, url = start_http(relays, redis_server.url, "--allow-force", "--allow-fleet",
                             "--request-prefix", "s3://models/")
    assert post(url, EVICT_FORCE, token=TOKEN, path="/requests")[0] == 401
    assert post(url, UPLOAD, token=REQUESTS_TOKEN)[0] == 401
    elsewhere = json.dumps({"action": "deploy", "uri": "s3://other/m/"}).encode()
    got, answer = post(url, elsewhere, token=REQUESTS_TOKEN, path="/requests")
    assert (got, answer["reason"]) == (403, "prefix_refused")
    assert post(url, EVICT_FORCE, token=REQUESTS_TOKEN, path="/requests")[0] == 200
    assert post(url, DEPLOY_ALL, token=REQUESTS_TOKEN, path="/requests")[0] == 200
    client = redis.Redis.from_url(redis_server.url)
    assert stream_payloads(client) == [EVICT_FORCE, DEPLOY_ALL]
    client.close()


def test_unwatched_uploads_and_control_characters_never_reach_the_stream(
        relays: Callable[..., Relay], redis_server: RedisServer) -> None:
    relay, url = start_http(relays, redis_server.url)
    unwatched = json.dumps({"Records": [s3_record("llama/config.json",
                                                  bucket="not-watched")]}).encode()
    got, answer = post(url, unwatched)
    assert (got, answer["status"], answer["reason"]) == (202, "ignored", "not_watched")
    newline = json.dumps({"Records": [s3_record("llama%0Aforged/config.json")]}).encode()
    got, answer = post(url, newline)
    assert (got, answer["reason"]) == (403, "control_chars")
    # urlsplit would drop the tab and name s3://models/ab/: refused by the parser.
    deploy = json.dumps({"action": "deploy", "uri": "s3://models/a\tb/"}).encode()
    got, answer = post(url, deploy, token=REQUESTS_TOKEN, path="/requests")
    assert (got, answer["reason"]) == (400, "bad_uri")
    client = redis.Redis.from_url(redis_server.url)
    assert client.xlen(KEYS.requests_stream) == 0
    assert [f[b"reason"] for _i, f in client.xrange(KEYS.dead_stream)] == [
        b"control_chars", b"bad_uri"]  # the unwatched one is dropped, not dead
    client.close()


def test_slow_clients_are_cut_off_and_a_real_sender_still_gets_through(
        relays: Callable[..., Relay], redis_server: RedisServer) -> None:
    """60 connections that send their headers a byte at a time, against a relay with
    64 file descriptors: each is closed after the header timeout, the sender's posts
    are answered, and the log stays a few lines long."""
    port = free_port()
    relay = relays("http", "--listen", f"127.0.0.1:{port}", "--redis", redis_server.url,
                   "--header-timeout", "2",
                   env={"WARMPOOL_RELAY_TOKEN": TOKEN, "WARMPOOL_WATCH": "s3://models/"},
                   ready="relay_listening", max_files=64)
    url = f"http://127.0.0.1:{port}"
    assert relay.events("relay_listening")[0]["max_connections"] == 32
    slow: list[socket.socket] = []
    request = head(port, b"Authorization: Bearer " + TOKEN.encode(), length=len(UPLOAD))
    try:
        for _ in range(60):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(request[:1])
            slow.append(sock)
        answered = []
        for _ in range(5):
            t0 = time.monotonic()
            status, _answer = post(url, UPLOAD)
            answered.append((status, time.monotonic() - t0))
            # the slow ones go on trickling
            for sock in list(slow):
                try:
                    sock.sendall(request[1 + len(answered): 2 + len(answered)])
                except OSError:
                    slow.remove(sock)
                    sock.close()
        assert all(status == 200 and took < 5 for status, took in answered), answered
        # Every slow connection is closed by the server within the header timeout.
        deadline = time.monotonic() + 15
        while slow and time.monotonic() < deadline:
            for sock in list(slow):
                sock.settimeout(0.2)
                try:
                    if sock.recv(1) == b"":
                        slow.remove(sock)
                        sock.close()
                except (TimeoutError, socket.timeout):
                    pass
                except OSError:
                    slow.remove(sock)
        assert not slow, f"{len(slow)} slow connections still open"
    finally:
        for sock in slow:
            sock.close()
    assert relay.proc.poll() is None
    lines = relay.text().splitlines()
    assert len(lines) < 40, f"{len(lines)} log lines"
    assert "out of system resource" not in relay.text() or relay.text().count(
        "out of system resource") < 5


def test_unauthenticated_floods_do_not_use_up_the_senders_rate(
        relays: Callable[..., Relay], redis_server: RedisServer) -> None:
    _relay, url = start_http(relays, redis_server.url, "--rate", "5", "--burst", "10")
    for _ in range(40):
        assert post(url, UPLOAD, token="wrong-token-of-a-stranger")[0] == 401
    statuses = [post(url, UPLOAD)[0] for _ in range(8)]
    assert statuses == [200] * 8


def test_bad_authorization_bytes_get_400_and_no_secret_reaches_any_log(
        relays: Callable[..., Relay], redis_server: RedisServer) -> None:
    relay, url = start_http(relays, redis_server.url)
    port = int(url.rsplit(":", 1)[1])
    secret = TOKEN.encode()
    cases = [
        head(port, b"Authorization: Bearer \xff\xfe" + secret),  # not UTF-8
        head(port, b"Authorization: Bearer " + secret + b"\x00x"),  # a NUL
        head(port, b"X-Other: \x00", b"Authorization: Bearer " + secret),
        head(port, b"Authorization: Bearer " + secret + b"\x7f\x01"),
    ]
    for case in cases:
        first = raw_post(port, case)
        assert first.split(b" ")[1].startswith(b"4"), (case, first)
    assert post(url, UPLOAD)[0] == 200
    relay.terminate()
    text = relay.text()
    assert TOKEN not in text
    assert "Traceback" not in text
    assert redis_server.log.exists() and TOKEN not in redis_server.log.read_text(
        errors="replace")


def test_a_paused_redis_is_answered_503_within_seconds(
        relays: Callable[..., Relay], redis_server: RedisServer) -> None:
    _relay, url = start_http(relays, redis_server.url)
    assert post(url, UPLOAD)[0] == 200
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        status, answer = post(url, UPLOAD)
        took = time.monotonic() - t0
        assert (status, answer["status"]) == (503, "unavailable")
        assert took < 8, f"answered after {took:.1f} s"
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    assert poll(lambda: post(url, UPLOAD)[0] == 200, "the relay to relay again")


def test_relay_settings_that_would_turn_a_limit_off_are_refused_in_one_line(
        relays: Callable[..., Relay], redis_server: RedisServer, tmp_path: Path) -> None:
    readable = tmp_path / "readable-token"
    readable.write_text(TOKEN)
    readable.chmod(0o644)
    short = tmp_path / "short-token"
    short.write_text("tooshort")
    short.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARMPOOL_RELAY")}
    for args, expected in (
            (["--metrics-port", "70000", "--insecure"], "--metrics-port 70000"),
            (["--rate", "nan", "--insecure"], "rate nan"),
            (["--rate", "inf", "--insecure"], "rate inf"),
            (["--max-body", "0", "--insecure"], "max_body 0"),
            (["--header-timeout", "0", "--insecure"], "header_timeout_s 0"),
            (["--token-file", str(readable)], "other users may read it"),
            (["--token-file", str(short)], "use at least 16"),
            (["--insecure", "--request-prefix", "ftp://x/"], "request_prefixes")):
        relay = relays("http", "--redis", redis_server.url, *args, env=env)
        assert relay.proc.wait(timeout=60) == 2, args
        text = relay.text()
        assert expected in text, (args, text)
        assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
