"""The worker wire: framing, size bounds, peer uid checks, the socket directory, fd passing."""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import struct
from pathlib import Path

import msgpack
import pytest
import torch

from warmpool.errors import CapacityError, ConfigError, NotWarmError, ProtocolError, WorkerError
from warmpool.workers import protocol
from warmpool.workers.buffers import ShmFdBuffer, open_export
from warmpool.workers.devices import parse_device
from warmpool.workers.plan import shard_files
from warmpool.workers.protocol import (
    MAX_MESSAGE,
    Channel,
    FrameDecoder,
    check_peer,
    encode,
    error_reply,
    raise_for_error,
    socket_dir,
)


def pair() -> tuple[Channel, Channel]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Channel(a), Channel(b)


def test_messages_round_trip_as_msgpack_maps() -> None:
    a, b = pair()
    a.send({"op": "load", "layout": {"tensors": [["w", "BF16", [2, 3], 0, 12, "f", 80]]},
            "blob": b"\x00\xff"})
    message, fds = b.recv(timeout=5)  # type: ignore[misc]
    assert message == {"op": "load", "layout": {"tensors": [["w", "BF16", [2, 3], 0, 12, "f", 80]]},
                       "blob": b"\x00\xff"}
    assert fds == []


def test_frames_split_and_joined_arbitrarily_decode_the_same() -> None:
    frames = encode({"n": 1}) + encode({"n": 2, "pad": "x" * 5000}) + encode({"n": 3})
    decoder = FrameDecoder()
    got = []
    for i in range(0, len(frames), 7):
        decoder.feed(frames[i : i + 7])
        while (item := decoder.next()) is not None:
            got.append(item[0]["n"])
    assert got == [1, 2, 3]


def test_an_announced_length_over_the_bound_is_refused_before_reading_the_body() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="bound"):
        decoder.feed(struct.pack(">I", MAX_MESSAGE + 1))


def test_a_message_over_the_bound_is_refused_at_the_sender() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode({"blob": b"x" * (MAX_MESSAGE + 1)})


def test_a_body_that_is_not_a_map_is_refused() -> None:
    body = msgpack.packb([1, 2, 3])
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(ProtocolError, match="map"):
        decoder.next()


def test_garbage_is_refused_not_unpickled() -> None:
    import pickle

    body = pickle.dumps({"op": "ping"})
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(ProtocolError):
        decoder.next()


def test_a_connection_closed_mid_message_is_an_error() -> None:
    a, b = pair()
    a.sock.sendall(encode({"op": "ping"})[:-2])
    a.close()
    with pytest.raises(ProtocolError, match="middle"):
        b.recv(timeout=5)


def test_descriptors_travel_with_their_message(tmp_path: Path) -> None:
    a, b = pair()
    path = tmp_path / "f"
    path.write_bytes(b"hello")
    fd = os.open(path, os.O_RDONLY)
    a.send({"first": True})
    a.send({"with": "fd"}, [fd])
    os.close(fd)
    first, none = b.recv(timeout=5)  # type: ignore[misc]
    second, fds = b.recv(timeout=5)  # type: ignore[misc]
    assert first == {"first": True} and none == []
    assert second == {"with": "fd"} and len(fds) == 1
    assert os.read(fds[0], 5) == b"hello"
    os.close(fds[0])


def test_a_message_claiming_descriptors_that_never_came_is_refused() -> None:
    decoder = FrameDecoder()
    body = msgpack.packb({"op": "x", "_fds": 2})
    decoder.feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(ProtocolError, match="descriptors"):
        decoder.next()


def test_check_peer_accepts_our_own_uid() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    cred = check_peer(a)
    assert cred.uid == os.getuid() and cred.pid == os.getpid()


def test_check_peer_refuses_a_foreign_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    real = os.getuid()
    monkeypatch.setattr(protocol.os, "getuid", lambda: real + 4242)
    with pytest.raises(ProtocolError, match="not ours"):
        check_peer(a)


def test_socket_dir_is_created_private(tmp_path: Path) -> None:
    path = socket_dir(tmp_path / "rt")
    assert (path.stat().st_mode & 0o777) == 0o700


def test_socket_dir_with_a_loose_mode_is_refused_not_repaired(tmp_path: Path) -> None:
    path = socket_dir(tmp_path / "rt")
    os.chmod(path, 0o755)
    with pytest.raises(ConfigError, match="0700"):
        socket_dir(tmp_path / "rt")
    assert (path.stat().st_mode & 0o777) == 0o755


def test_socket_dir_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "rt").mkdir(mode=0o700)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "rt" / "workers").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="symlink"):
        socket_dir(tmp_path / "rt")


def test_errors_cross_the_wire_by_name_with_their_fields() -> None:
    with pytest.raises(CapacityError) as caught:
        raise_for_error(error_reply(CapacityError("no room", needed=10, free=3)))
    assert (caught.value.needed, caught.value.free) == (10, 3)
    with pytest.raises(NotWarmError):
        raise_for_error(error_reply(NotWarmError("cold")))
    with pytest.raises(WorkerError, match="KeyError"):
        raise_for_error(error_reply(KeyError("x")))


def test_shm_fd_buffer_is_sealed_and_exported_read_only() -> None:
    buffer = ShmFdBuffer(4096)
    assert buffer.tensor is not None
    buffer.tensor[:5].copy_(torch.tensor(list(b"bytes"), dtype=torch.uint8))
    buffer.seal()
    seals = fcntl.fcntl(buffer.fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_GROW
    export = buffer.export()
    fd = export.fds[0]
    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    with pytest.raises(PermissionError):
        mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    flat = open_export("shm-fd", export.handle, export.fds, "cpu:0")  # closes the fd
    assert bytes(flat[:5].tolist()) == b"bytes"
    buffer.free()
    assert bytes(flat[:5].tolist()) == b"bytes"  # the importer's mapping outlives the worker's


def test_devices_parse_by_kind_and_index() -> None:
    assert str(parse_device("cpu")) == "cpu:0"
    assert parse_device("cuda:3").name == "cuda3"
    with pytest.raises(ConfigError):
        parse_device("tpu:0")


def test_shard_files_group_by_rank_and_refuse_a_wrong_group_size() -> None:
    keys = [f"model-rank-{r}-part-{p}.safetensors" for r in range(2) for p in (1, 0)]
    assert shard_files(keys, 2) == [
        ["model-rank-0-part-0.safetensors", "model-rank-0-part-1.safetensors"],
        ["model-rank-1-part-0.safetensors", "model-rank-1-part-1.safetensors"]]
    with pytest.raises(ConfigError, match="sharded for ranks"):
        shard_files(keys, 4)
    assert shard_files(["w-0.st", "w-1.st"], 2, "w-{rank}.st") == [["w-0.st"], ["w-1.st"]]
