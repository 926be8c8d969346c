"""Every Redis key and channel warmpool uses, in one place (``p`` is the prefix)::

    p:events                          pub/sub   upload notifications, requests (at most once)
    p:requests                        stream    requests for any node; group p-controllers
    p:requests:<node>                 stream    requests placed on one node; same group
    p:dead                            stream    refused payloads: payload, reason, detail,
                                                source (channel, stream, or a relay's
                                                sqs:<queue> / http:<address>), ts
    p:desired:<node>                  hash      what should be warm on <node>: one field per
                                                (model, device), value = the request JSON;
                                                a restarted controller reconciles from it
    p:desired-failures:<node>         hash      desired models whose warm-ups keep failing:
                                                failures, error, retry_at, given_up
    p:entry:<hash>:<node>:<device>    hash      one pool entry: state, layout, size, error,
                                                updated_at (states: pending ... warm)
    p:entries                         set       every entry key, so status needs no SCAN
    p:node:<node>                     string    heartbeat (JSON capacity), expires with a TTL
    p:nodes                           set       every node that ever announced itself
    p:lock:<hash>:<node>:<device>     string    SET NX PX: one fetch/stream per entry at a time
    p:upload-pending:<model uri>      hash      debounce: uploads seen, model not complete yet
    p:uploads-pending                 set       every model uri with an upload-pending hash
    p:upload-check:<model uri>        string    SET NX PX: one controller checks completeness
    p:entries:<node>                  set       the entry keys of one node
    p:claim:<digest>                  string    SET NX PX: one controller acts on a broadcast
    p:reply:<request id>              list      the outcome of a request, for its sender
    p:retiring:<node>                 set       entry keys to evict once no lease holds them
    p:fleet                           hash      models wanted on several nodes
    p:peer-agent:<node>               string    a node's NIXL agent metadata; heartbeat TTL
    p:seed:<hash>:<node>              string    <node> serves <hash> to peers: where, range
                                                checksums; heartbeat TTL
    p:seeds:<hash>                    set       nodes that may hold a seed of <hash>
    p:peer-asks:<node>                list      readers asking <node> for a lease
    p:peer-grant:<id>                 list      <node>'s answer to one ask
    p:peer-reading:<id>               string    PX: a reader is still reading under <id>
    p:first-fill:<hash>               string    SET NX PX: the node reading <hash> from the
                                                bucket for the fleet

Entry and lock keys start with the content hash so ``SCAN p:entry:<hash>:*`` finds every
node that holds a model (placement prefers those). Under Redis Cluster these keys hash
to different slots: update them one at a time, never in one MULTI.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    """Key names under one ``prefix`` (tests and side-by-side deployments change it)."""

    prefix: str = "warmpool"

    @property
    def events_channel(self) -> str:
        return f"{self.prefix}:events"

    @property
    def requests_stream(self) -> str:
        return f"{self.prefix}:requests"

    def node_stream(self, node: str) -> str:
        return f"{self.prefix}:requests:{node}"

    @property
    def dead_stream(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def consumer_group(self) -> str:
        return f"{self.prefix}-controllers"

    def desired(self, node: str) -> str:
        return f"{self.prefix}:desired:{node}"

    def desired_failures(self, node: str) -> str:
        return f"{self.prefix}:desired-failures:{node}"

    def entry(self, content_hash: str, device: str, node: str) -> str:
        return f"{self.prefix}:entry:{content_hash}:{node}:{device}"

    @property
    def entries_index(self) -> str:
        return f"{self.prefix}:entries"

    def node(self, node: str) -> str:
        return f"{self.prefix}:node:{node}"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}:nodes"

    def lock(self, content_hash: str, device: str, node: str) -> str:
        return f"{self.prefix}:lock:{content_hash}:{node}:{device}"

    def upload_pending(self, model_uri: object) -> str:
        """``model_uri``: a :class:`~warmpool.model.uri.ModelURI` or its string."""
        return f"{self.prefix}:upload-pending:{model_uri}"

    # --- the controller's ----------------------------------------------------------
    def node_entries(self, node: str) -> str:
        return f"{self.prefix}:entries:{node}"

    @property
    def uploads_pending(self) -> str:
        return f"{self.prefix}:uploads-pending"

    def upload_check(self, model_uri: object) -> str:
        return f"{self.prefix}:upload-check:{model_uri}"

    def claim(self, digest: str) -> str:
        return f"{self.prefix}:claim:{digest}"

    def heard(self, node: str, digest: str) -> str:
        """How many times in a row ``node`` heard a broadcast body (expires with the
        claims), kept in Redis so that a restarted controller counts on."""
        return f"{self.prefix}:heard:{node}:{digest}"

    def reply(self, request_id: str) -> str:
        return f"{self.prefix}:reply:{request_id}"

    @property
    def fleet(self) -> str:
        """Hash: ``<device> <uri>`` → the fleet's record of a model wanted on several
        nodes (:mod:`warmpool.controller.fleet`)."""
        return f"{self.prefix}:fleet"

    def retiring(self, node: str) -> str:
        return f"{self.prefix}:retiring:{node}"

    # --- peers (warmpool.peers) --------------------------------------------------------
    def peer_agent(self, node: str) -> str:
        return f"{self.prefix}:peer-agent:{node}"

    def seed(self, content_hash: str, node: str) -> str:
        return f"{self.prefix}:seed:{content_hash}:{node}"

    def seeds(self, content_hash: str) -> str:
        return f"{self.prefix}:seeds:{content_hash}"

    def peer_asks(self, node: str) -> str:
        return f"{self.prefix}:peer-asks:{node}"

    def peer_grant(self, ask_id: str) -> str:
        return f"{self.prefix}:peer-grant:{ask_id}"

    def peer_reading(self, ask_id: str) -> str:
        return f"{self.prefix}:peer-reading:{ask_id}"

    def first_fill(self, content_hash: str) -> str:
        return f"{self.prefix}:first-fill:{content_hash}"
