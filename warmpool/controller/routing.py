"""Routing requests: which node acts on a request, and what acting on it means here.

- A request that names another node goes onto that node's stream (from pub/sub it is
  ignored: that node hears the broadcast itself).
- A deploy or pin that names no node is *placed* (:func:`warmpool.controller.nodes.place`) and goes
  to that node's stream, or is done here.
- Every controller hears a pub/sub broadcast: the first to claim it (a short ``SET NX``
  on its identity: body digest and occurrence) acts, so it is placed once and answered
  once. Requests for one model are taken in arrival order.
- An evict or unpin that names no node concerns every node that may hold the model: it is
  done here and copied onto every other live node's stream.

Acting on a request updates desired state first (so a crash half-way still converges),
then the pool, then answers on ``p:reply:<request_id>`` when the sender asked for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import replace

from redis.asyncio import Redis

from warmpool.contract.keys import RedisKeys
from warmpool.contract.requests import Request
from warmpool.contract.watchlist import Watchlist
from warmpool.controller.desired import DesiredState
from warmpool.controller.dispatch import Dispatcher, Outcome
from warmpool.controller.failures import Failures
from warmpool.controller.fleet import Fleet
from warmpool.controller.nodes import Nodes, place
from warmpool.errors import DesiredStateFull, NoSuchModel, ObjectNotFoundError, StorageError
from warmpool.model.uri import ModelURI
from warmpool.pool.registry.base import State
from warmpool.pool.registry.redis import RedisRegistry
from warmpool.storage import open_store

log = logging.getLogger(__name__)
REPLY_TTL_S = 600
STREAM_MAXLEN = 100_000


class Router:
    def __init__(self, *, redis: Redis, keys: RedisKeys, node: str, nodes: Nodes,
                 registry: RedisRegistry, desired: DesiredState, dispatcher: Dispatcher,
                 failures: Failures, fleet: Fleet, watch: Watchlist | None = None,
                 claim_ttl_ms: int = 30_000) -> None:
        self.redis = redis
        self.keys = keys
        self.node = node
        self.nodes = nodes
        self.registry = registry
        self.desired = desired
        self.dispatcher = dispatcher
        self.failures = failures
        self.fleet = fleet
        self.watch = watch or Watchlist()
        self.claim_ttl_ms = claim_ttl_ms
        self._turns: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    async def request(self, req: Request, source: str) -> None:
        """Route one request heard on ``source`` (``pubsub``, ``shared`` or ``node``).

        Requests for one model are taken in the order they arrived: each holds the
        model's turn through its claim, its routing and its desired-state update; an
        evict or unpin holds it until done, a deploy or pin until its warm-up is joined
        or started, so that only the long wait for a warm-up runs outside it (and a
        later evict can still cancel that)."""
        if req.node is not None and req.node != self.node:
            if source != "pubsub":
                await self.forward(req, req.node)
            return
        async with self._turn(req):  # before any await: the turn keeps arrival order
            identity = await self._identity(req) if source == "pubsub" else ""
            if identity and not await self._claim(identity):
                return  # every controller hears a broadcast: another one took this
            if req.node is None:
                if req.action in ("deploy", "pin") and req.spread is not None:
                    req = await self._spread(req)
                    if req.node is None:
                        return  # not for this node: sent to those it is for
                elif req.action in ("deploy", "pin"):
                    target = await self.placement(str(req.uri), req.device)
                    if target != self.node:
                        await self.forward(req, target)
                        return
                else:
                    if req.action == "evict" and await self.fleet.forget(str(req.uri),
                                                                        req.device):
                        log.info("%s on %s: no longer wanted by the fleet", req.uri,
                                 req.device, extra={"event": "fleet_forgotten",
                                                    "uri": str(req.uri)})
                    for other in await self._other_live_nodes():
                        await self.forward(replace(req, request_id=None), other)
            try:
                wanted = await self.record(req)
            except (DesiredStateFull, NoSuchModel) as exc:
                await self.reply(req, Outcome(str(req.uri), req.device, "failed",
                                              error=str(exc)))
                return
            if wanted is None:
                # An evict or unpin is done whole in its turn: were only its first step
                # (cancelling the warm-up in flight) in it, a deploy after it could find
                # the old entry still warm, answer "already warm", and then see the
                # evict's later steps remove it (deploy, evict, deploy ended evicted).
                await self.reply(req, await self.act(req, None))
                return
            acting = asyncio.ensure_future(self.act(req, wanted))
            # One turn of the loop: the task takes its first step (the dispatcher joins
            # or starts the warm-up, synchronously, before it first waits) while the next
            # request for this model still waits for its turn.
            await asyncio.sleep(0)
        await self.reply(req, await acting)

    @contextlib.asynccontextmanager
    async def _turn(self, req: Request) -> AsyncIterator[None]:
        """One request at a time per (model, device); asyncio's lock is first come,
        first served, and it is taken before the first await of :meth:`request`."""
        slot = (str(req.uri), req.device)
        lock, users = self._turns.get(slot, (asyncio.Lock(), 0))
        self._turns[slot] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._turns[slot]
            if users == 1:
                del self._turns[slot]
            else:
                self._turns[slot] = (lock, users - 1)

    async def apply(self, req: Request, source: str = "request") -> Outcome:
        """Do ``req`` on this node."""
        return await self.act(req, await self.record(req, source))

    async def record(self, req: Request, source: str = "request") -> Request | None:
        """Desired state first, so a crash half-way still converges; returns what is now
        desired for a deploy or pin."""
        uri, device = str(req.uri), req.device
        if req.action in ("deploy", "pin"):
            if source == "request" and await self.desired.get(uri, device) is None \
                    and not await model_exists(req.uri):
                log.warning("refused a %s of %s: the store holds nothing there", req.action,
                            uri, extra={"event": "no_such_model", "uri": uri})
                raise NoSuchModel(f"{uri}: the store holds nothing there (nothing to warm)")
            try:
                wanted = await self.desired.add(req, source)
            except DesiredStateFull:
                if not await self._make_room():
                    raise
                wanted = await self.desired.add(req, source)
            await self.failures.clear(uri, device)  # asked (again): tried at once
            return wanted
        if req.action == "unpin":
            await self.desired.set_pinned(uri, device, False)
        else:
            await self.desired.remove(uri, device)
            await self.failures.clear(uri, device)
        return None

    async def act(self, req: Request, wanted: Request | None) -> Outcome:
        """The pool's part of ``req``, after :meth:`record`."""
        uri, device = str(req.uri), req.device
        if wanted is not None:
            return await self.warm_wanted(wanted)
        if req.action == "unpin":
            changed = await self.dispatcher.set_pin(uri, device, False)
            entry = changed[-1] if changed else None
            return Outcome(uri, device, entry.state.value if entry else "absent", entry)
        return await self.dispatcher.evict(uri, device, force=req.force)

    async def warm_wanted(self, wanted: Request) -> Outcome:
        """Warm a desired model and keep its failure count: a model that keeps failing
        backs off and is finally given up (:mod:`.failures`)."""
        uri, device = str(wanted.uri), wanted.device
        outcome = await self.dispatcher.warm(wanted)
        permanent = False
        if outcome.state == State.WARM.value and wanted.engine_layout is not None:
            outcome, permanent = await self._export(wanted, outcome)
        if outcome.state == State.WARM.value:
            await self.failures.clear(uri, device)
        elif (outcome.state == State.FAILED.value
              and await self.desired.get(uri, device) is not None):
            failing = await self.failures.failed(uri, device, outcome.error or "",
                                                 give_up=permanent)
            if failing.given_up:
                log.warning("giving up on %s on %s after %d failures: %s", uri, device,
                            failing.failures, failing.error,
                            extra={"event": "given_up", "uri": uri, "device": device})
        return outcome

    async def _export(self, wanted: Request, outcome: Outcome) -> tuple[Outcome, bool]:
        """The engine layout ``wanted`` asks for, its checkpoint being warm: the outcome
        (failed when no layout was made) and whether a retry cannot help."""
        want, uri = wanted.engine_layout, str(wanted.uri)
        assert want is not None and outcome.entry is not None
        done = await self.dispatcher.exports.export(uri, outcome.entry.content_hash, want)
        labels = [str(x.get("label")) for x in done.layouts]
        if done.ok:
            log.info("%s: %s engine layout(s) %s: %s", uri, want.engine,
                     "already warm" if done.already_warm else
                     f"exported in {done.seconds:.1f} s", ", ".join(labels),
                     extra={"event": "engine_layout_warm", "uri": uri, "layouts": labels,
                            "seconds": round(done.seconds, 3)})
            return outcome, False
        log.warning("%s is warm, but its %s engine layout is not: %s", uri, want.engine,
                    done.error, extra={"event": "engine_layout_failed", "uri": uri,
                                       "error": done.error})
        return replace(outcome, state=State.FAILED.value,
                       error=f"engine layout: {done.error}"), done.permanent

    async def _make_room(self) -> bool:
        """Make room in a full desired state: failing models do not hold room against a
        new one. The model given up longest ago goes first (its failure was reported, and
        nothing tries it any more), else the one that failed most often. False when no
        desired model is failing."""
        failing = list((await self.failures.all()).values())
        if not failing:
            return False
        given_up = [f for f in failing if f.given_up]
        oldest = (min(given_up, key=lambda f: f.retry_at) if given_up
                  else max(failing, key=lambda f: (f.failures, -f.retry_at)))
        await self.desired.remove(oldest.uri, oldest.device)
        await self.failures.clear(oldest.uri, oldest.device)
        log.warning("desired state full: dropped %s on %s, failing after %d failures (%s)",
                    oldest.uri, oldest.device, oldest.failures, oldest.error,
                    extra={"event": "desired_dropped", "uri": oldest.uri})
        return True

    async def _spread(self, req: Request) -> Request:
        """A deploy or pin for several nodes: the fleet records it, and each chosen node
        gets it as its own (a plain request naming it: each answers the request id).
        Returns the request for this node (naming it), or one naming no node when this
        node is not among them."""
        assert req.spread is not None
        targets = await self.fleet.place(req)
        plain = replace(req, spread=None)
        log.info("%s on %s wanted on %s: %s", req.uri, req.device, req.spread.describe(),
                 ", ".join(targets) or "no live node matches yet",
                 extra={"event": "fleet_placed", "uri": str(req.uri), "nodes": targets})
        if not targets:
            await self.reply(req, Outcome(str(req.uri), req.device, "pending",
                                          error=f"no live node is {req.spread.describe()} "
                                          "yet: the fleet warms it on each that joins"))
        for target in targets:
            if target != self.node:
                await self.forward(plain, target)
        return replace(plain, node=self.node) if self.node in targets else plain

    async def upload_ready(self, model: ModelURI) -> None:
        """A watched upload completed: warm it on the host tier of the placed node, or of
        every node its watch entry names (``nodes``, ``replicas``, ``node_selector``)."""
        spread = self.watch.spread_for(model)
        if spread is not None:
            mine = await self._spread(Request("deploy", model, spread=spread))
            if mine.node is not None:
                await self.apply(mine, source="watch")
            return
        req = Request("deploy", model)
        target = await self.placement(str(model), req.device)
        if target != self.node:
            await self.forward(req, target)
            return
        await self.apply(req, source="watch")

    async def placement(self, uri: str, device: str) -> str:
        live = await self.nodes.live()
        entries = await self.registry.list_cluster() if live else []
        return place(uri, device, live, entries, self.node)

    async def forward(self, req: Request, node: str) -> None:
        doc = replace(req, node=node).to_doc()
        await self.redis.xadd(self.keys.node_stream(node),
                              {"payload": json.dumps(doc), "from": self.node},
                              maxlen=STREAM_MAXLEN, approximate=True)
        log.info("%s %s on %s: sent to node %s", req.action, req.uri, req.device, node,
                 extra={"event": "forwarded", "action": req.action, "uri": str(req.uri),
                        "to": node})

    async def reply(self, req: Request, outcome: Outcome) -> None:
        if not req.request_id:
            return
        key = self.keys.reply(req.request_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(key, json.dumps({**outcome.to_json(), "node": self.node,
                                    "request_id": req.request_id}))
        pipe.expire(key, REPLY_TTL_S)
        await pipe.execute()

    async def _identity(self, req: Request) -> str:
        """This broadcast's identity, the same on every controller that heard it: the
        digest of its body and how many times in a row this node heard that body (Redis
        hands every subscriber the messages in one order). Deploy X, evict X, deploy X
        are three messages, not two. A count restarts once its claims expired.

        The count lives in Redis, not in memory: a controller restarted within a claim's
        lifetime would count from 1 again, find its own earlier claim, and drop the new
        request as a duplicate (it did: deploy, evict, restart, deploy)."""
        digest = hashlib.sha256(json.dumps(req.to_doc(), sort_keys=True).encode()
                                ).hexdigest()[:32]
        key = self.keys.heard(self.node, digest)
        pipe = self.redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.pexpire(key, self.claim_ttl_ms)
        count, _ = await pipe.execute()
        return f"{digest}:{int(count)}"

    async def _claim(self, identity: str) -> bool:
        return bool(await self.redis.set(self.keys.claim(identity), self.node, nx=True,
                                         px=self.claim_ttl_ms))

    async def _other_live_nodes(self) -> list[str]:
        return [n.node for n in await self.nodes.live() if n.node != self.node]


#: A deploy's existence check: one listing, bounded.
EXISTS_TIMEOUT_S = 10.0


async def model_exists(uri: ModelURI) -> bool:
    """False only when the store answers that nothing is at ``uri`` (an empty prefix, a
    missing directory). An error or a timeout cannot tell, and lets the deploy in: it
    then fails and backs off as any failing model does."""
    try:
        async with open_store(uri) as store:
            objects = await asyncio.wait_for(store.list(), EXISTS_TIMEOUT_S)
    except ObjectNotFoundError:
        return False
    except (StorageError, OSError, TimeoutError) as exc:
        log.info("could not list %s before accepting it (%s): accepted", uri, exc)
        return True
    return bool(objects)
