"""warmpool: keep LLM weights warm and let serving processes attach in milliseconds.

The public surface is small on purpose::

    from warmpool import attach
    with attach("s3://bucket/models/llama/", device="cuda:0") as weights:
        model.load_state_dict(weights, assign=True)

Everything a caller may want to catch derives from :class:`WarmpoolError`.
"""

from warmpool.pool.attachment import AttachedModel, attach
from warmpool.errors import (
    CapacityError,
    IncompleteModelError,
    LeaseHeldError,
    NotWarmError,
    SafetensorsError,
    StorageError,
    StreamError,
    WarmpoolError,
)

__version__ = "0.1.0"

__all__ = [
    "AttachedModel",
    "CapacityError",
    "IncompleteModelError",
    "LeaseHeldError",
    "NotWarmError",
    "SafetensorsError",
    "StorageError",
    "StreamError",
    "WarmpoolError",
    "attach",
    "__version__",
]
