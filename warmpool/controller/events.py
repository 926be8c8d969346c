"""Events the controller acts on, parsed from untrusted payloads.

Anything that can write to Redis can hand the controller a payload, so parsing is the
boundary: :func:`parse_event` turns bytes into frozen values or raises
:class:`BadEvent` with a short ``reason`` code (the dead-letter stream and the metrics
count by it) — never any other exception, whatever the input.

Shapes understood:

- S3 event notifications (``{"Records": [...]}``) as AWS, MinIO and Ceph RGW send them.
  AWS and MinIO URL-encode object keys form-style (``+`` is a space, MinIO even encodes
  ``/`` as ``%2F``); Ceph RGW sends the raw key, so decoding it would corrupt keys that
  hold ``+`` or ``%``. ``s3:TestEvent`` (sent when a notification is configured) is
  ignored.
- GCS notifications: the JSON object resource, bare or inside a Pub/Sub message
  (``{"attributes": ..., "data": base64}``) or a Pub/Sub push envelope
  (``{"message": {...}, "subscription": ...}``).
- Requests (``{"action": "deploy", "uri": ..., ...}``): deploy, evict, pin, unpin; a
  deploy or pin on ``cpu`` may add ``"engine_layout": {"engine": "vllm", "dtype": ...,
  "tp": ..., "max_model_len": ...}`` (:class:`EngineLayoutWant`).
  :meth:`Request.to_doc` writes the same shape back, for forwarding and desired state.

One payload may carry several S3 records; it is accepted or refused as a whole, so a
dead-lettered payload was never partly acted on and replaying it acts on each record once.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias
from urllib.parse import unquote_plus

from warmpool.errors import BadEvent, InvalidURIError, UnsafeKeyError
from warmpool.storage.base import validate_relative_key
from warmpool.model.uri import ModelURI, parse_uri

#: Payloads larger than this are refused before JSON parsing (a notification is ~1 KiB).
MAX_PAYLOAD_BYTES = 256 * 1024
#: S3 and GCS both cap object names at 1024 bytes of UTF-8.
MAX_KEY_BYTES = 1024
MAX_TP = 64

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
# Wide enough for S3 (including legacy names), MinIO, Ceph and GCS; no '/', ':', '@'.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_GCS_UPLOADED = frozenset({"OBJECT_FINALIZE"})
_GCS_REMOVED = frozenset({"OBJECT_DELETE", "OBJECT_ARCHIVE"})
_GCS_IGNORED = frozenset({"OBJECT_METADATA_UPDATE"})
_REQUEST_FIELDS = frozenset({"action", "uri", "device", "tp", "sharding", "node",
                             "request_id", "force", "engine_layout",
                             "layout"})  # the old name of "sharding", still accepted
#: Engines a deploy may ask an engine layout of, and what their ``engine_layout`` takes.
LAYOUT_ENGINES: tuple[str, ...] = ("vllm",)
LAYOUT_DTYPES: tuple[str, ...] = ("auto", "bfloat16", "float16", "float32", "half", "float")
_LAYOUT_FIELDS = frozenset({"engine", "dtype", "tp", "max_model_len"})
MAX_MODEL_LEN = 1 << 24


@dataclass(frozen=True)
class ObjectEvent:
    """Something happened to one object. ``key`` is decoded and checked safe."""

    scheme: Literal["s3", "gs"]
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        """``s3://bucket/key`` — the same unescaped form as :meth:`ModelURI.child`."""
        return f"{self.scheme}://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class ObjectUploaded(ObjectEvent):
    """An object was written. ``etag`` is the S3 ETag (unquoted) or the GCS generation,
    the same value a listing gives, so it can be compared with a cached manifest."""

    size: int | None = None
    etag: str | None = None


@dataclass(frozen=True)
class ObjectRemoved(ObjectEvent):
    """An object was deleted, archived or expired.

    ``overwritten`` is True when GCS reports that a newer generation replaced it: that
    is half of an upload (its ``OBJECT_FINALIZE`` comes too), not a deletion.
    """

    overwritten: bool = False


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

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"engine": self.engine, "dtype": self.dtype, "tp": self.tp,
                               "max_model_len": self.max_model_len}
        return {k: v for k, v in doc.items() if v is not None}


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

    @property
    def pinned(self) -> bool:
        return self.action == "pin"

    def to_doc(self) -> dict[str, Any]:
        """The payload that :func:`parse_event` reads back as this request (fields that
        are unset left out)."""
        doc: dict[str, Any] = {"action": self.action, "uri": str(self.uri),
                               "device": self.device, "tp": self.tp, "sharding": self.sharding,
                               "node": self.node, "request_id": self.request_id,
                               "force": self.force or None,
                               "engine_layout": (self.engine_layout.to_doc()
                                                 if self.engine_layout else None)}
        return {k: v for k, v in doc.items() if v is not None}


Event: TypeAlias = ObjectUploaded | ObjectRemoved | Request


#: The shapes a payload can have (:func:`shape_of`). A relay accepts a subset: a bucket's
#: queue carries ``s3`` and ``s3_test`` only, a webhook's notification path no
#: ``request``; the controller, reading Redis (whose clients are trusted), takes all.
Shape = Literal["request", "s3", "s3_test", "pubsub_push", "pubsub", "gcs"]
SHAPES: tuple[str, ...] = ("request", "s3", "s3_test", "pubsub_push", "pubsub", "gcs")
NOTIFICATION_SHAPES: frozenset[str] = frozenset(SHAPES) - {"request"}
S3_SHAPES: frozenset[str] = frozenset({"s3", "s3_test"})


def shape_of(doc: dict[str, Any]) -> Shape:
    """Which kind of payload a decoded JSON object is; raises :class:`BadEvent`
    (``unknown_shape``) for none."""
    if "action" in doc:
        return "request"
    if "Records" in doc:
        return "s3"
    if doc.get("Event") == "s3:TestEvent":
        return "s3_test"
    if isinstance(doc.get("message"), dict):
        return "pubsub_push"
    if "attributes" in doc or "data" in doc:
        return "pubsub"
    if doc.get("kind") == "storage#object" or ("bucket" in doc and "name" in doc):
        return "gcs"
    raise BadEvent("unknown_shape", f"no known event has the keys {_clip(sorted(doc))}")


def parse_event(payload: bytes | str, *, max_bytes: int = MAX_PAYLOAD_BYTES,
                accept: frozenset[str] | None = None) -> list[Event]:
    """Parse one payload into zero or more events; raise :class:`BadEvent` otherwise.

    An empty list means "understood, nothing to do" (a test event, a metadata update,
    an S3 event type warmpool does not care about). ``accept`` (shape names, see
    :data:`SHAPES`) refuses the other shapes as ``not_accepted``, before their content
    is looked at.
    """
    doc = _load_json(payload, max_bytes)
    if not isinstance(doc, dict):
        raise BadEvent("unknown_shape", f"expected a JSON object, got {type(doc).__name__}")
    shape = shape_of(doc)
    if accept is not None and shape not in accept:
        what = "a request (deploy, evict, pin, unpin)" if shape == "request" else \
            f"a {shape} notification"
        raise BadEvent("not_accepted", f"this endpoint does not take {what}; it takes "
                       f"{', '.join(s for s in SHAPES if s in accept)}")
    if shape == "request":
        return [parse_request(doc)]
    if shape == "s3":
        return _s3_records(doc["Records"])
    if shape == "s3_test":
        return []
    if shape == "pubsub_push":
        return _pubsub(doc["message"])
    if shape == "pubsub":
        return _pubsub(doc)
    return _gcs(doc, {}, "OBJECT_FINALIZE")


# --- payload -------------------------------------------------------------------------


def _load_json(payload: object, max_bytes: int) -> Any:
    if isinstance(payload, (bytearray, memoryview)):
        payload = bytes(payload)
    if isinstance(payload, str):
        size = len(payload)  # characters <= UTF-8 bytes: refuse a long one unencoded
        if size <= max_bytes:
            size = len(payload.encode("utf-8", "surrogatepass"))
    elif isinstance(payload, bytes):
        size = len(payload)
    else:
        raise BadEvent("not_json", f"payload is {type(payload).__name__}, not bytes or str")
    if size > max_bytes:
        raise BadEvent("oversized", f"payload of {size} bytes exceeds {max_bytes}")
    return _json(payload)


def _json(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except RecursionError:  # nesting deeper than the interpreter's stack
        raise BadEvent("not_json", "JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
        raise BadEvent("not_json", _clip(str(exc))) from None


# --- S3 --------------------------------------------------------------------------------


def _s3_records(records: object) -> list[Event]:
    if not isinstance(records, list):
        raise BadEvent("bad_field", "'Records' must be a list")
    events = [_s3_record(record) for record in records]
    return [e for e in events if e is not None]


def _s3_record(record: object) -> Event | None:
    record = _mapping(record, "Records[]")
    # MinIO (and older Ceph) prefix event names with "s3:"; AWS does not.
    name = _text(record.get("eventName"), "eventName").removeprefix("s3:")
    removed = name.startswith(("ObjectRemoved:", "LifecycleExpiration:"))
    removed = removed or name.startswith("ObjectLifecycle:Expiration")  # Ceph's name
    if not (removed or name.startswith("ObjectCreated:")):
        return None  # access, tagging, restore, replication...: nothing to warm
    source = _text(record.get("eventSource", "aws:s3"), "eventSource")
    s3 = _mapping(record.get("s3"), "s3")
    bucket = _bucket(_mapping(s3.get("bucket"), "s3.bucket").get("name"))
    obj = _mapping(s3.get("object"), "s3.object")
    raw_key = _text(obj.get("key"), "s3.object.key")
    key = _safe_key(raw_key if source == "ceph:s3" else _unquote(raw_key))
    if removed:
        return ObjectRemoved("s3", bucket, key)
    etag = _optional_text(obj.get("eTag"), "s3.object.eTag")
    size = _size(obj.get("size"), "s3.object.size")
    return ObjectUploaded("s3", bucket, key, size, etag.strip('"') if etag else None)


def _unquote(raw_key: str) -> str:
    try:
        return unquote_plus(raw_key, errors="strict")
    except UnicodeDecodeError:
        raise BadEvent("bad_field", f"key {_clip(raw_key)} is not URL-encoded UTF-8") from None


# --- GCS -------------------------------------------------------------------------------


def _pubsub(message: dict[str, Any]) -> list[Event]:
    attributes = _mapping(message.get("attributes", {}), "attributes")
    event_type = _text(attributes.get("eventType", "OBJECT_FINALIZE"), "eventType")
    data = message.get("data")
    # payloadFormat NONE: no data, the attributes name the object
    resource = _mapping(_json(_b64(data)), "data") if data else {}
    return _gcs(resource, attributes, event_type)


def _gcs(resource: dict[str, Any], attributes: dict[str, Any], event_type: str) -> list[Event]:
    if event_type in _GCS_IGNORED:
        return []
    if event_type not in _GCS_UPLOADED | _GCS_REMOVED:
        raise BadEvent("bad_field", f"unknown GCS eventType {_clip(event_type)}")
    bucket = _bucket(resource.get("bucket", attributes.get("bucketId")))
    key = _safe_key(_text(resource.get("name", attributes.get("objectId")), "name"))
    if event_type in _GCS_REMOVED:
        return [ObjectRemoved("gs", bucket, key, "overwrittenByGeneration" in attributes)]
    generation = resource.get("generation", attributes.get("objectGeneration"))
    size = _size(resource.get("size"), "size")
    return [ObjectUploaded("gs", bucket, key, size, _generation(generation))]


def _b64(data: object) -> bytes:
    if not isinstance(data, str):  # no length cap here: the payload bound covers it
        raise BadEvent("bad_field", "'data' must be a base64 string")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        raise BadEvent("bad_field", "'data' is not base64") from None


def _generation(value: object) -> str | None:
    if value is None:
        return None
    return str(_size(value, "generation"))


# --- requests --------------------------------------------------------------------------


def parse_request(doc: dict[str, Any]) -> Request:
    """A request payload already decoded from JSON; raises :class:`BadEvent`."""
    # Strict: a misspelt field ("devcie") must not quietly become a default.
    unknown = doc.keys() - _REQUEST_FIELDS
    if unknown:
        raise BadEvent("bad_field", f"unknown request fields {_clip(sorted(unknown))}")
    if "layout" in doc:  # the old name of "sharding"
        doc = dict(doc)
        old = doc.pop("layout")
        if old is not None:
            if doc.get("sharding") is not None:
                raise BadEvent("bad_field", "give 'sharding' only ('layout' is its old name)")
            doc["sharding"] = old
    action = doc.get("action")
    if action not in ACTIONS:
        raise BadEvent("bad_action", f"action {_clip(action)} is not one of {ACTIONS}")
    request = Request(
        action=action,
        uri=_model_uri(doc.get("uri")),
        device=_device(_default(doc, "device", "cpu")),
        tp=_tp(_default(doc, "tp", 1)),
        sharding=_sharding(_default(doc, "sharding", "replicated")),
        node=_node(doc.get("node")),
        request_id=_optional_text(doc.get("request_id"), "request_id", max_len=128),
        force=_flag(_default(doc, "force", False), "force"),
        engine_layout=_engine_layout(doc.get("engine_layout")),
    )
    if request.engine_layout is not None and (
            request.action not in ("deploy", "pin") or request.device != "cpu"):
        raise BadEvent("bad_field", "engine_layout goes with a deploy or pin on device cpu "
                       "(engine layouts live on the host tier)")
    return request


def _engine_layout(value: object) -> EngineLayoutWant | None:
    if value is None:
        return None
    doc = _mapping(value, "engine_layout")
    unknown = doc.keys() - _LAYOUT_FIELDS
    if unknown:
        raise BadEvent("bad_field", f"unknown engine_layout fields {_clip(sorted(unknown))}")
    engine = doc.get("engine")
    if engine not in LAYOUT_ENGINES:
        raise BadEvent("bad_field", f"engine_layout.engine {_clip(engine)} is not one of "
                       f"{LAYOUT_ENGINES}")
    dtype = _default(doc, "dtype", "auto")
    if dtype not in LAYOUT_DTYPES:
        raise BadEvent("bad_field", f"engine_layout.dtype {_clip(dtype)} is not one of "
                       f"{LAYOUT_DTYPES}")
    tp = _default(doc, "tp", 1)
    if isinstance(tp, bool) or not isinstance(tp, int) or not 1 <= tp <= MAX_TP:
        raise BadEvent("bad_field", f"engine_layout.tp {_clip(tp)} is not an integer in "
                       f"1..{MAX_TP}")
    length = doc.get("max_model_len")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int)
                               or not 1 <= length <= MAX_MODEL_LEN):
        raise BadEvent("bad_field", f"engine_layout.max_model_len {_clip(length)} is not an "
                       f"integer in 1..{MAX_MODEL_LEN}")
    return EngineLayoutWant(engine, dtype, tp, length)


def _default(doc: dict[str, Any], name: str, default: Any) -> Any:
    """``null`` means "not given": producers serialise ``None`` that way."""
    value = doc.get(name)
    return default if value is None else value


def _model_uri(value: object) -> ModelURI:
    if not isinstance(value, str):
        raise BadEvent("bad_uri", f"uri {_clip(value)} is not a string")
    text = _text(value, "uri", max_len=4096)
    # A plain path would be resolved against *this* process's working directory.
    if "://" not in text:
        raise BadEvent("bad_uri", f"uri {_clip(text)} needs a scheme (s3://, gs://, ...)")
    try:
        return parse_uri(text)
    except InvalidURIError as exc:
        raise BadEvent("bad_uri", str(exc)) from None
    except (OSError, RuntimeError, ValueError) as exc:  # file:// resolution (symlink loop)
        raise BadEvent("bad_uri", f"uri {_clip(text)}: {exc}") from None


def _device(value: object) -> str:
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise BadEvent("bad_device", f"device {_clip(value)}: use cpu, cuda:N or cuda:GPU-<uuid>")
    return value


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadEvent("bad_field", f"{name} {_clip(value)} is not true or false")
    return value


def _tp(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TP:
        raise BadEvent("bad_field", f"tp {_clip(value)} is not an integer in 1..{MAX_TP}")
    return value


def _sharding(value: object) -> Sharding:
    if value not in SHARDINGS:
        raise BadEvent("bad_field", f"sharding {_clip(value)} is not one of {SHARDINGS}")
    return value  # type: ignore[return-value]


def _node(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _NODE.fullmatch(value):
        raise BadEvent("bad_field", f"node {_clip(value)} is not a host name")
    return value


# --- field helpers ---------------------------------------------------------------------


def _mapping(value: object, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadEvent("bad_field", f"{name!r} must be an object")
    return value


def _text(value: object, name: str, *, max_len: int = MAX_KEY_BYTES * 3) -> str:
    """A string that can be written back out: lone surrogates (legal in JSON escapes)
    would make redis-py or a file name raise far from here."""
    if not isinstance(value, str) or len(value) > max_len:
        raise BadEvent("bad_field", f"{name!r} must be a string of at most {max_len} chars")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadEvent("bad_field", f"{name!r} is not valid Unicode") from None
    return value


def _optional_text(value: object, name: str, *, max_len: int = 256) -> str | None:
    return None if value is None else _text(value, name, max_len=max_len)


def _size(value: object, name: str) -> int | None:
    """Sizes and generations: JSON numbers (AWS, MinIO) or digit strings (Ceph, GCS)."""
    if value is None:
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64:
        return value
    raise BadEvent("bad_field", f"{name!r} {_clip(value)} is not a non-negative integer")


def _bucket(value: object) -> str:
    if not isinstance(value, str) or not _BUCKET.fullmatch(value):
        raise BadEvent("bad_field", f"bucket {_clip(value)} is not a bucket name")
    return value


def _safe_key(key: str) -> str:
    """The cache's own rule (no ``..``, ``.``, empty segments, absolute paths, NUL);
    one trailing ``/`` is allowed, because consoles create "folder" marker objects."""
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise BadEvent("bad_field", f"key longer than {MAX_KEY_BYTES} bytes")
    try:
        validate_relative_key(key[:-1] if key.endswith("/") else key)
    except UnsafeKeyError as exc:
        raise BadEvent("unsafe_key", str(exc)) from None
    return key


def _clip(value: object, limit: int = 80) -> str:
    """A bounded repr: details land in logs and the dead-letter stream."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- the watch list ----------------------------------------------------------------------


@dataclass(frozen=True)
class Watchlist:
    """The prefixes whose uploads the controller acts on.

    Mapping rule, from an object to the model it belongs to: take the longest watched
    prefix the object lies under. If the object lies directly in it
    (``models/config.json`` under ``s3://b/models/``), the model *is* that prefix. If it
    lies deeper, the prefix is a *models root* and the model is the prefix plus the
    first path segment below it: ``models/llama/config.json`` and
    ``models/llama/sub/x.safetensors`` both belong to ``s3://b/models/llama/``.

    So watch a models root (one directory per model) or a model directory itself. A
    watched model directory whose files sit in sub-directories would map those files to
    a nested "model"; watch its parent instead. Objects under no watched prefix map to
    ``None``.
    """

    prefixes: tuple[ModelURI, ...] = ()

    @classmethod
    def parse(cls, entries: str | Iterable[str]) -> Watchlist:
        """From config ``watch: [...]`` or ``WARMPOOL_WATCH`` (comma-separated).

        Raises :class:`InvalidURIError` for an entry that is not a model location.
        """
        items = entries.split(",") if isinstance(entries, str) else entries
        uris = (parse_uri(item.strip()) for item in items if item.strip())
        return cls(tuple(dict.fromkeys(uris)))

    def match(self, bucket_scheme: str, bucket: str, key: str) -> ModelURI | None:
        """The model prefix ``key`` belongs to (see the class docstring), or ``None``."""
        candidates = [
            p for p in self.prefixes
            if p.scheme == bucket_scheme and p.bucket == bucket and key.startswith(p.prefix)
        ]
        if not candidates:
            return None
        root = max(candidates, key=lambda p: len(p.prefix))
        below = key[len(root.prefix):]
        if "/" not in below:
            return root
        segment = below.split("/", 1)[0]
        if not segment:  # "models//x": no model is named by an empty segment
            return None
        return ModelURI(root.scheme, root.bucket, root.prefix + segment + "/")
