"""Requests: deploy, evict, pin and unpin one model on one device.

What an operator, a scheduler or ``warmpool prefetch`` publishes, what the desired state
keeps (the deploy or pin still in force) and what the dispatcher warms: one type for all
three (:class:`Request`), so that no field is lost converting between them. A deploy or
pin on ``cpu`` may add ``"engine_layout": {"engine": "vllm", "dtype": ..., "tp": ...,
"max_model_len": ...}`` (:class:`EngineLayoutWant`). :meth:`Request.to_doc` writes the
shape that :func:`parse_request` reads back, for forwarding and desired state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from warmpool.contract import fields
from warmpool.engines import LAYOUT_ENGINES
from warmpool.errors import BadEvent, InvalidURIError
from warmpool.model.uri import ModelURI, parse_uri

MAX_TP = 64
#: What an ``engine_layout`` takes (its engines: :data:`warmpool.engines.LAYOUT_ENGINES`).
LAYOUT_DTYPES: tuple[str, ...] = ("auto", "bfloat16", "float16", "float32", "half", "float")
MAX_MODEL_LEN = 1 << 24

Action = Literal["deploy", "evict", "pin", "unpin"]
#: How a ``tp`` > 1 group holds the model: every rank all of it, or each rank its shard.
Sharding = Literal["replicated", "sharded"]
ACTIONS: tuple[str, ...] = ("deploy", "evict", "pin", "unpin")
SHARDINGS: tuple[str, ...] = ("replicated", "sharded")

_DEVICE = re.compile(
    r"cpu|cuda:[0-9]{1,3}"
    r"|cuda:GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
# Node names become parts of Redis keys (a node's stream): hostname characters only.
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
_REQUEST_FIELDS = frozenset({"action", "uri", "device", "tp", "sharding", "node",
                             "request_id", "force", "engine_layout",
                             "replicas", "nodes", "node_selector",
                             "layout"})  # the old name of "sharding", still accepted
MAX_REPLICAS = 4096
MAX_LABELS = 32
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
_LAYOUT_FIELDS = frozenset({"engine", "dtype", "tp", "max_model_len", "compile"})


@dataclass(frozen=True)
class EngineLayoutWant:
    """A deploy's ask for an engine layout: once the checkpoint is warm on the host tier,
    the controller runs the engine's loader once (``warmpool export``) with these options,
    which must be those of the serving engines that are to attach it. Which program runs
    is the controller's setting, never the request's."""

    engine: str = "vllm"
    dtype: str = "auto"
    tp: int = 1
    max_model_len: int | None = None
    #: The export compiles too, into the node's compile cache of the key (serving starts
    #: then compile nothing). A request may switch it off, never pass a compilation
    #: config: some of the engine's compilation options name code to import.
    compile: bool = True

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"engine": self.engine, "dtype": self.dtype, "tp": self.tp,
                               "max_model_len": self.max_model_len,
                               "compile": None if self.compile else False}
        return {k: v for k, v in doc.items() if v is not None}


@dataclass(frozen=True)
class Spread:
    """Where in the fleet a deploy or pin should be warm: on ``replicas`` nodes, or on
    every node (``all_nodes``), of those whose labels match ``selector`` (every label
    given, with that value). Kept in Redis as the fleet's record of the model
    (:mod:`warmpool.controller.fleet`), so a node that joins later and matches gets it,
    and a replica whose node dies is placed again."""

    replicas: int | None = None
    all_nodes: bool = False
    selector: tuple[tuple[str, str], ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.selector)

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.replicas is not None:
            doc["replicas"] = self.replicas
        if self.all_nodes:
            doc["nodes"] = "all"
        if self.selector:
            doc["node_selector"] = dict(self.selector)
        return doc

    def describe(self) -> str:
        where = "every node" if self.all_nodes else f"{self.replicas} node(s)"
        labels = ",".join(f"{k}={v}" for k, v in self.selector)
        return where + (f" labelled {labels}" if labels else "")


@dataclass(frozen=True)
class Request:
    """One model on one device: what an operator or a scheduler asks for, what the
    desired state keeps (the deploy or pin still in force) and what the dispatcher warms.

    One type for all three, so that no field is lost converting between them; a pin is a
    deploy that also pins, so :attr:`pinned` is read off the action.
    """

    action: Action
    uri: ModelURI
    device: str = "cpu"
    tp: int = 1
    sharding: Sharding = "replicated"
    node: str | None = None
    request_id: str | None = None
    force: bool = False  # evict: even while serving processes hold leases
    engine_layout: EngineLayoutWant | None = None  # deploy, pin: export one when warm
    spread: Spread | None = None  # deploy, pin naming no node: on several nodes

    @property
    def pinned(self) -> bool:
        return self.action == "pin"

    def to_doc(self) -> dict[str, Any]:
        """The payload that :func:`parse_request` (and
        :func:`~warmpool.contract.notifications.parse_event`) reads back as this request
        (fields that are unset left out)."""
        doc: dict[str, Any] = {"action": self.action, "uri": str(self.uri),
                               "device": self.device, "tp": self.tp, "sharding": self.sharding,
                               "node": self.node, "request_id": self.request_id,
                               "force": self.force or None,
                               "engine_layout": (self.engine_layout.to_doc()
                                                 if self.engine_layout else None),
                               **(self.spread.to_doc() if self.spread else {})}
        return {k: v for k, v in doc.items() if v is not None}


def parse_request(doc: dict[str, Any]) -> Request:
    """A request payload already decoded from JSON; raises :class:`BadEvent`."""
    # Strict: a misspelt field ("devcie") must not quietly become a default.
    unknown = doc.keys() - _REQUEST_FIELDS
    if unknown:
        raise BadEvent("bad_field", f"unknown request fields {fields.clip(sorted(unknown))}")
    if "layout" in doc:  # the old name of "sharding"
        doc = dict(doc)
        old = doc.pop("layout")
        if old is not None:
            if doc.get("sharding") is not None:
                raise BadEvent("bad_field", "give 'sharding' only ('layout' is its old name)")
            doc["sharding"] = old
    action = doc.get("action")
    if action not in ACTIONS:
        raise BadEvent("bad_action", f"action {fields.clip(action)} is not one of {ACTIONS}")
    request = Request(
        action=action,
        uri=_model_uri(doc.get("uri")),
        device=_device(_default(doc, "device", "cpu")),
        tp=_tp(_default(doc, "tp", 1)),
        sharding=_sharding(_default(doc, "sharding", "replicated")),
        node=_node(doc.get("node")),
        request_id=fields.optional_text(doc.get("request_id"), "request_id", max_len=128),
        force=_flag(_default(doc, "force", False), "force"),
        engine_layout=_engine_layout(doc.get("engine_layout")),
        spread=_spread(doc),
    )
    if request.spread is not None and (request.action not in ("deploy", "pin")
                                       or request.node is not None):
        raise BadEvent("bad_field", "replicas, nodes and node_selector go with a deploy or "
                       "pin that names no node")
    if request.engine_layout is not None and (
            request.action not in ("deploy", "pin") or request.device != "cpu"):
        raise BadEvent("bad_field", "engine_layout goes with a deploy or pin on device cpu "
                       "(engine layouts live on the host tier)")
    return request


def _engine_layout(value: object) -> EngineLayoutWant | None:
    if value is None:
        return None
    doc = fields.mapping(value, "engine_layout")
    unknown = doc.keys() - _LAYOUT_FIELDS
    if unknown:
        raise BadEvent("bad_field", f"unknown engine_layout fields {fields.clip(sorted(unknown))}")
    engine = doc.get("engine")
    if engine not in LAYOUT_ENGINES:
        raise BadEvent("bad_field", f"engine_layout.engine {fields.clip(engine)} is not one of "
                       f"{LAYOUT_ENGINES}")
    dtype = _default(doc, "dtype", "auto")
    if dtype not in LAYOUT_DTYPES:
        raise BadEvent("bad_field", f"engine_layout.dtype {fields.clip(dtype)} is not one of "
                       f"{LAYOUT_DTYPES}")
    tp = _default(doc, "tp", 1)
    if isinstance(tp, bool) or not isinstance(tp, int) or not 1 <= tp <= MAX_TP:
        raise BadEvent("bad_field", f"engine_layout.tp {fields.clip(tp)} is not an integer in "
                       f"1..{MAX_TP}")
    length = doc.get("max_model_len")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int)
                               or not 1 <= length <= MAX_MODEL_LEN):
        raise BadEvent("bad_field", f"engine_layout.max_model_len {fields.clip(length)} is not an "
                       f"integer in 1..{MAX_MODEL_LEN}")
    return EngineLayoutWant(engine, dtype, tp, length,
                            _flag(_default(doc, "compile", True), "engine_layout.compile"))


def valid_labels(labels: dict[Any, Any]) -> bool:
    """At most ``MAX_LABELS`` names mapped to values, each of letters, digits and ._/-:
    a node's ``labels`` and a request's ``node_selector`` alike (a selector matches
    labels exactly)."""
    return len(labels) <= MAX_LABELS and all(
        isinstance(k, str) and isinstance(v, str) and _LABEL.fullmatch(k)
        and _LABEL.fullmatch(v) for k, v in labels.items())


def spread_of(doc: dict[str, Any]) -> Spread | None:
    """The fleet fields of a request or a watch entry (``replicas``, ``nodes``,
    ``node_selector``), checked; None when none is given. Raises :class:`BadEvent`."""
    unknown = set(doc) - {"replicas", "nodes", "node_selector"}
    if unknown:
        raise BadEvent("bad_field", f"unknown fields {fields.clip(sorted(unknown))}")
    return _spread(doc)


def _spread(doc: dict[str, Any]) -> Spread | None:
    replicas, nodes, selector = doc.get("replicas"), doc.get("nodes"), doc.get("node_selector")
    if replicas is None and nodes is None and selector is None:
        return None
    if nodes is not None and nodes != "all":
        raise BadEvent("bad_field", f"nodes {fields.clip(nodes)} is not \"all\"")
    if replicas is not None and (isinstance(replicas, bool) or not isinstance(replicas, int)
                                 or not 1 <= replicas <= MAX_REPLICAS):
        raise BadEvent("bad_field", f"replicas {fields.clip(replicas)} is not an integer in "
                       f"1..{MAX_REPLICAS}")
    if replicas is not None and nodes is not None:
        raise BadEvent("bad_field", "give replicas or nodes: \"all\", not both")
    labels: tuple[tuple[str, str], ...] = ()
    if selector is not None:
        given = fields.mapping(selector, "node_selector")
        if not valid_labels(given):
            raise BadEvent("bad_field", f"node_selector takes at most {MAX_LABELS} labels, "
                           "names and values of letters, digits and ._/-")
        labels = tuple(sorted(given.items()))
    if nodes == "all":
        return Spread(None, True, labels)
    return Spread(replicas if replicas is not None else 1, False, labels)  # a selector alone: 1


def _default(doc: dict[str, Any], name: str, default: Any) -> Any:
    """``null`` means "not given": producers serialise ``None`` that way."""
    value = doc.get(name)
    return default if value is None else value


def _model_uri(value: object) -> ModelURI:
    if not isinstance(value, str):
        raise BadEvent("bad_uri", f"uri {fields.clip(value)} is not a string")
    text = fields.text(value, "uri", max_len=4096)
    # A plain path would be resolved against *this* process's working directory.
    if "://" not in text:
        raise BadEvent("bad_uri", f"uri {fields.clip(text)} needs a scheme (s3://, gs://, ...)")
    try:
        return parse_uri(text)
    except InvalidURIError as exc:
        raise BadEvent("bad_uri", str(exc)) from None
    except (OSError, RuntimeError, ValueError) as exc:  # file:// resolution (symlink loop)
        raise BadEvent("bad_uri", f"uri {fields.clip(text)}: {exc}") from None


def _device(value: object) -> str:
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise BadEvent("bad_device",
                       f"device {fields.clip(value)}: use cpu, cuda:N or cuda:GPU-<uuid>")
    return value


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadEvent("bad_field", f"{name} {fields.clip(value)} is not true or false")
    return value


def _tp(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TP:
        raise BadEvent("bad_field", f"tp {fields.clip(value)} is not an integer in 1..{MAX_TP}")
    return value


def _sharding(value: object) -> Sharding:
    if value not in SHARDINGS:
        raise BadEvent("bad_field", f"sharding {fields.clip(value)} is not one of {SHARDINGS}")
    return value  # type: ignore[return-value]


def _node(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _NODE.fullmatch(value):
        raise BadEvent("bad_field", f"node {fields.clip(value)} is not a host name")
    return value
