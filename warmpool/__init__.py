"""warmpool: keep LLM weights warm and let serving processes attach in milliseconds.

The public surface is small on purpose::

    import warmpool

    warmpool.prefetch("s3://bucket/models/llama/")             # warm it (or find it warm)
    weights = warmpool.attach("s3://bucket/models/llama/", device="cpu")
    model.load_state_dict(weights, assign=True)  # views: keep the lease while they serve
    ...
    weights.close()

``prefetch``, ``evict``, ``status`` and ``metadata`` go through this node's controller
when one runs and work in this process otherwise (:mod:`warmpool.operations`).
Everything a caller may want to catch derives from :class:`WarmpoolError`.

Names are imported on first use: a serving process that imports warmpool for ``attach``
loads neither torch (until it attaches), the controller, nor a storage SDK.
"""

from __future__ import annotations

import importlib
import typing

from warmpool.errors import (
    AccessDeniedError,
    CapacityError,
    CheckpointMismatchError,
    ConfigError,
    ControllerError,
    IncompleteModelError,
    InvalidURIError,
    LeaseHeldError,
    NotWarmError,
    ObjectNotFoundError,
    PoolError,
    ProtocolError,
    SafetensorsError,
    StorageError,
    StreamError,
    UnsafeCacheError,
    WarmpoolError,
    WorkerError,
)

if typing.TYPE_CHECKING:
    from warmpool.attachment import AttachedModel, attach
    from warmpool.model.cache import CachedModel
    from warmpool.operations import (
        Evicted,
        Prefetched,
        arena,
        cluster,
        compile_caches,
        engine_env,
        evict,
        metadata,
        prefetch,
        status,
        trim,
    )
    from warmpool.pool.registry.base import PoolEntry, State

__version__ = "0.2.0"

#: Public name → the module that defines it, imported when the name is first used.
_LAZY = {
    "AttachedModel": "warmpool.attachment",
    "attach": "warmpool.attachment",
    "CachedModel": "warmpool.model.cache",
    "Evicted": "warmpool.operations",
    "Prefetched": "warmpool.operations",
    "evict": "warmpool.operations",
    "metadata": "warmpool.operations",
    "prefetch": "warmpool.operations",
    "status": "warmpool.operations",
    "arena": "warmpool.operations",
    "trim": "warmpool.operations",
    "engine_env": "warmpool.operations",
    "cluster": "warmpool.operations",
    "compile_caches": "warmpool.operations",
    "PoolEntry": "warmpool.pool.registry.base",
    "State": "warmpool.pool.registry.base",
}


def __getattr__(name: str) -> typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'warmpool' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AccessDeniedError",
    "AttachedModel",
    "CachedModel",
    "CapacityError",
    "CheckpointMismatchError",
    "ConfigError",
    "ControllerError",
    "Evicted",
    "IncompleteModelError",
    "InvalidURIError",
    "LeaseHeldError",
    "NotWarmError",
    "ObjectNotFoundError",
    "PoolEntry",
    "PoolError",
    "Prefetched",
    "ProtocolError",
    "SafetensorsError",
    "State",
    "StorageError",
    "StreamError",
    "UnsafeCacheError",
    "WarmpoolError",
    "WorkerError",
    "__version__",
    "arena",
    "attach",
    "cluster",
    "compile_caches",
    "engine_env",
    "evict",
    "metadata",
    "prefetch",
    "status",
    "trim",
]
