"""Pool entries, their states, and the one interface every registry store implements.

The registry is the single source of truth that ``warmpool status`` and dashboards read.
Two stores implement it: :mod:`warmpool.pool.registry.files` (a private local directory, the
embedded default) and :mod:`warmpool.pool.registry.redis` (cluster-wide, for the controller).
"""

from __future__ import annotations

import abc
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any

log = logging.getLogger(__name__)


class State(str, Enum):
    PENDING = "pending"
    FETCHING_METADATA = "fetching_metadata"
    STREAMING = "streaming"
    WARM = "warm"
    FAILED = "failed"
    EVICTED = "evicted"
    LOST = "lost"  # its worker died; the memory is gone with it

    @property
    def holds_memory(self) -> bool:
        """States whose bytes count against a tier's capacity."""
        return self in (State.STREAMING, State.WARM)

    @property
    def active(self) -> bool:
        return self in (State.PENDING, State.FETCHING_METADATA, State.STREAMING)


def entry_key(content_hash: str, device: str) -> str:
    return f"{content_hash}@{device}"


@dataclass
class PoolEntry:
    """One model on one device of one node."""

    uri: str
    content_hash: str
    device: str = "cpu"
    state: State = State.PENDING
    node: str = ""
    bytes: int = 0
    tensors: int = 0
    transport: str = ""  # "shm", "cuda-vmm", "cuda-ipc": how attach reaches the buffer
    loader: str = ""  # "runai" or "native": what streamed it
    error: str | None = None
    pinned: bool = False
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    last_attached_at: float | None = None
    history: list[tuple[str, float]] = field(default_factory=list)
    leases: int = 0  # filled in when read; not stored
    #: Other URIs whose files are byte-for-byte these (the same content hash): one copy
    #: is resident, and each name is attached, listed and released on its own.
    aliases: list[str] = field(default_factory=list)
    #: An engine-layout entry's key (:class:`warmpool.engine_layouts.EngineKey` as
    #: JSON): the engine's processed parameters, not the checkpoint's tensors. None for
    #: a checkpoint entry.
    engine: dict[str, Any] | None = None
    #: Of ``bytes``, how many came from peers (NIXL) instead of the model's store.
    peer_bytes: int = 0

    @property
    def key(self) -> str:
        return entry_key(self.content_hash, self.device)

    @property
    def uris(self) -> list[str]:
        """Every URI that names these bytes, ``uri`` first."""
        return [self.uri, *self.aliases]

    def moved_to(self, state: State, **changes: Any) -> PoolEntry:
        """A copy in ``state``, with the transition stamped into its history."""
        now = time.time()
        history = [*self.history, (state.value, now)]
        return replace(self, state=state, updated_at=now, history=history, **changes)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        data["history"] = [list(h) for h in self.history]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PoolEntry:
        """Rebuild an entry read from a file or Redis, checked as untrusted: a value of
        the wrong type or an unknown state raises ValueError here, not later in a sum
        or a table that ``status`` prints."""
        if not isinstance(data, dict):
            raise TypeError("an entry is a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["state"] = State(values["state"])
        values["history"] = [(str(s), float(t)) for s, t in values.get("history", [])]
        for name, kinds in _FIELD_TYPES.items():
            if name in values and not (isinstance(values[name], kinds)
                                       and not (isinstance(values[name], bool)
                                                and bool not in kinds)):
                raise ValueError(f"field {name!r} is {type(values[name]).__name__}")
        return cls(**values)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "uri": (str,), "content_hash": (str,), "device": (str,), "node": (str,),
    "bytes": (int,), "tensors": (int,), "transport": (str,), "loader": (str,),
    "error": (str, type(None)), "pinned": (bool,), "created_at": (int, float),
    "updated_at": (int, float), "last_attached_at": (int, float, type(None)),
    "leases": (int,), "peer_bytes": (int,),
}


def parse_entry(raw: bytes | str, where: str) -> PoolEntry | None:
    """The entry in ``raw``, or None (logged) when it is not one: a corrupt or foreign
    record is skipped and reported, and never breaks the listing of every other."""
    try:
        return PoolEntry.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        log.warning("skipping bad pool entry %s: %s", where, exc,
                    extra={"event": "bad_record", "record": where})
        return None


class Registry(abc.ABC):
    """Where pool entries are kept. Writes replace a whole entry; keys are entry_key()."""

    @abc.abstractmethod
    async def get(self, key: str) -> PoolEntry | None: ...

    @abc.abstractmethod
    async def put(self, entry: PoolEntry) -> None: ...

    @abc.abstractmethod
    async def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    async def list(self) -> list[PoolEntry]: ...

    async def transition(self, entry: PoolEntry, state: State, **changes: Any) -> PoolEntry:
        """Move ``entry`` to ``state``, stamp it, and write it; returns the new entry."""
        moved = entry.moved_to(state, **changes)
        await self.put(moved)
        return moved

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
