"""How clients find workers: one small JSON record per worker beside its socket.

``<runtime>/workers/<name>.json`` says which device (and GPU UUID) a worker serves, its
pid and its socket. Each worker writes its own record once it is listening, so a client
needs no supervisor to find it, and a record whose pid is gone is simply skipped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from warmpool.errors import WorkerError
from warmpool.pool.registry.files import atomic_write
from warmpool.workers.devices import normalise_uuid
from warmpool.workers.protocol import socket_dir


@dataclass(frozen=True)
class WorkerRecord:
    name: str  # "cuda0", "cpu1": also the socket's and the record's file name
    device: str  # "cuda:0" as the worker numbers it; the registry's device field
    uuid: str  # the GPU's UUID (without "GPU-"), or the device itself for cpu:N
    pid: int
    socket: str
    transport: str  # what the worker prefers: auto, cuda-vmm, cuda-ipc, shm-fd
    capacity: int | None = None
    started_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> WorkerRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})  # type: ignore[arg-type]

    @property
    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def record_path(runtime_dir: Path, name: str) -> Path:
    return socket_dir(runtime_dir) / f"{name}.json"


def write_record(runtime_dir: Path, record: WorkerRecord) -> None:
    atomic_write(record_path(runtime_dir, record.name), json.dumps(record.to_json()).encode())


def remove_record(runtime_dir: Path, record: WorkerRecord) -> None:
    """Remove our record, unless a successor already replaced it."""
    path = record_path(runtime_dir, record.name)
    try:
        if json.loads(path.read_text()).get("pid") == record.pid:
            path.unlink(missing_ok=True)
    except (OSError, ValueError):
        pass


def read_records(runtime_dir: Path, *, live_only: bool = True) -> list[WorkerRecord]:
    records = []
    for path in sorted(socket_dir(runtime_dir).glob("*.json")):
        try:
            record = WorkerRecord.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if not live_only or record.alive:
            records.append(record)
    return records


def find_worker(runtime_dir: Path, uuid: str, device: str = "") -> WorkerRecord:
    """The live worker serving the device with ``uuid``."""
    wanted = normalise_uuid(uuid)
    for record in read_records(runtime_dir):
        if normalise_uuid(record.uuid) == wanted:
            return record
    label = f"{device} ({uuid})" if device and device != uuid else uuid
    raise WorkerError(f"no running worker serves {label}; start them with "
                      "`warmpool workers start` (and check `warmpool workers status`)")
