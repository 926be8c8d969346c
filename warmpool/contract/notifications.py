"""Payloads the controller and the relays take, parsed from untrusted input.

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
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias
from urllib.parse import unquote_plus

from warmpool.contract import fields
from warmpool.contract.requests import Request, parse_request
from warmpool.errors import BadEvent, UnsafeKeyError
from warmpool.storage.base import validate_relative_key

#: Payloads larger than this are refused before JSON parsing (a notification is ~1 KiB).
MAX_PAYLOAD_BYTES = 256 * 1024
# Wide enough for S3 (including legacy names), MinIO, Ceph and GCS; no '/', ':', '@'.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_GCS_UPLOADED = frozenset({"OBJECT_FINALIZE"})
_GCS_REMOVED = frozenset({"OBJECT_DELETE", "OBJECT_ARCHIVE"})
_GCS_IGNORED = frozenset({"OBJECT_METADATA_UPDATE"})


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
    raise BadEvent("unknown_shape", f"no known event has the keys {fields.clip(sorted(doc))}")


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
        raise BadEvent("not_json", fields.clip(str(exc))) from None


# --- S3 --------------------------------------------------------------------------------


def _s3_records(records: object) -> list[Event]:
    if not isinstance(records, list):
        raise BadEvent("bad_field", "'Records' must be a list")
    events = [_s3_record(record) for record in records]
    return [e for e in events if e is not None]


def _s3_record(record: object) -> Event | None:
    record = fields.mapping(record, "Records[]")
    # MinIO (and older Ceph) prefix event names with "s3:"; AWS does not.
    name = fields.text(record.get("eventName"), "eventName").removeprefix("s3:")
    removed = name.startswith(("ObjectRemoved:", "LifecycleExpiration:"))
    removed = removed or name.startswith("ObjectLifecycle:Expiration")  # Ceph's name
    if not (removed or name.startswith("ObjectCreated:")):
        return None  # access, tagging, restore, replication...: nothing to warm
    source = fields.text(record.get("eventSource", "aws:s3"), "eventSource")
    s3 = fields.mapping(record.get("s3"), "s3")
    bucket = _bucket(fields.mapping(s3.get("bucket"), "s3.bucket").get("name"))
    obj = fields.mapping(s3.get("object"), "s3.object")
    raw_key = fields.text(obj.get("key"), "s3.object.key")
    key = _safe_key(raw_key if source == "ceph:s3" else _unquote(raw_key))
    if removed:
        return ObjectRemoved("s3", bucket, key)
    etag = fields.optional_text(obj.get("eTag"), "s3.object.eTag")
    size = _size(obj.get("size"), "s3.object.size")
    return ObjectUploaded("s3", bucket, key, size, etag.strip('"') if etag else None)


def _unquote(raw_key: str) -> str:
    try:
        return unquote_plus(raw_key, errors="strict")
    except UnicodeDecodeError:
        raise BadEvent("bad_field",
                       f"key {fields.clip(raw_key)} is not URL-encoded UTF-8") from None


# --- GCS -------------------------------------------------------------------------------


def _pubsub(message: dict[str, Any]) -> list[Event]:
    attributes = fields.mapping(message.get("attributes", {}), "attributes")
    event_type = fields.text(attributes.get("eventType", "OBJECT_FINALIZE"), "eventType")
    data = message.get("data")
    # payloadFormat NONE: no data, the attributes name the object
    resource = fields.mapping(_json(_b64(data)), "data") if data else {}
    return _gcs(resource, attributes, event_type)


def _gcs(resource: dict[str, Any], attributes: dict[str, Any], event_type: str) -> list[Event]:
    if event_type in _GCS_IGNORED:
        return []
    if event_type not in _GCS_UPLOADED | _GCS_REMOVED:
        raise BadEvent("bad_field", f"unknown GCS eventType {fields.clip(event_type)}")
    bucket = _bucket(resource.get("bucket", attributes.get("bucketId")))
    key = _safe_key(fields.text(resource.get("name", attributes.get("objectId")), "name"))
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


# --- field checks of notifications ------------------------------------------------------


def _size(value: object, name: str) -> int | None:
    """Sizes and generations: JSON numbers (AWS, MinIO) or digit strings (Ceph, GCS)."""
    if value is None:
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64:
        return value
    raise BadEvent("bad_field", f"{name!r} {fields.clip(value)} is not a non-negative integer")


def _bucket(value: object) -> str:
    if not isinstance(value, str) or not _BUCKET.fullmatch(value):
        raise BadEvent("bad_field", f"bucket {fields.clip(value)} is not a bucket name")
    return value


def _safe_key(key: str) -> str:
    """The cache's own rule (no ``..``, ``.``, empty segments, absolute paths, NUL);
    one trailing ``/`` is allowed, because consoles create "folder" marker objects."""
    if len(key.encode("utf-8")) > fields.MAX_KEY_BYTES:
        raise BadEvent("bad_field", f"key longer than {fields.MAX_KEY_BYTES} bytes")
    try:
        validate_relative_key(key[:-1] if key.endswith("/") else key)
    except UnsafeKeyError as exc:
        raise BadEvent("unsafe_key", str(exc)) from None
    return key
