"""Field checks shared by every payload parser: each raises :class:`BadEvent` with a
short reason code and a bounded detail, never another exception, whatever the input."""

from __future__ import annotations

from typing import Any

from warmpool.errors import BadEvent

#: S3 and GCS both cap object names at 1024 bytes of UTF-8.
MAX_KEY_BYTES = 1024


def mapping(value: object, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadEvent("bad_field", f"{name!r} must be an object")
    return value


def text(value: object, name: str, *, max_len: int = MAX_KEY_BYTES * 3) -> str:
    """A string that can be written back out: lone surrogates (legal in JSON escapes)
    would make redis-py or a file name raise far from here."""
    if not isinstance(value, str) or len(value) > max_len:
        raise BadEvent("bad_field", f"{name!r} must be a string of at most {max_len} chars")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadEvent("bad_field", f"{name!r} is not valid Unicode") from None
    return value


def optional_text(value: object, name: str, *, max_len: int = 256) -> str | None:
    return None if value is None else text(value, name, max_len=max_len)


def clip(value: object, limit: int = 80) -> str:
    """A bounded repr: details land in logs and the dead-letter stream."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
