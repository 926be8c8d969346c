"""The exceptions a caller can catch by meaning.

Every error warmpool raises on purpose derives from :class:`WarmpoolError`, so a
serving process can ``except WarmpoolError`` around ``attach`` and a CLI can turn any
of them into one clear line and a non-zero exit code. Sub-classes group by what the
caller can do about it: fix the input, retry later, or free capacity.
"""

from __future__ import annotations


class WarmpoolError(Exception):
    """Base of every deliberate warmpool error."""


class InvalidURIError(WarmpoolError, ValueError):
    """A string that is not a model location warmpool understands."""


class ConfigError(WarmpoolError, ValueError):
    """A configuration value (flag, variable or file) that cannot be used."""


# --- storage ---------------------------------------------------------------------


class StorageError(WarmpoolError):
    """A storage operation failed; ``key`` names the object, the message says why."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ObjectNotFoundError(StorageError):
    """The object (or bucket/container) does not exist. Not retried."""


class AccessDeniedError(StorageError):
    """Credentials were refused. Not retried."""


class TransientStorageError(StorageError):
    """A failure that a retry may cure (timeouts, 5xx, throttling, resets)."""


class ObjectChangedError(StorageError):
    """An object changed after the listing that named the model's version: its bytes are
    not that version's. Not retried as is; a new listing (a new version) starts over."""


class UnsafeKeyError(StorageError, ValueError):
    """An object key that would escape its model directory (``..``, absolute paths)."""


# --- model contents ----------------------------------------------------------------


class SafetensorsError(WarmpoolError, ValueError):
    """A safetensors file is malformed. ``file`` and ``tensor`` say where."""

    def __init__(self, message: str, *, file: str, tensor: str | None = None) -> None:
        where = f"{file}: tensor {tensor!r}: " if tensor is not None else f"{file}: "
        super().__init__(where + message)
        self.file = file
        self.tensor = tensor


class IncompleteModelError(WarmpoolError):
    """The prefix does not (yet) hold a complete model; ``missing`` lists what lacks."""

    def __init__(self, message: str, *, missing: list[str] | None = None) -> None:
        super().__init__(message)
        self.missing = missing or []


class MetadataLimitError(WarmpoolError, ValueError):
    """A model's non-weight files exceed what the metadata cache will hold."""


# --- the pool ------------------------------------------------------------------------


class CheckpointMismatchError(WarmpoolError, ValueError):
    """The weights do not belong to the model an engine or library was configured with:
    another content hash, or tensor names or shapes its module does not have."""


class UntrustedCodeError(CheckpointMismatchError):
    """A checkpoint asks to run code of its own (``auto_map`` in its config, Python files
    beside it): warmpool never runs code from a bucket unless both the caller
    (``trust_remote_code=True``) and the node (``cache_code: true``) said so."""


class PoolError(WarmpoolError):
    """A pool operation was refused."""


class NotWarmError(PoolError, LookupError):
    """``attach`` was asked for a model that is not warm on that device."""


class CapacityError(PoolError):
    """Not enough room on a tier, even after evicting what may be evicted."""

    def __init__(self, message: str, *, needed: int, free: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.free = free


class LeaseHeldError(PoolError):
    """Eviction refused because a serving process holds a lease."""


class ForeignSegmentError(PoolError):
    """A shared-memory name of ours holds something we did not create: refused."""


class StreamError(WarmpoolError):
    """Streaming weights into a resident buffer failed; nothing partial stays."""


class PeerError(StreamError):
    """A peer could not give a range (it died, evicted, stalled, or sent bytes whose
    checksum is wrong): the range is read from another peer or from the store."""


class WorkerError(WarmpoolError):
    """A worker process failed, died or answered with an error."""


class ControllerError(WarmpoolError):
    """No controller answered, or it answered with a failure."""


class ProtocolError(WarmpoolError):
    """A message on a local socket was malformed, oversized or from a foreign uid."""


class ExportError(WarmpoolError):
    """The engine could not load the model, so no engine layout was written."""


class UnsafeCacheError(WarmpoolError):
    """A compile cache directory that is not private to this user (another owner, a
    symbolic link, group or world access): its generated code would be run, so it is
    refused."""


class NotConfigured(WarmpoolError):
    """No program is configured for the engine: retrying cannot help until it is."""


class DesiredStateFull(WarmpoolError):
    """The node already wants as many models as it may; evict some first."""


class NoSuchModel(WarmpoolError):
    """A deploy or pin of a location where the store says nothing is: refused when it
    arrives, so it never takes room in the desired state (1,100 deploys of missing paths
    once filled it and locked real deploys out)."""


class BadEvent(WarmpoolError, ValueError):
    """A payload the controller cannot act on.

    ``reason`` is a stable code. Parsing gives ``oversized``, ``not_json``,
    ``unknown_shape``, ``bad_action``, ``bad_uri``, ``bad_device``, ``bad_field``,
    ``unsafe_key`` or ``not_accepted`` (a shape the endpoint does not take); a relay adds
    its policy's refusals (:mod:`warmpool.relay.policy`); the controller adds
    ``not_watched`` (an upload under no watched prefix), and the dead-letter stream also
    holds ``poison`` entries (a stream entry delivered too often without being done).
    ``detail`` says what was wrong, for a human reading the dead-letter stream.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
