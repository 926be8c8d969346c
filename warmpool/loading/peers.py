"""Filling a buffer from peers: the nodes that already hold the model's bytes.

A node about to read a model from its bucket first looks for *seeds* of the same content
hash (:mod:`warmpool.contract.seeds`) and, when it finds some, reads the buffer from them
over NIXL instead:

1. It asks each seed's node for a lease (``p:peer-asks:<node>``) and keeps a key alive
   while it reads (``p:peer-reading:<id>``); the seeder holds a pool lease on the
   reader's behalf until the key is deleted or expires, so an eviction never takes the
   bytes from under a read (a *forced* eviction can: the checksums catch it).
2. Ranges are handed out one at a time to a thread per peer (up to ``max_peers``), so a
   fast peer takes more of them; a peer that disconnects, fails a transfer or stalls past
   ``timeout_s`` leaves its ranges to the others.
3. Every range is checked against the seed's xxh3_128 before it counts. A range no peer
   could give, or whose checksum was wrong, is left to the store: the caller reads the
   files it overlaps from the bucket (:attr:`PeerFill.missing`). Nothing is published
   until the caller has every byte.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from redis.exceptions import RedisError

from warmpool.config import PeerSettings, Settings
from warmpool.contract.keys import RedisKeys
from warmpool.contract.seeds import Seed, decode_metadata, ranges
from warmpool.errors import PeerError
from warmpool.loading.stats import STATS
from warmpool.pool.layout import Layout
from warmpool.pool.layout_index import encode
from warmpool.threads import to_thread_joined

if TYPE_CHECKING:
    import torch

    from warmpool.pool.entries import Pool

log = logging.getLogger(__name__)

_RELEASE = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('del', KEYS[1]) else return 0 end")

#: How long a seeder has to answer an ask before the reader turns to others.
GRANT_WAIT_S = 5.0
#: The reading key's lifetime; it is renewed at a third of it while the read goes on.
READING_TTL_MS = 15_000


def layout_digest(layout: Layout) -> str:
    """The identity of a buffer's layout: two nodes place a model's tensors at the same
    offsets only if they agree on it (same content hash, same planner)."""
    return hashlib.sha256(encode(layout)).hexdigest()[:32]


@dataclass
class PeerFill:
    """What the peers gave: the caller reads ``missing`` files from the store (None: no
    peer had the model, read everything)."""

    missing: list[str] | None
    peer_bytes: int = 0
    peers: tuple[str, ...] = ()
    fallbacks: int = 0  # ranges a peer failed to give (died, evicted, stalled)
    mismatches: int = 0  # ranges whose bytes did not match the seed's checksum
    seconds: float = 0.0
    #: Ranges that came from peers, rechecked by :meth:`PeerSource.verify` at the end.
    good: list[int] = field(default_factory=list)
    sums: tuple[str, ...] = ()
    range_bytes: int = 0


@dataclass
class _Grant:
    seed: Seed
    metadata: bytes
    ask_id: str


class PeerSource:
    """Reads a model's buffer from the fleet's seeds (this node's own are skipped)."""

    def __init__(self, redis: Redis, keys: RedisKeys, node: str,
                 settings: PeerSettings, agent_name: str | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.node = node
        self.settings = settings
        #: this process's agent: the node's name in a controller, ``<node>@<device>`` in
        #: a worker (one agent per process, and names must not collide between them)
        self.agent_name = agent_name or node

    async def seeds(self, content_hash: str) -> list[Seed]:
        """The live seeds of ``content_hash`` on other nodes; a listed node whose seed
        expired is dropped from the list."""
        nodes = sorted(_text(n) for n in
                       await self.redis.smembers(self.keys.seeds(content_hash)))
        nodes = [n for n in nodes if n != self.node]
        if not nodes:
            return []
        raws = await self.redis.mget([self.keys.seed(content_hash, n) for n in nodes])
        found = []
        for node, raw in zip(nodes, raws, strict=True):
            if raw is None:
                await self.redis.srem(self.keys.seeds(content_hash), node)
                continue
            try:
                seed = Seed.from_json(raw)
            except (ValueError, TypeError) as exc:
                log.warning("ignoring the seed of %s on %s: %s", content_hash[:12], node,
                            exc, extra={"event": "bad_seed", "node": node})
                continue
            if seed.node == node and seed.content_hash == content_hash:
                found.append(seed)
        return found

    async def fill(self, layout: Layout, target: torch.Tensor, *,
                   progress: Callable[[int], None] | None = None,
                   seeds: list[Seed] | None = None) -> PeerFill:
        """Read ``target`` (laid out as ``layout``) from peers as far as they can give
        it; see the module's docstring."""
        started = time.perf_counter()
        digest = layout_digest(layout)
        if seeds is None:
            seeds = await self.seeds(layout.content_hash)
        # A seed in a worker's device memory serves as well: NIXL reads VRAM into DRAM.
        usable = [s for s in seeds
                  if s.total_bytes == layout.total_bytes and s.layout_digest == digest]
        if len(usable) < len(seeds):
            log.info("%d seed(s) of %s follow another layout; not used",
                     len(seeds) - len(usable), layout.content_hash[:12])
        # Ask a few more than needed (some may be busy or gone); the spare grants are
        # handed back at once, so their seeders do not hold leases for nothing.
        grants = await self._ask(usable[: self.settings.max_peers * 2])
        grants, spare = grants[: self.settings.max_peers], grants[self.settings.max_peers:]
        if spare:
            await self._done(spare)
        asked = time.perf_counter()
        if not grants:
            return PeerFill(missing=None)
        keeper = asyncio.create_task(self._renew(
            [self.keys.peer_reading(g.ask_id) for g in grants], READING_TTL_MS))
        try:
            result = await self._read(layout, target, grants, progress)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            await self._done(grants)
        result.seconds = time.perf_counter() - started
        log.info("%s: %d bytes from %d peer(s) in %.2f s (asking %.2f s), %d file(s) left "
                 "to the store", layout.content_hash[:12], result.peer_bytes,
                 len(result.peers), result.seconds, asked - started,
                 len(result.missing or ()),
                 extra={"event": "peer_fill", "peers": list(result.peers),
                        "bytes": result.peer_bytes, "seconds": round(result.seconds, 3),
                        "fallbacks": result.fallbacks, "mismatches": result.mismatches})
        STATS.count(result.fallbacks, result.mismatches,
                    result.peer_bytes / result.seconds if result.peer_bytes else None)
        return result

    # --- the first fill ---------------------------------------------------------------
    async def seeds_or_claim(self, content_hash: str) -> tuple[list[Seed], bool]:
        """Seeds of ``content_hash`` (waiting for them while another node holds the
        first-fill claim), or ``([], True)`` once this node holds the claim."""
        key = self.keys.first_fill(content_hash)
        deadline = time.monotonic() + self.settings.wait_s
        announced = False
        while True:
            seeds = await self.seeds(content_hash)
            if seeds:
                return seeds, False
            if await self.redis.set(key, self.node, nx=True, px=CLAIM_TTL_MS):
                return [], True
            raw_holder = await self.redis.get(key)
            holder = _text(raw_holder) if raw_holder is not None else None
            if holder == self.node:
                await self.redis.pexpire(key, CLAIM_TTL_MS)  # ours, from an earlier try
                return [], True
            if time.monotonic() > deadline:
                log.warning("%s: waited %g s for the first fill of another node; reading "
                            "the store", content_hash[:12], self.settings.wait_s,
                            extra={"event": "first_fill_timeout"})
                return [], False
            if not announced and holder is not None:
                announced = True
                log.info("%s: node %s is reading it from the store; waiting to read it "
                         "from that node", content_hash[:12], holder,
                         extra={"event": "first_fill_wait", "holder": holder})
            await asyncio.sleep(WAIT_POLL_S)

    async def keep_claim(self, content_hash: str) -> None:
        await self._renew([self.keys.first_fill(content_hash)], CLAIM_TTL_MS)

    async def _renew(self, keys: list[str], ttl_ms: int) -> None:
        """Keep ``keys`` alive (a claim, a reader's keys) until cancelled: renewed at a
        third of their lifetime, so one missed renewal does not end them."""
        while True:
            await asyncio.sleep(ttl_ms / 3000)
            for key in keys:
                with contextlib.suppress(Exception):
                    await self.redis.pexpire(key, ttl_ms)

    async def release_claim(self, content_hash: str) -> None:
        """Let go of the claim if it is still ours (one script: no race with a new one)."""
        await self.redis.eval(_RELEASE, 1, self.keys.first_fill(content_hash), self.node)

    # --- leases ---------------------------------------------------------------------------
    async def _ask(self, seeds: list[Seed]) -> list[_Grant]:
        """Ask each seed's node for a lease; the ones that answered yes in time."""
        async def one(seed: Seed) -> _Grant | None:
            raw_meta = await self.redis.get(self.keys.peer_agent(seed.node))
            if raw_meta is None:
                return None
            ask_id = f"{self.node}-{secrets.token_hex(8)}"
            await self.redis.set(self.keys.peer_reading(ask_id), self.node,
                                 px=READING_TTL_MS)
            await self.redis.rpush(self.keys.peer_asks(seed.node), json.dumps(
                {"id": ask_id, "reader": self.node, "content_hash": seed.content_hash}))
            await self.redis.expire(self.keys.peer_asks(seed.node), 60)
            answer = await self.redis.blpop([self.keys.peer_grant(ask_id)],
                                            timeout=GRANT_WAIT_S)
            reply = json.loads(answer[1]) if answer is not None else {"why": "no answer"}
            if reply.get("ok") is not True:
                await self.redis.delete(self.keys.peer_reading(ask_id))
                log.info("peer %s did not lend %s (%s)", seed.node,
                         seed.content_hash[:12], reply.get("why"))
                return None
            try:
                return _Grant(seed, decode_metadata(raw_meta), ask_id)
            except ValueError:
                await self.redis.delete(self.keys.peer_reading(ask_id))
                return None

        answers = await asyncio.gather(*(one(s) for s in seeds), return_exceptions=True)
        return [a for a in answers if isinstance(a, _Grant)]

    async def _done(self, grants: list[_Grant]) -> None:
        """The read is over: the seeders let their leases go."""
        with contextlib.suppress(Exception):
            await self.redis.delete(*(self.keys.peer_reading(g.ask_id) for g in grants))

    # --- the read -------------------------------------------------------------------------
    async def _read(self, layout: Layout, target: torch.Tensor, grants: list[_Grant],
                    progress: Callable[[int], None] | None) -> PeerFill:
        from warmpool.loading.checksums import range_sum
        from warmpool.loading.nixl_agent import Region, peer_agent

        agent = peer_agent(self.settings, self.agent_name)
        unit = grants[0].seed.range_bytes
        sums = grants[0].seed.sums
        regions: dict[str, Region] = {}
        for g in grants:
            if g.seed.range_bytes != unit or g.seed.sums != sums:
                continue
            try:
                region = Region.from_json(g.seed.region)
            except ValueError as exc:
                log.warning("peer %s: unusable seed: %s", g.seed.node, exc)
                continue
            if region.size < layout.total_bytes:
                log.warning("peer %s: unusable seed: its region is smaller than the model",
                            g.seed.node)
                continue
            regions[g.seed.node] = region
        grants = [g for g in grants if g.seed.node in regions]
        if not grants:
            return PeerFill(missing=None)
        spans = ranges(layout.total_bytes, unit)
        todo: collections.deque[int] = collections.deque(range(len(spans)))
        tried: dict[int, set[str]] = {i: set() for i in range(len(spans))}
        good: list[int] = []
        bad: set[int] = set()
        counts = {"fallbacks": 0, "mismatches": 0}
        lock = threading.Lock()
        stop = threading.Event()
        live = {g.seed.node for g in grants}
        handle = await asyncio.to_thread(agent.register, target)

        def next_range(node: str) -> int | None:
            with lock:
                for _ in range(len(todo)):
                    i = todo.popleft()
                    if node not in tried[i]:
                        return i
                    todo.append(i)
                return None

        def settle(i: int, node: str, ok: bool) -> None:
            """After a failed range: another live peer may try it, else the store."""
            with lock:
                tried[i].add(node)
                if ok:
                    good.append(i)
                elif live - tried[i]:
                    todo.append(i)
                else:
                    bad.add(i)

        def worker(grant: _Grant) -> None:
            node, region = grant.seed.node, regions[grant.seed.node]
            while not stop.is_set():
                i = next_range(node)
                if i is None:
                    break
                off, n = spans[i]
                try:
                    agent.read(grant.seed.agent, grant.metadata, [target[off:off + n]],
                               [(off, n)], region, self.settings.timeout_s)
                except PeerError as exc:
                    log.warning("peer %s failed a read of %s: %s; its ranges go elsewhere",
                                node, layout.content_hash[:12], exc,
                                extra={"event": "peer_failed", "peer": node})
                    with lock:
                        counts["fallbacks"] += 1
                        live.discard(node)
                    settle(i, node, False)
                    break  # what it was going to read, the others (or the store) will
                if range_sum(target, off, n) != sums[i]:
                    log.warning("range %d of %s from peer %s: checksum mismatch; read from "
                                "the store instead", i, layout.content_hash[:12], node,
                                extra={"event": "peer_checksum_mismatch", "peer": node})
                    with lock:
                        counts["mismatches"] += 1
                        bad.add(i)
                    continue
                settle(i, node, True)
                if progress is not None:
                    progress(n)

        try:
            await asyncio.gather(*(to_thread_joined(worker, g, on_cancel=stop.set)
                                   for g in grants))
        finally:
            await asyncio.to_thread(agent.deregister, handle)
        bad.update(todo)  # ranges no one could take
        missing = _files_over(layout, [spans[i] for i in sorted(bad)])
        lost = _bytes_of(layout, missing)
        peer_bytes = max(0, layout.total_bytes - lost) if good else 0
        return PeerFill(missing=missing, peer_bytes=peer_bytes,
                        peers=tuple(g.seed.node for g in grants),
                        fallbacks=counts["fallbacks"], mismatches=counts["mismatches"],
                        good=sorted(good), sums=sums, range_bytes=unit)

    @staticmethod
    def verify(layout: Layout, target: torch.Tensor, filled: PeerFill) -> None:
        """Check every range that came from a peer and was not read again from the store
        once more, just before publishing: a transfer that landed late (a stalled peer
        answering after its range was given to another) cannot slip through."""
        from warmpool.loading.checksums import range_sum

        spans = ranges(layout.total_bytes, filled.range_bytes)
        for i in filled.good:
            off, n = spans[i]
            if range_sum(target, off, n) != filled.sums[i]:
                raise PeerError(f"range {i} of {layout.content_hash[:12]} changed after it "
                                "was checked; nothing was published")


@dataclass(frozen=True)
class Filled:
    """How a buffer was filled: the loader name for the entry (``peer``, ``peer+native``,
    or the store's loader alone), and the bytes that came from peers."""

    loader: str
    peer_bytes: int = 0


async def fill_with_peers(peers: PeerSource | None, seeds: list[Seed], layout: Layout,
                          target: torch.Tensor,
                          from_store: Callable[[list[str] | None], Awaitable[str]],
                          progress: Callable[[int], None] | None = None) -> Filled:
    """Fill ``target`` from ``seeds`` as far as they give it, and the rest from the store
    (``from_store(files)``: None for every file); check every peer range once more before
    the caller publishes. The one way both tiers combine the two sources."""
    filled = None
    if peers is not None and seeds:
        try:
            filled = await peers.fill(layout, target, progress=progress, seeds=seeds)
        except (RedisError, OSError) as exc:  # the store is still there
            log.warning("%s: asking peers failed (%s); reading the store",
                        layout.content_hash[:12], exc, extra={"event": "peer_fallback"})
    files = filled.missing if filled is not None else None
    used = "peer"
    if files is None or files:
        used = await from_store(files)
    if filled is None or not filled.good:
        return Filled(used)
    # one more pass over up to the whole model: off the event loop
    await asyncio.to_thread(PeerSource.verify, layout, target, filled)
    return Filled("peer" if not files else f"peer+{used}", filled.peer_bytes)


#: How long a first-fill claim lives unless its holder renews it (at a third of it).
CLAIM_TTL_MS = 30_000
#: How often a node waiting for another's first fill looks for its seed.
WAIT_POLL_S = 0.25


def peer_source(settings: Settings, pool: Pool) -> PeerSource | None:
    """The fleet's seeds, when peers are on and the pool's registry is the fleet's Redis."""
    from warmpool.pool.registry.redis import RedisRegistry

    registry = pool.registry
    if not settings.peers.enabled or not isinstance(registry, RedisRegistry):
        return None
    return PeerSource(registry.redis, registry.keys, settings.node, settings.peers)


@contextlib.asynccontextmanager
async def first_fill(peers: PeerSource | None, content_hash: str) -> AsyncIterator[list[Seed]]:
    """The seeds to read ``content_hash`` from; when there are none, the cooperative first
    fill: one node claims the model (``SET NX``) and reads the bucket while the others
    wait for its seed and then read from it, so the fleet reads the bucket once.

    Yields the seeds (empty: read from the store). A claim is renewed while the body
    runs; after a failure it is released at once so another node takes over, after a
    success it is left to expire, covering the moment before the new seed is published.
    A node waits at most ``wait_s``, and not at all once the claim's holder is gone.
    """
    if peers is None:
        yield []
        return
    try:
        seeds, claimed = await peers.seeds_or_claim(content_hash)
    except (RedisError, OSError) as exc:  # Redis out of reach: the bucket still is not
        log.warning("%s: looking for peers failed (%s); reading the store",
                    content_hash[:12], exc, extra={"event": "peer_fallback"})
        seeds, claimed = [], False
    if not claimed:
        yield seeds
        return
    renew = asyncio.create_task(peers.keep_claim(content_hash))
    try:
        yield []
    except BaseException:
        renew.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await renew
        with contextlib.suppress(Exception):
            await peers.release_claim(content_hash)
        raise
    renew.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await renew


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _file_spans(layout: Layout) -> dict[str, tuple[int, int]]:
    spans: dict[str, tuple[int, int]] = {}
    for s in layout.slots:
        lo, hi = spans.get(s.file, (s.offset, s.offset + s.nbytes))
        spans[s.file] = (min(lo, s.offset), max(hi, s.offset + s.nbytes))
    return spans


def _files_over(layout: Layout, wanted: list[tuple[int, int]]) -> list[str]:
    """The files whose bytes in the buffer overlap any of ``wanted``."""
    if not wanted:
        return []
    return sorted(f for f, (lo, hi) in _file_spans(layout).items()
                  if any(lo < off + n and off < hi for off, n in wanted))


def _bytes_of(layout: Layout, files: list[str]) -> int:
    spans = _file_spans(layout)
    return sum(spans[f][1] - spans[f][0] for f in files)

