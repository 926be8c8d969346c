"""The controller: one per node, turning Redis events into warm models.

Its parts each do one job — :mod:`.sources` reads pub/sub and streams, :mod:`.events`
parses, :mod:`.uploads` waits for complete models, :mod:`.routing` decides which node
acts, :mod:`.dispatch` warms once, :mod:`.desired` and the Redis registry remember. This
module wires them, reconciles at start, keeps the heartbeat, and shuts down cleanly.

Payloads that cannot be acted on go to the dead-letter stream with their reason; the
controller never stops for one. A Redis that restarts is waited out (see
:mod:`.redis_client`), and when it came back empty the node's entries and desired state
are written back from memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from dataclasses import replace
from typing import Any

from redis.asyncio import Redis

from warmpool.config import ControllerOptions, Settings
from warmpool.contract.deadletter import dead_record, write_dead_letter
from warmpool.contract.keys import RedisKeys
from warmpool.contract.notifications import Event, ObjectRemoved, parse_event
from warmpool.contract.redis_client import CONNECTION_ERRORS, keep_running, retry_until
from warmpool.contract.requests import Request
from warmpool.contract.watchlist import Watchlist
from warmpool.controller.desired import DesiredState, want_field
from warmpool.controller.dispatch import Dispatcher
from warmpool.controller.failures import Failures, RetrySchedule
from warmpool.controller.fleet import Fleet
from warmpool.controller.metrics import Metrics
from warmpool.controller.nodes import DeviceRoom, NodeInfo, Nodes
from warmpool.controller.routing import Router
from warmpool.controller.sources import PubSubSource, StreamSource
from warmpool.controller.uploads import Uploads
from warmpool.errors import BadEvent
from warmpool.loading.seeder import Seeder, seed_forever
from warmpool.loading.stats import STATS
from warmpool.model.uri import ModelURI
from warmpool.pool.entries import HOST_DEVICE, Pool
from warmpool.pool.registry.base import State
from warmpool.pool.registry.redis import RedisRegistry
from warmpool.tiers.workers import mirror_worker_entries

log = logging.getLogger(__name__)


class Controller:
    def __init__(self, settings: Settings, redis: Redis, *,
                 options: ControllerOptions = ControllerOptions(),
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.redis = redis
        self.options = options
        self.node = settings.node
        self.keys = keys = RedisKeys(options.key_prefix)
        self.metrics = metrics or Metrics()
        self.watch = Watchlist.parse(settings.watch)
        self.registry = RedisRegistry(redis, keys, self.node)
        self.pool = Pool(settings, self.registry)
        self.desired = DesiredState(redis, keys, self.node, max_wants=options.max_desired)
        self.failures = Failures(redis, keys, self.node,
                                 RetrySchedule(options.failure_backoff_s,
                                               options.failure_backoff_cap_s,
                                               options.give_up_after))
        self.nodes = Nodes(redis, keys, self.node, ttl_s=options.heartbeat_s * 3)
        self.dispatcher = Dispatcher(settings=settings, pool=self.pool, registry=self.registry,
                                     redis=redis, keys=keys, metrics=self.metrics,
                                     loader=options.loader,
                                     lock_ttl_ms=int(options.lock_ttl_s * 1000))
        self.fleet = Fleet(redis, keys, self.node, self.nodes, self.registry)
        self.seeder = (Seeder(settings, redis, keys, ttl_s=options.heartbeat_s * 3)
                       if settings.peers.enabled else None)
        self.router = Router(redis=redis, keys=keys, node=self.node, nodes=self.nodes,
                             registry=self.registry, desired=self.desired,
                             dispatcher=self.dispatcher, failures=self.failures,
                             fleet=self.fleet, watch=self.watch)
        self.uploads = Uploads(redis, keys, cache=self.dispatcher.cache,
                               debounce_s=options.debounce_s, on_ready=self.router.upload_ready,
                               recheck_s=options.recheck_s)
        self.stopping = asyncio.Event()
        self._hurry = asyncio.Event()  # a second signal: abandon in-flight work now
        self.ready = asyncio.Event()
        self.consumer = f"{self.node}-{os.getpid()}-{secrets.token_hex(3)}"
        self.pubsub = PubSubSource(redis, options.events_channel or keys.events_channel,
                                   self.handle, self.stopping)
        self.streams = StreamSource(
            redis, {keys.requests_stream: "shared", keys.node_stream(self.node): "node"},
            keys.consumer_group, self.consumer, self.handle, self.dead_letter, self.stopping,
            max_inflight=options.max_inflight, claim_idle_ms=int(options.claim_idle_s * 1000),
            max_deliveries=options.max_deliveries)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._beaten = False
        self._run_id: str | None = None  # the Redis server we last talked to

    # --- life cycle --------------------------------------------------------------------
    async def run(self) -> None:
        """Start, reconcile, serve until :meth:`stop`, then shut down cleanly."""
        try:
            await retry_until("start", self._start, self.stopping)
            loops = [keep_running("pubsub", self.pubsub.run_once, self.stopping),
                     keep_running("streams", self.streams.run_once, self.stopping),
                     keep_running("maintenance", self._maintain, self.stopping)]
            if self.seeder is not None:  # serve this node's warm models to peers
                loops.append(seed_forever(self.seeder, self.stopping,
                                          tick=min(1.0, self.options.heartbeat_s)))
            self.ready.set()
            log.info("controller %s serving on node %s", self.consumer, self.node,
                     extra={"event": "serving", "node": self.node, "consumer": self.consumer,
                            "watch": [str(p) for p in self.watch.prefixes]})
            await asyncio.gather(*loops)
        finally:
            await self._shutdown()

    def stop(self, grace_s: float | None = None) -> None:
        """Stop taking work; in-flight work gets ``grace_s`` (default: the option) to end."""
        if grace_s is not None:
            self.options = replace(self.options, shutdown_grace_s=grace_s)
            if grace_s <= 0:
                self._hurry.set()  # a drain already under way reads no option again
        self.stopping.set()

    async def _start(self) -> None:
        if self.seeder is not None:
            await self.seeder.start()
        await self.streams.ensure_groups()
        await self._beat()
        await self.reconcile()
        await self.join_fleet()

    async def join_fleet(self) -> int:
        """Want what the fleet wants of this node and it does not yet (a node that joined,
        or a replica placed here for one whose node left); returns how many."""
        added = 0
        for req in await self.fleet.mine():
            if await self.desired.get(str(req.uri), req.device) is None:
                log.info("%s on %s: wanted here by the fleet", req.uri, req.device,
                         extra={"event": "fleet_wanted", "uri": str(req.uri)})
                self._spawn(self.router.apply(req, source="fleet"), f"fleet {req.uri}")
                added += 1
        return added

    async def reconcile(self) -> int:
        """Warm again what should be warm; mark what is gone (lost/failed)."""
        await self.pool.reclaim()
        await self._adopt()
        wants = (await self._due())[: self._room()]  # the rest: later convergence passes
        for want in wants:
            self._spawn(self.router.warm_wanted(want), f"reconcile {want.uri}")
        if wants:
            log.info("reconciling %d desired model(s)", len(wants),
                     extra={"event": "reconcile", "count": len(wants)})
        return len(wants)

    async def _adopt(self) -> None:
        for entry in await self.pool.adopt_residents():
            log.info("adopted %s (%s), warm on the host tier but unknown to Redis",
                     entry.uri, entry.content_hash[:12],
                     extra={"event": "adopted", "uri": entry.uri, "device": entry.device})

    async def converge(self) -> int:
        """Warm desired models that have no entry here, or lost theirs (a worker or a
        segment vanished, a stream was interrupted); periodic, so a request whose warm-up
        died with a Redis outage still ends warm. A model whose warm-ups keep failing is
        tried with backoff, then given up (:mod:`.failures`); failed entries stay failed
        until asked again, and capacity evictions are not undone (that would thrash)."""
        await self.pool.reclaim()
        entries = await self.pool.entries()
        started, room = 0, self._room()
        for want in await self._due():
            if started >= room:
                break  # bounded work per pass; the next pass goes on
            mine = [e for e in entries if str(want.uri) in e.uris and e.device == want.device]
            newest = max(mine, key=lambda e: e.updated_at, default=None)
            if newest is None or newest.state == State.LOST or (
                    newest.state == State.FAILED
                    and (newest.error or "").startswith("interrupted")) or (
                    newest.state == State.WARM and want.engine_layout is not None
                    and not self.dispatcher.exports.busy(str(want.uri))
                    and self.dispatcher.exports.warm_layouts(
                        newest.content_hash, want.engine_layout) is None):
                self._spawn(self.router.warm_wanted(want), f"converge {want.uri}")
                started += 1
        return started

    def _room(self) -> int:
        """Warm-ups a pass may start: as many as stream entries may be in flight, less
        those its earlier passes started and that still run."""
        return max(0, self.options.max_inflight - len(self._tasks))

    async def _due(self) -> list[Request]:
        """Desired models to try now: not given up, and past their backoff."""
        failing = await self.failures.all()
        now = time.time()
        return [w for w in await self.desired.all()
                if (f := failing.get(want_field(str(w.uri), w.device))) is None or f.due(now)]

    async def _shutdown(self) -> None:
        """The readers have stopped: give work in flight the grace period, then cancel it
        (streams are discarded, never left partial; stream entries stay unacknowledged)."""
        self.stopping.set()
        work = [*self.pubsub.tasks, *self.streams.inflight.values(), *self._tasks,
                *self.dispatcher.tasks, *self.dispatcher.exports.tasks]
        left: set[asyncio.Task[Any]] = set()
        if work:
            log.info("stopping: waiting up to %.0fs for %d task(s) in flight",
                     self.options.shutdown_grace_s, len(work), extra={"event": "draining"})
            left = await _drain(work, self.options.shutdown_grace_s, self._hurry)
        if left:
            log.warning("abandoning %d task(s); their stream entries stay pending for the "
                        "next controller", len(left), extra={"event": "abandoned"})
        await self.uploads.close()
        await self.dispatcher.shutdown()
        if self.seeder is not None:
            await self.seeder.close()
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        with contextlib.suppress(*CONNECTION_ERRORS):
            await self.nodes.leave()
        log.info("controller %s stopped", self.consumer, extra={"event": "stopped"})

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(_logged(coro, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- payloads ------------------------------------------------------------------------
    async def handle(self, payload: bytes, source: str) -> None:
        """Parse one payload and act on it; refused ones go to the dead-letter stream."""
        self.metrics.events.labels("pubsub" if source == "pubsub" else "stream").inc()
        try:
            events = parse_event(payload)
            models = [self._model_of(e) for e in events]
        except BadEvent as exc:
            await self.dead_letter(payload, exc.reason, exc.detail, source)
            return
        seen: set[ModelURI] = set()  # a payload's records of one model: one event
        for event, model in zip(events, models, strict=True):
            if isinstance(event, Request):
                await self.router.request(event, source)
            elif model is not None and model not in seen:
                seen.add(model)
                await self.uploads.seen(model)

    def _model_of(self, event: Event) -> ModelURI | None:
        if isinstance(event, Request):
            return None
        if isinstance(event, ObjectRemoved) and event.overwritten:
            return None  # half of an overwrite; its upload event follows
        model = self.watch.match(event.scheme, event.bucket, event.key)
        if model is None:
            raise BadEvent("not_watched", f"{event.uri} is under no watched prefix")
        return model

    async def dead_letter(self, payload: bytes, reason: str, detail: str, source: str) -> None:
        self.metrics.rejected.labels(reason).inc()
        log.warning("refused a payload from %s: %s: %s", source, reason, detail,
                    extra={"event": "rejected", "reason": reason, "source": source})
        # the channel or stream it came from, so an operator can replay it there
        where = {"pubsub": self.pubsub.channel, "shared": self.keys.requests_stream,
                 "node": self.keys.node_stream(self.node)}.get(source, source)
        await write_dead_letter(self.redis, self.keys.dead_stream,
                                dead_record(payload, reason, detail, where, self.node))

    # --- housekeeping --------------------------------------------------------------------
    async def _maintain(self) -> None:
        tick = max(0.05, min(self.options.heartbeat_s, self.options.claim_idle_s / 3))
        last_sweep = time.monotonic()
        while not self.stopping.is_set():
            await self._beat()
            await self.streams.touch()
            await self.streams.claim_once()
            if time.monotonic() - last_sweep >= self.options.recheck_s:
                last_sweep = time.monotonic()
                await self.uploads.recheck_all()
                await self.dispatcher.retry_retiring()
                await self.join_fleet()
                await self.converge()
                await self.dispatcher.cache.bound(await self.pool.in_use(), self.settings)
                # The CLI forgets old history when it runs; a node run by a controller
                # may never see the CLI, and its Redis would keep every entry ever made.
                await self.pool.forget_history(self.options.history_keep_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), tick)

    async def _beat(self) -> None:
        """Heartbeat and gauges. A Redis that is not the one we last saw (its ``run_id``
        changed: restarted, failed over, replaced), or a heartbeat that vanished before
        its TTL (flushed), may have lost data: write back what this node knows.

        The run id is the reliable sign: the client's own retries can recreate the
        heartbeat on a server that restarted within a second, before we look for it."""
        run_id = await redis_run_id(self.redis)
        replaced = self._run_id is not None and run_id != self._run_id
        if replaced or (self._beaten and not await self.nodes.is_live(self.node)):
            restored = await self.registry.resync(), await self.desired.resync()
            await self._adopt()
            await self.streams.ensure_groups()
            why = ("Redis is a new server (restarted or failed over)" if replaced else
                   "our heartbeat was gone from Redis (flushed, or out of reach past its TTL)")
            log.warning("%s; wrote back %d entries and %d desired models", why, *restored,
                        extra={"event": "resynced"})
        self._run_id = run_id
        await mirror_worker_entries(self.settings, self.registry)  # GPU entries, into Redis
        entries = await self.pool.entries()
        capacity = {HOST_DEVICE: self.pool.host_capacity()}
        used = self.metrics.observe_entries(entries, capacity)
        self.metrics.observe_peers(STATS)
        if self.seeder is not None:
            self.metrics.seeds.labels("models").set(self.seeder.models)
            self.metrics.seeds.labels("leases").set(self.seeder.leases)
        if self.pool.host.has_arena():
            self.metrics.observe_arena(await asyncio.to_thread(self.pool.host.arena.status))
        devices = {d: DeviceRoom(capacity.get(d, 0), used.get(d, 0)) for d in capacity}
        await self.nodes.beat(NodeInfo(self.node, devices, labels=self.settings.labels))
        self._beaten = True


async def redis_run_id(redis: Redis) -> str:
    """The server's ``run_id`` (INFO server): new on every start of a redis-server, so a
    restart or a failover changes it even when nothing else shows."""
    info = await redis.info("server")
    return str(info.get("run_id", ""))


async def _logged(coro: Any, name: str) -> None:
    """Background work (reconciliation) must not fail silently; the periodic
    convergence retries what failed for want of Redis."""
    try:
        await coro
    except CONNECTION_ERRORS as exc:
        log.warning("%s: Redis unreachable (%s); will converge later", name, exc,
                    extra={"event": "redis_unreachable", "task": name})
    except Exception:  # noqa: BLE001
        log.exception("%s failed", name)


async def _drain(work: list[asyncio.Task[Any]], grace_s: float,
                 hurry: asyncio.Event) -> set[asyncio.Task[Any]]:
    """The tasks of ``work`` still running after ``grace_s``, or as soon as ``hurry`` is
    set (a second signal must not wait out the grace period the first one started)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    hurried = asyncio.ensure_future(hurry.wait())
    try:
        pending = {t for t in work if not t.done()}
        while pending and not hurry.is_set() and (left_s := deadline - loop.time()) > 0:
            await asyncio.wait([*pending, hurried], timeout=left_s,
                               return_when=asyncio.FIRST_COMPLETED)
            pending = {t for t in pending if not t.done()}
        return pending
    finally:
        hurried.cancel()
