"""Errors that must say what happened: not a Redis outage, not "not warm", not a
generic worker failure with the fields stripped."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.controller_harness import KEYS, Harness, ask, wait_until
from tests.models import write_model
from warmpool.attachment import attach
from warmpool.config import Settings
from warmpool.errors import (
    CapacityError,
    IncompleteModelError,
    NotWarmError,
    ObjectNotFoundError,
    SafetensorsError,
    StorageError,
    WorkerError,
)
from warmpool.workers.protocol import Channel, error_reply, ok, raise_for_error


async def test_dangling_link_in_a_local_model_is_answered_failed(harness: Harness,
                                                                tmp_path: Path) -> None:
    """The user gets: a ``failed`` reply naming the dangling file, at once; the request
    is acknowledged (not redelivered until dead-lettered as poison) and the log does
    not blame Redis."""
    model = tmp_path / "m"
    write_model(model, shards=1)
    (model / "tokenizer.model").symlink_to(model / "gone.bin")  # dangling, inside the model
    ctl = await harness.start()
    await harness.xadd(ask("deploy", f"file://{model}", request_id="dangling"))
    reply = await harness.reply("dangling")
    assert reply["state"] == "failed"
    assert "tokenizer.model" in reply["error"]
    assert await harness.dead() == []

    async def acknowledged() -> bool:  # the reply goes out just before the acknowledgement
        info = await harness.redis.xpending(KEYS.requests_stream, KEYS.consumer_group)
        return bool(info["pending"] == 0)

    await wait_until(acknowledged, "the request to be acknowledged")
    assert ctl.metrics.rejected._metrics == {}  # nothing refused as poison


@pytest.mark.parametrize("error", [
    StorageError("s3://b/m/: access went wrong", key="model-00001-of-00002.safetensors"),
    ObjectNotFoundError("gone", key="config.json"),
    IncompleteModelError("not complete", missing=["model-00002-of-00002.safetensors"]),
    SafetensorsError("header is not JSON", file="model.safetensors", tensor="w"),
    SafetensorsError("truncated", file="model.safetensors"),
    CapacityError("no room", needed=10, free=3),
], ids=lambda e: type(e).__name__)
def test_errors_keep_class_message_and_fields_over_a_socket(error: Exception) -> None:
    """The user gets: from a worker, the same error a local call raises (class, message,
    ``key``/``missing``/``file``/``tensor``/``needed``/``free``), to act on."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a, b = Channel(left), Channel(right)
    try:
        a.send(error_reply(error))
        received = b.recv(timeout=10)
        assert received is not None
        with pytest.raises(type(error)) as caught:
            raise_for_error(received[0])
    finally:
        a.close()
        b.close()
    assert type(caught.value) is type(error)
    assert str(caught.value) == str(error)
    assert vars(caught.value) == vars(error)


@pytest.mark.parametrize("bad", [
    {"type": "SafetensorsError", "message": "m", "file": 7},
    {"type": "IncompleteModelError", "message": "m", "missing": "not-a-list"},
    {"type": "CapacityError", "message": "m", "needed": True},
    {"type": "ImportError", "message": "m"},
    ["not", "a", "map"],
], ids=["file-int", "missing-str", "needed-bool", "foreign-class", "not-a-map"])
def test_a_malformed_error_reply_is_a_worker_error(bad: object) -> None:
    """The user gets: a :class:`WorkerError` naming what the worker sent, never a crash
    in the client or an error with fields of the wrong type."""
    with pytest.raises(WorkerError):
        raise_for_error({"ok": False, "error": bad})
    raise_for_error(ok())  # and a good reply raises nothing


def test_attach_lets_a_programming_error_through(settings: Settings) -> None:
    """The user gets: ``attach(123)`` fails as the bug it is (``TypeError``), not as
    ``NotWarmError`` that sends them looking for a model to prefetch."""
    with pytest.raises(TypeError):
        attach(123, settings=settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("ref", ["", "\x00", "s3://", "s3://b/\x00k", "gs:///x"])
def test_attach_of_an_unparsable_ref_is_not_warm(settings: Settings, ref: str) -> None:
    """The user gets: :class:`NotWarmError` saying the ref is neither a URI nor a hash."""
    with pytest.raises(NotWarmError, match="neither a model URI nor a content hash"):
        attach(ref, settings=settings)
