"""Event parsing: every notification format, every refusal, fuzzing, the watch rule."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from warmpool.contract.keys import RedisKeys
from warmpool.contract.notifications import (
    MAX_PAYLOAD_BYTES,
    ObjectRemoved,
    ObjectUploaded,
    parse_event,
)
from warmpool.contract.requests import MAX_TP, EngineLayoutWant, Request
from warmpool.contract.watchlist import Watchlist
from warmpool.errors import BadEvent, InvalidURIError, WarmpoolError
from warmpool.model.uri import ModelURI, parse_uri


def s3_record(
    key: str,
    *,
    name: str = "ObjectCreated:Put",
    source: str = "aws:s3",
    bucket: str = "models-prod",
    size: Any = 1024,
    etag: str = "0123456789abcdef0123456789abcdef",
) -> dict[str, Any]:
    """One record shaped like AWS's documented example (eventVersion 2.1)."""
    return {
        "eventVersion": "2.1",
        "eventSource": source,
        "awsRegion": "us-west-2",
        "eventTime": "2024-05-01T12:00:00.000Z",
        "eventName": name,
        "userIdentity": {"principalId": "AWS:AIDAEXAMPLEUSER"},
        "requestParameters": {"sourceIPAddress": "203.0.113.7"},
        "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810", "x-amz-id-2": "FMyUV/IgA"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "warmpool-uploads",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "A3NL1KOZZKEXAMPLE"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": {"key": key, "size": size, "eTag": etag, "sequencer": "0055AED6DCD90281E5"},
        },
    }


AWS_PUT = {"Records": [s3_record("llama-3-8b/model-00001-of-00004.safetensors", size=4976698672)]}

# MinIO: "s3:" in event names, '/' encoded as %2F, and its own EventName/Key summary.
MINIO_PUT = {
    "EventName": "s3:ObjectCreated:Put",
    "Key": "models/llama%2Fconfig.json",
    "Records": [
        {
            **s3_record("llama%2Fconfig.json", name="s3:ObjectCreated:Put", source="minio:s3",
                        bucket="models", etag="5fc7298143efe1276d39a3466d4e255f-1"),
            "source": {"host": "10.0.0.5", "port": "", "userAgent": "MinIO (linux; amd64)"},
        }
    ],
}

# Ceph RGW: size as a string, the raw key (not URL-encoded), eventId and opaqueData.
CEPH_PUT = {
    "Records": [
        {
            **s3_record("llama/tokenizer+extra.json", source="ceph:s3", bucket="mybucket1",
                        size="1024", etag="37b51d194a7513e45b56f6524f2d51f2"),
            "eventId": "1575034045.479484.37b51d194a7513e45b56f6524f2d51f2",
            "opaqueData": "me@example.com",
        }
    ]
}

COMPLETE_MULTIPART = "ObjectCreated:CompleteMultipartUpload"
MULTIPART = {
    "Records": [
        s3_record("m/model-00001-of-00002.safetensors", name=COMPLETE_MULTIPART,
                  size=5_000_000_000, etag="a1b2c3d4e5f60718293a4b5c6d7e8f90-596"),
        s3_record("m/model-00002-of-00002.safetensors", name=COMPLETE_MULTIPART,
                  size=1_200_000_000, etag="0f9e8d7c6b5a49382716a5b4c3d2e1f0-144"),
    ]
}

GCS_RESOURCE = {
    "kind": "storage#object",
    "id": "models-gcs/llama/config.json/1714560000123456",
    "selfLink": "https://www.googleapis.com/storage/v1/b/models-gcs/o/llama%2Fconfig.json",
    "name": "llama/config.json",
    "bucket": "models-gcs",
    "generation": "1714560000123456",
    "metageneration": "1",
    "contentType": "application/json",
    "timeCreated": "2024-05-01T12:00:00.123Z",
    "updated": "2024-05-01T12:00:00.123Z",
    "storageClass": "STANDARD",
    "size": "654",
    "md5Hash": "XUFAKrxLKna5cZ2REBfFkg==",
    "crc32c": "yZRlqg==",
    "etag": "CMDf3b6n1YUDEAE=",
}


def gcs_attributes(event_type: str = "OBJECT_FINALIZE", **extra: str) -> dict[str, str]:
    return {
        "bucketId": "models-gcs",
        "eventTime": "2024-05-01T12:00:00.123456Z",
        "eventType": event_type,
        "notificationConfig": "projects/_/buckets/models-gcs/notificationConfigs/1",
        "objectGeneration": "1714560000123456",
        "objectId": "llama/config.json",
        "payloadFormat": "JSON_API_V1",
        **extra,
    }


def pubsub_message(resource: dict[str, Any] | None, attributes: dict[str, str]) -> dict[str, Any]:
    message: dict[str, Any] = {
        "attributes": attributes,
        "messageId": "11296470374211946",
        "publishTime": "2024-05-01T12:00:00.456Z",
    }
    if resource is not None:
        message["data"] = base64.b64encode(json.dumps(resource).encode()).decode()
    return message


def push_envelope(message: dict[str, Any]) -> dict[str, Any]:
    return {"message": message, "subscription": "projects/acme/subscriptions/warmpool-uploads"}


def parse(doc: Any) -> list[Any]:
    return parse_event(json.dumps(doc).encode())


# --- S3 and friends ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        pytest.param(AWS_PUT, [ObjectUploaded("s3", "models-prod",
                     "llama-3-8b/model-00001-of-00004.safetensors", 4976698672,
                     "0123456789abcdef0123456789abcdef")], id="aws"),
        pytest.param(MINIO_PUT, [ObjectUploaded("s3", "models", "llama/config.json", 1024,
                     "5fc7298143efe1276d39a3466d4e255f-1")], id="minio"),
        pytest.param(CEPH_PUT, [ObjectUploaded("s3", "mybucket1", "llama/tokenizer+extra.json",
                     1024, "37b51d194a7513e45b56f6524f2d51f2")], id="ceph-raw-key"),
        pytest.param(MULTIPART, [
            ObjectUploaded("s3", "models-prod", "m/model-00001-of-00002.safetensors",
                           5_000_000_000, "a1b2c3d4e5f60718293a4b5c6d7e8f90-596"),
            ObjectUploaded("s3", "models-prod", "m/model-00002-of-00002.safetensors",
                           1_200_000_000, "0f9e8d7c6b5a49382716a5b4c3d2e1f0-144"),
        ], id="multipart-two-records"),
    ],
)
def test_s3_notifications_become_uploads(doc: dict[str, Any], expected: list[Any]) -> None:
    assert parse(doc) == expected


def test_uploaded_event_names_its_object_uri() -> None:
    (event,) = parse(AWS_PUT)
    assert event.uri == "s3://models-prod/llama-3-8b/model-00001-of-00004.safetensors"
    assert event.uri == ModelURI("s3", "models-prod", "llama-3-8b/").child(
        "model-00001-of-00004.safetensors")


@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [
        ("my+model/config.json", "my model/config.json"),
        ("m/config%2B1.json", "m/config+1.json"),
        ("m%2Fsub%2Fweights.safetensors", "m/sub/weights.safetensors"),
        ("mod%C3%A8le/caf%C3%A9+%E6%A8%A1%E5%9E%8B.json", "modèle/café 模型.json"),
        ("m/100%25.json", "m/100%.json"),
    ],
)
def test_s3_keys_are_url_decoded(encoded: str, decoded: str) -> None:
    (event,) = parse({"Records": [s3_record(encoded)]})
    assert event.key == decoded


def test_quoted_etag_is_unquoted() -> None:
    (event,) = parse({"Records": [s3_record("m/a.json", etag='"abc"')]})
    assert event.etag == "abc"


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("ObjectRemoved:Delete", "aws:s3"),
        ("ObjectRemoved:DeleteMarkerCreated", "aws:s3"),
        ("LifecycleExpiration:Delete", "aws:s3"),
        ("s3:ObjectRemoved:Delete", "minio:s3"),
        ("ObjectLifecycle:Expiration:Current", "ceph:s3"),
    ],
)
def test_s3_removals_become_object_removed(name: str, source: str) -> None:
    record = s3_record("m/model.safetensors", name=name, source=source)
    del record["s3"]["object"]["size"], record["s3"]["object"]["eTag"]  # deletes carry neither
    expected = ObjectRemoved("s3", "models-prod", "m/model.safetensors")
    assert parse({"Records": [record]}) == [expected]


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param({"Service": "Amazon S3", "Event": "s3:TestEvent",
                      "Time": "2024-05-01T12:00:00Z", "Bucket": "models-prod",
                      "RequestId": "5582815E1AEA5ADF",
                      "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE"},
                     id="s3-test-event"),
        pytest.param({"Records": [s3_record("m/a", name="s3:ObjectAccessed:Get")]}, id="accessed"),
        pytest.param({"Records": [s3_record("m/a", name="ObjectTagging:Put")]}, id="tagging"),
        pytest.param({"Records": []}, id="no-records"),
        pytest.param(pubsub_message(GCS_RESOURCE, gcs_attributes("OBJECT_METADATA_UPDATE")),
                     id="gcs-metadata-update"),
    ],
)
def test_events_warmpool_does_not_act_on_are_ignored(doc: dict[str, Any]) -> None:
    assert parse(doc) == []


def test_folder_marker_key_is_accepted() -> None:
    (event,) = parse({"Records": [s3_record("models/llama/", size=0)]})
    assert event.key == "models/llama/"


# --- GCS ---------------------------------------------------------------------------------

GCS_UPLOAD = ObjectUploaded("gs", "models-gcs", "llama/config.json", 654, "1714560000123456")


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param(GCS_RESOURCE, id="bare-resource"),
        pytest.param(pubsub_message(GCS_RESOURCE, gcs_attributes()), id="pubsub-message"),
        pytest.param(push_envelope(pubsub_message(GCS_RESOURCE, gcs_attributes())), id="push"),
    ],
)
def test_gcs_finalize_becomes_upload(doc: dict[str, Any]) -> None:
    assert parse(doc) == [GCS_UPLOAD]
    assert GCS_UPLOAD.uri == "gs://models-gcs/llama/config.json"


def test_gcs_payload_format_none_uses_attributes() -> None:
    doc = push_envelope(pubsub_message(None, gcs_attributes(payloadFormat="NONE")))
    assert parse(doc) == [ObjectUploaded("gs", "models-gcs", "llama/config.json", None,
                                         "1714560000123456")]


def test_gcs_resource_with_large_custom_metadata_is_accepted() -> None:
    resource = {**GCS_RESOURCE, "metadata": {f"label-{i}": "v" * 60 for i in range(100)}}
    assert parse(push_envelope(pubsub_message(resource, gcs_attributes()))) == [GCS_UPLOAD]


@pytest.mark.parametrize("event_type", ["OBJECT_DELETE", "OBJECT_ARCHIVE"])
def test_gcs_delete_and_archive_become_removed(event_type: str) -> None:
    doc = push_envelope(pubsub_message(GCS_RESOURCE, gcs_attributes(event_type)))
    assert parse(doc) == [ObjectRemoved("gs", "models-gcs", "llama/config.json")]


def test_gcs_overwrite_is_marked_so_it_is_not_taken_for_a_deletion() -> None:
    attrs = gcs_attributes("OBJECT_ARCHIVE", overwrittenByGeneration="1714560000999999")
    (event,) = parse(pubsub_message(GCS_RESOURCE, attrs))
    assert event == ObjectRemoved("gs", "models-gcs", "llama/config.json", overwritten=True)


# --- requests ----------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["deploy", "evict", "pin", "unpin"])
def test_request_actions_with_defaults(action: str) -> None:
    (request,) = parse({"action": action, "uri": "s3://models-prod/llama-3-8b"})
    assert request == Request(action, parse_uri("s3://models-prod/llama-3-8b/"))
    defaults = (request.device, request.tp, request.sharding, request.node)
    assert defaults == ("cpu", 1, "replicated", None)


def test_request_with_every_field() -> None:
    doc = {"action": "evict", "uri": "gs://models-gcs/llama/", "device": "cuda:3", "tp": 8,
           "sharding": "sharded", "node": "gpu-node-07.example", "request_id": "req-42",
           "force": True}
    assert parse(doc) == [Request("evict", ModelURI("gs", "models-gcs", "llama/"), "cuda:3", 8,
                                  "sharded", "gpu-node-07.example", "req-42", force=True)]


@pytest.mark.parametrize("doc", [
    {"action": "pin", "uri": "s3://b/m/"},
    {"action": "deploy", "uri": "s3://b/m/", "device": "cuda:1", "tp": 2, "sharding": "sharded",
     "node": "n1", "request_id": "r"},
    {"action": "evict", "uri": "s3://b/m/", "force": True},
])
def test_request_to_doc_reads_back_as_the_same_request(doc: dict[str, Any]) -> None:
    (request,) = parse(doc)
    assert parse(request.to_doc()) == [request]
    assert request.pinned == (doc["action"] == "pin")


def test_request_layout_is_the_old_name_of_sharding() -> None:
    (request,) = parse({"action": "deploy", "uri": "s3://b/m/", "layout": "sharded"})
    assert request.sharding == "sharded" and "layout" not in request.to_doc()
    with pytest.raises(BadEvent) as err:
        parse({"action": "deploy", "uri": "s3://b/m/", "layout": "sharded",
               "sharding": "replicated"})
    assert err.value.reason == "bad_field"


def test_request_nulls_mean_defaults() -> None:
    doc = {"action": "pin", "uri": "az://c/m/", "device": None, "tp": None, "layout": None,
           "node": None, "request_id": None}
    assert parse(doc) == [Request("pin", ModelURI("az", "c", "m/"))]


def test_request_accepts_gpu_uuid_and_str_payload() -> None:
    device = "cuda:GPU-5c8e4a1b-2f3d-4e5f-8a9b-0c1d2e3f4a5b"
    (request,) = parse_event(json.dumps({"action": "deploy", "uri": "s3://b/m", "device": device}))
    assert request.device == device


def test_request_engine_layout_is_parsed_and_reads_back() -> None:
    doc = {"action": "pin", "uri": "s3://b/m/", "engine_layout": {
        "engine": "vllm", "dtype": "bfloat16", "tp": 2, "max_model_len": 4096}}
    (request,) = parse(doc)
    assert request.engine_layout == EngineLayoutWant("vllm", "bfloat16", 2, 4096)
    assert parse(request.to_doc()) == [request]
    (plain,) = parse({"action": "deploy", "uri": "s3://b/m/", "engine_layout": {"engine": "vllm"}})
    assert plain.engine_layout == EngineLayoutWant("vllm", "auto", 1, None)
    assert plain.to_doc()["engine_layout"] == {"engine": "vllm", "dtype": "auto", "tp": 1}
    assert "engine_layout" not in parse(REQ_PLAIN)[0].to_doc()


REQ_PLAIN = {"action": "deploy", "uri": "s3://b/m/"}


@pytest.mark.parametrize("layout", [
    {"engine": "vllm", "tp": 2, "python": "/bin/sh"},  # unknown key: no program by request
    {"dtype": "bfloat16"},  # no engine
    {"engine": "sglang"},
    {"engine": ["vllm"]},
    {"engine": "vllm", "dtype": "int4"},
    {"engine": "vllm", "dtype": 16},
    {"engine": "vllm", "tp": "2"},
    {"engine": "vllm", "tp": True},
    {"engine": "vllm", "tp": 1.5},
    {"engine": "vllm", "tp": 0},
    {"engine": "vllm", "tp": MAX_TP + 1},
    {"engine": "vllm", "tp": 10**30},
    {"engine": "vllm", "max_model_len": "4096"},
    {"engine": "vllm", "max_model_len": 0},
    {"engine": "vllm", "max_model_len": 1 << 40},
    "vllm",
    ["vllm"],
])
def test_request_engine_layout_is_checked_strictly(layout: object) -> None:
    with pytest.raises(BadEvent) as err:
        parse({**REQ_PLAIN, "engine_layout": layout})
    assert err.value.reason == "bad_field" and "engine_layout" in str(err.value)


@pytest.mark.parametrize("doc", [
    {"action": "evict", "uri": "s3://b/m/"},
    {"action": "unpin", "uri": "s3://b/m/"},
    {"action": "deploy", "uri": "s3://b/m/", "device": "cuda:0"},
])
def test_request_engine_layout_only_with_a_deploy_or_pin_on_cpu(doc: dict[str, Any]) -> None:
    with pytest.raises(BadEvent) as err:
        parse({**doc, "engine_layout": {"engine": "vllm"}})
    assert err.value.reason == "bad_field" and "deploy or pin on device cpu" in str(err.value)


# --- refusals ----------------------------------------------------------------------------

REQ = {"action": "deploy", "uri": "s3://b/m/"}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json at all", "not_json"),
        (b"\xff\xfe\x00garbage", "not_json"),
        (b"[" * 100_000, "not_json"),
        (b'{"tp": ' + b"9" * 5000 + b"}", "not_json"),
        (b"[1, 2]", "unknown_shape"),
        (b'"deploy"', "unknown_shape"),
        (b"null", "unknown_shape"),
        (b'{"hello": "world"}', "unknown_shape"),
        ({**REQ, "action": "delete"}, "bad_action"),
        ({**REQ, "action": ["deploy"]}, "bad_action"),
        ({**REQ, "uri": "ftp://b/m/"}, "bad_uri"),
        ({**REQ, "uri": "s3://b/../etc/"}, "bad_uri"),
        ({**REQ, "uri": "s3:///m/"}, "bad_uri"),
        ({**REQ, "uri": "relative/model"}, "bad_uri"),
        ({**REQ, "uri": 42}, "bad_uri"),
        ({"action": "deploy"}, "bad_uri"),
        ({**REQ, "device": "gpu0"}, "bad_device"),
        ({**REQ, "device": "cuda"}, "bad_device"),
        ({**REQ, "device": "cuda:٣"}, "bad_device"),
        ({**REQ, "device": "cuda:0 "}, "bad_device"),
        ({**REQ, "tp": 0}, "bad_field"),
        ({**REQ, "tp": 65}, "bad_field"),
        ({**REQ, "tp": 2.0}, "bad_field"),
        ({**REQ, "tp": "2"}, "bad_field"),
        ({**REQ, "tp": True}, "bad_field"),
        ({**REQ, "layout": "striped"}, "bad_field"),
        ({**REQ, "sharding": "striped"}, "bad_field"),
        ({**REQ, "node": "../other"}, "bad_field"),
        ({**REQ, "node": "a:b"}, "bad_field"),
        ({**REQ, "devcie": "cuda:0"}, "bad_field"),
        ({**REQ, "request_id": "x" * 200}, "bad_field"),
        ({**REQ, "force": "yes"}, "bad_field"),
        ({**REQ, "force": 1}, "bad_field"),
        ({"Records": {"not": "a list"}}, "bad_field"),
        ({"Records": ["nope"]}, "bad_field"),
        ({"Records": [{"eventName": 7}]}, "bad_field"),
        ({"Records": [{"eventName": "ObjectCreated:Put"}]}, "bad_field"),
        ({"Records": [s3_record("m/a.json", bucket="../x")]}, "bad_field"),
        ({"Records": [s3_record("m/a.json", size=-1)]}, "bad_field"),
        ({"Records": [s3_record("m/a.json", size="12kb")]}, "bad_field"),
        ({"Records": [s3_record("m/%FF.json")]}, "bad_field"),
        ({"Records": [s3_record("m/" + "k" * 1100)]}, "bad_field"),
        ({"Records": [s3_record("m/\ud800.json")]}, "bad_field"),
        ({"Records": [s3_record("../../etc/passwd")]}, "unsafe_key"),
        ({"Records": [s3_record("%2E%2E%2Fetc%2Fpasswd")]}, "unsafe_key"),
        ({"Records": [s3_record("/etc/passwd")]}, "unsafe_key"),
        ({"Records": [s3_record("%2Fetc%2Fpasswd")]}, "unsafe_key"),
        ({"Records": [s3_record("m/a%00.json")]}, "unsafe_key"),
        ({"Records": [s3_record("m/./a.json")]}, "unsafe_key"),
        ({"Records": [s3_record("m//a.json")]}, "unsafe_key"),
        ({"Records": [s3_record("m/a.json"), s3_record("m/../../x")]}, "unsafe_key"),
        ({**GCS_RESOURCE, "name": "../../root/.ssh/authorized_keys"}, "unsafe_key"),
        ({**GCS_RESOURCE, "generation": "abc"}, "bad_field"),
        (pubsub_message(GCS_RESOURCE, gcs_attributes("OBJECT_EXPLODE")), "bad_field"),
        ({"message": {"attributes": gcs_attributes(), "data": "***not base64***"}}, "bad_field"),
        ({"message": {"attributes": gcs_attributes(), "data": "bm90IGpzb24="}}, "not_json"),
        ({"message": {"attributes": gcs_attributes(), "data": "WzFd"}}, "bad_field"),
        ({"message": {"attributes": "eventType=OBJECT_FINALIZE"}}, "bad_field"),
    ],
)
def test_bad_events_are_refused_with_a_reason(payload: Any, reason: str) -> None:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    with pytest.raises(BadEvent) as caught:
        parse_event(raw)
    assert caught.value.reason == reason, caught.value
    assert caught.value.detail and str(caught.value).startswith(reason)


def test_oversized_payload_is_refused_before_parsing() -> None:
    huge = b'{"pad": "' + b"x" * MAX_PAYLOAD_BYTES + b'"}'
    with pytest.raises(BadEvent, match="oversized"):
        parse_event(huge)
    with pytest.raises(BadEvent, match="oversized"):
        parse_event(huge.decode())
    with pytest.raises(BadEvent, match="oversized"):
        parse_event(json.dumps(REQ), max_bytes=10)
    # the bound counts UTF-8 bytes, not characters: 39 characters, 40 bytes
    text = '{"action": "deploy", "uri": "s3://b/é"}'
    assert parse_event(text, max_bytes=40)
    with pytest.raises(BadEvent, match="oversized"):
        parse_event(text, max_bytes=39)


def test_non_bytes_payload_is_a_bad_event_too() -> None:
    with pytest.raises(BadEvent, match="not_json"):
        parse_event(None)  # type: ignore[arg-type]


def test_file_uri_symlink_loop_is_bad_uri(tmp_path: Any) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(BadEvent, match="bad_uri"):
        parse({"action": "deploy", "uri": f"file://{tmp_path}/a"})


def test_bad_event_is_a_warmpool_error() -> None:
    error = BadEvent("bad_device", "device 'tpu0'")
    assert isinstance(error, WarmpoolError) and isinstance(error, ValueError)
    assert (error.reason, error.detail) == ("bad_device", "device 'tpu0'")


# --- fuzzing -------------------------------------------------------------------------------

VOCAB = ["Records", "eventName", "eventSource", "s3", "bucket", "object", "name", "key",
         "size", "eTag", "message", "attributes", "data", "eventType", "bucketId", "objectId",
         "objectGeneration", "overwrittenByGeneration", "kind", "generation", "action", "uri",
         "device", "tp", "layout", "sharding", "node", "request_id", "Event"]
WORDS = ["ObjectCreated:Put", "s3:ObjectRemoved:Delete", "ObjectLifecycle:Expiration:Current",
         "ceph:s3", "minio:s3", "OBJECT_FINALIZE", "OBJECT_DELETE", "OBJECT_METADATA_UPDATE",
         "storage#object", "s3:TestEvent", "deploy", "evict", "s3://b/m/", "file:///tmp/",
         "cpu", "cuda:0", "sharded", "b", "m/a.json", "../x", "%2E%2E/x", "\x00", "12",
         base64.b64encode(json.dumps(GCS_RESOURCE).encode()).decode()]

leaves = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
          | st.sampled_from(WORDS))
json_docs = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(VOCAB) | st.text(max_size=6), children, max_size=6),
    max_leaves=24,
)
SAMPLES = [AWS_PUT, MINIO_PUT, CEPH_PUT, MULTIPART, GCS_RESOURCE,
           push_envelope(pubsub_message(GCS_RESOURCE, gcs_attributes())),
           {"action": "deploy", "uri": "s3://b/m/", "device": "cuda:0", "tp": 2, "node": "n1"}]


def check_parse(payload: bytes | str) -> None:
    """The property: a list of well-formed events, or BadEvent; nothing else escapes."""
    try:
        events = parse_event(payload)
    except BadEvent as error:
        assert error.reason in {"oversized", "not_json", "unknown_shape", "bad_action",
                                "bad_uri", "bad_device", "bad_field", "unsafe_key"}
        return
    assert isinstance(events, list)
    for event in events:
        assert isinstance(event, (ObjectUploaded, ObjectRemoved, Request))
        if not isinstance(event, Request):
            segments = event.key.rstrip("/").split("/")
            assert "\x00" not in event.key and not event.key.startswith("/")
            assert not {"", ".", ".."} & set(segments)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(payload: bytes) -> None:
    check_parse(payload)


@FUZZ
@given(st.text(max_size=256))
def test_fuzz_arbitrary_text(payload: str) -> None:
    check_parse(payload)


@FUZZ
@given(json_docs)
def test_fuzz_arbitrary_json(doc: Any) -> None:
    check_parse(json.dumps(doc))


@FUZZ
@given(st.sampled_from(SAMPLES), st.data())
def test_fuzz_mutated_real_events(sample: dict[str, Any], data: st.DataObject) -> None:
    """Real payloads with one node replaced at random: reaches deep validation paths."""
    doc = copy.deepcopy(sample)
    node: Any = doc
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            node = child
            continue
        node[key] = data.draw(json_docs)
        break
    check_parse(json.dumps(doc))


# --- the watch list ------------------------------------------------------------------------

WATCH = Watchlist.parse(["s3://b/models/", "s3://b/models/special/", "gs://g", "s3://other/x/"])


@pytest.mark.parametrize(
    ("scheme", "bucket", "key", "model"),
    [
        ("s3", "b", "models/llama/config.json", "s3://b/models/llama/"),
        ("s3", "b", "models/llama/sub/dir/w.safetensors", "s3://b/models/llama/"),
        ("s3", "b", "models/llama/", "s3://b/models/llama/"),
        ("s3", "b", "models/config.json", "s3://b/models/"),
        ("s3", "b", "models/special/config.json", "s3://b/models/special/"),
        ("s3", "b", "models/special/v2/config.json", "s3://b/models/special/v2/"),
        ("gs", "g", "llama/config.json", "gs://g/llama/"),
        ("gs", "g", "config.json", "gs://g/"),
        ("s3", "b", "modelsX/llama/config.json", None),
        ("s3", "b", "other/llama/config.json", None),
        ("gs", "b", "models/llama/config.json", None),
        ("s3", "g", "llama/config.json", None),
        ("s3", "other", "y/config.json", None),
    ],
)
def test_watchlist_maps_objects_to_models(
    scheme: str, bucket: str, key: str, model: str | None
) -> None:
    found = WATCH.match(scheme, bucket, key)
    assert (str(found) if found else None) == model


def test_watchlist_maps_an_event_end_to_end() -> None:
    (event,) = parse({"Records": [s3_record("models/my+model/config.json", bucket="b")]})
    model = WATCH.match(event.scheme, event.bucket, event.key)
    assert model == ModelURI("s3", "b", "models/my model/")


def test_watchlist_parses_env_style_strings() -> None:
    watch = Watchlist.parse(" s3://b/models , gs://g/m/,,s3://b/models/ ")
    assert watch.prefixes == (ModelURI("s3", "b", "models/"), ModelURI("gs", "g", "m/"))
    assert Watchlist.parse([]).match("s3", "b", "x/y") is None
    with pytest.raises(InvalidURIError):
        Watchlist.parse("ftp://nope/")


# --- Redis ---------------------------------------------------------------------------------


def test_redis_key_names() -> None:
    keys = RedisKeys()
    assert (keys.events_channel, keys.requests_stream, keys.dead_stream, keys.consumer_group) == (
        "warmpool:events", "warmpool:requests", "warmpool:dead", "warmpool-controllers")
    assert keys.node_stream("n1") == "warmpool:requests:n1"
    assert keys.entry("ab12", "cuda:0", "n1") == "warmpool:entry:ab12:n1:cuda:0"
    assert RedisKeys("t1").lock("ab12", "cpu", "n1") == "t1:lock:ab12:n1:cpu"


async def test_redis_server_kill_and_restart_on_the_same_port(redis_server: Any) -> None:
    keys = RedisKeys()
    request = json.dumps(REQ).encode()
    client = aioredis.Redis.from_url(redis_server.url)
    await client.xadd(keys.requests_stream, {"payload": request})
    port = redis_server.port

    redis_server.kill()
    with pytest.raises(redis.exceptions.ConnectionError):
        await client.ping()
    await client.aclose()

    redis_server.restart()
    assert redis_server.port == port
    fresh = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await fresh.xlen(keys.requests_stream) == 0  # no persistence: a crash forgets
        await fresh.xgroup_create(keys.requests_stream, keys.consumer_group, id="0", mkstream=True)
        await fresh.xadd(keys.requests_stream, {"payload": request})
        pubsub = fresh.pubsub()
        await pubsub.subscribe(keys.events_channel)
        assert await fresh.publish(keys.events_channel, request) == 1
        read = await fresh.xreadgroup(keys.consumer_group, "c1", {keys.requests_stream: ">"})
        [[_, [(_, fields)]]] = read
        assert parse_event(fields[b"payload"]) == [Request("deploy", ModelURI("s3", "b", "m/"))]
        await pubsub.aclose()
    finally:
        await fresh.aclose()
