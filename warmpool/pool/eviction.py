"""The eviction policy, in one place for every tier: which models make way, and which
old versions a new one retires.

Pure functions over plain values, so the host tier (:class:`~warmpool.pool.entries.Pool`)
and the GPU workers (:mod:`warmpool.workers.residents`) apply the same rule and a test
can pin it down without a pool:

* Room for a new model is made before any byte is streamed, by evicting warm models
  that no lease holds and no pin keeps, least recently attached (or created) first. If
  even all of them are not enough the load is refused at once, naming the needed and
  free bytes — never half-way through a stream.
* A new version of a URI retires every other warm version of it on that device,
  pinned or not: a pin is on the model (its URI), not on one version of its bytes, so it
  moves to the new version. Otherwise a pinned old version would stay resident for good,
  reachable only by its hash. A version that is leased is retired when its lease ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from warmpool.errors import CapacityError
from warmpool.pool.registry.base import PoolEntry, State

T = TypeVar("T")


@dataclass(frozen=True)
class Candidate(Generic[T]):
    """One resident model as the policy sees it; ``item`` is the caller's own object."""

    item: T
    nbytes: int
    evictable: bool  # warm, no live lease, not pinned
    last_used: float  # last attach, or creation when never attached


def choose_victims(candidates: Iterable[Candidate[T]], needed: int, room: int, *,
                   who: str, device: str) -> list[T]:
    """What to evict so that ``needed`` bytes fit in ``room`` plus what the victims free;
    raises :class:`CapacityError` when even every evictable model is not enough."""
    room = max(0, room)
    if needed <= room:
        return []
    victims: list[T] = []
    freed = 0
    for candidate in sorted((c for c in candidates if c.evictable), key=lambda c: c.last_used):
        if needed <= room + freed:
            break
        victims.append(candidate.item)
        freed += candidate.nbytes
    if needed > room + freed:
        raise CapacityError(
            f"{who} needs {needed} bytes on {device}; {room} are free and only {freed} more "
            "could be evicted (the rest is leased, pinned or still streaming)",
            needed=needed, free=room + freed)
    return victims


def entry_candidate(entry: PoolEntry) -> Candidate[PoolEntry]:
    """A registry entry (leases filled in, as :meth:`Pool.entries` returns them)."""
    return Candidate(entry, entry.bytes,
                     entry.state == State.WARM and not entry.pinned and entry.leases == 0,
                     entry.last_attached_at or entry.created_at)


def superseded(entries: Sequence[PoolEntry], current: PoolEntry,
               uri: str | None = None) -> list[PoolEntry]:
    """The versions that ``current`` (just warm as ``uri``, default its own) retires:
    every other warm version that URI names on its device, pinned or leased included —
    the caller evicts the free ones now and the leased ones when their leases end, and
    only drops the name from a version that another URI still names."""
    return [e for e in entries
            if e.device == current.device and e.content_hash != current.content_hash
            and e.state == State.WARM and (uri or current.uri) in e.uris]


def layouts_of(entries: Sequence[PoolEntry], checkpoint: PoolEntry) -> list[PoolEntry]:
    """The engine layouts made from ``checkpoint``'s bytes on its device: they go with
    it (evicted, or retired when leased), so that no layout of an evicted or superseded
    checkpoint stays attachable under its URI."""
    if checkpoint.engine is not None:
        return []
    return [e for e in entries
            if e.engine is not None and e.engine.get("checkpoint") == checkpoint.content_hash
            and e.device == checkpoint.device
            and e.state in (State.WARM, State.FAILED, State.LOST)]


def inherits_pin(retired: Iterable[PoolEntry]) -> bool:
    """Whether the new version takes over a pin from the versions it retires."""
    return any(e.pinned for e in retired)
