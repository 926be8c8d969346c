"""Model locations: one value type for ``s3://``, ``gs://``, ``az://``, ``file://`` and paths.

A model is a *prefix*: every object whose key starts with ``prefix`` belongs to it.
The prefix is normalised to end in ``/`` (or to be empty, for a whole bucket) so that
``s3://b/llama`` never also matches ``s3://b/llama-2/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from warmpool.errors import InvalidURIError

SCHEMES = ("s3", "gs", "az", "file")
_ALIASES = {"gcs": "gs", "azure": "az", "abfs": "az"}


#: Characters a file:// URI keeps as they are; everything else is percent-encoded.
_PATH_SAFE = "/-._~!$&'()*+,;=:@[]"


@dataclass(frozen=True, order=True)
class ModelURI:
    """A parsed model location.

    ``bucket`` is the S3 bucket, GCS bucket or Azure container; empty for ``file``.
    ``prefix`` is the key prefix inside it (ends with ``/`` unless empty); for ``file``
    it is the absolute directory path, also ending with ``/``.
    """

    scheme: str
    bucket: str
    prefix: str

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def path(self) -> Path:
        """The local directory of a ``file`` URI."""
        if not self.is_local:
            raise InvalidURIError(f"{self} is not a local path")
        return Path(self.prefix)

    def join(self, relative_key: str) -> str:
        """The full key (or path) of an object inside this model."""
        return self.prefix + relative_key

    def child(self, relative_key: str) -> str:
        """The URI string of one object inside this model."""
        return f"{self}{relative_key}"

    def contains(self, other: ModelURI) -> bool:
        """True when ``other`` lies at or under this prefix (watch lists use it)."""
        return (
            self.scheme == other.scheme
            and self.bucket == other.bucket
            and other.prefix.startswith(self.prefix)
        )

    def __str__(self) -> str:
        if self.is_local:
            # Percent-encoded, so that parse_uri (which decodes a file:// path exactly
            # once) gives this path back byte for byte: a directory named "m%41", "a#b",
            # "a?b" or "a\nb" is itself, never another model or a refused URI. A '#'
            # therefore never appears in a URI string, and can separate an engine
            # layout's key from its checkpoint's URI.
            return f"file://{quote(self.prefix, safe=_PATH_SAFE, errors='surrogateescape')}"
        return f"{self.scheme}://{self.bucket}/{self.prefix}"


def parse_uri(text: str | os.PathLike[str]) -> ModelURI:
    """Parse a model location; anything unrecognised raises :class:`InvalidURIError`.

    A plain path is the path, byte for byte (spaces, ``%``, ``#``, control characters
    included). A URI with a scheme is refused if it holds control characters (urlsplit
    would silently drop a tab or newline and name another model); a ``file://`` path is
    percent-decoded exactly once."""
    raw = os.fspath(text)
    if not raw.strip():
        raise InvalidURIError("empty model URI")
    if "\x00" in raw:
        raise InvalidURIError("model URI contains a NUL byte")
    if "://" not in raw:
        return _local(raw)
    raw = raw.strip()
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        raise InvalidURIError(f"model URI {raw!r} holds control characters; percent-encode "
                              "them in a file:// URI, or give the plain path")
    parts = urlsplit(raw)
    scheme = _ALIASES.get(parts.scheme.lower(), parts.scheme.lower())
    if scheme not in SCHEMES:
        raise InvalidURIError(
            f"unsupported scheme {parts.scheme!r} in {raw!r}; use one of "
            + ", ".join(f"{s}://" for s in SCHEMES)
            + " or a plain path"
        )
    if parts.query or parts.fragment:
        raise InvalidURIError(f"model URI {raw!r} must not carry a query or fragment")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidURIError(f"file URI {raw!r} names a host; use file:///abs/path")
        return _local(unquote(parts.path, errors="surrogateescape"))
    bucket = parts.netloc
    if not bucket:
        raise InvalidURIError(f"model URI {raw!r} has no bucket or container")
    if "@" in bucket or ":" in bucket:
        raise InvalidURIError(f"model URI {raw!r}: credentials or ports do not belong in it")
    return ModelURI(scheme, bucket, _normalise_prefix(parts.path.lstrip("/"), raw))


def _normalise_prefix(prefix: str, raw: str) -> str:
    segments = [s for s in prefix.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise InvalidURIError(f"model URI {raw!r} contains '.' or '..' segments")
    return "/".join(segments) + "/" if segments else ""


def _local(path: str) -> ModelURI:
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops raise RuntimeError on 3.11
        raise InvalidURIError(f"cannot resolve path {path!r}: {exc}") from None
    text = str(resolved)
    return ModelURI("file", "", text if text.endswith("/") else text + "/")
