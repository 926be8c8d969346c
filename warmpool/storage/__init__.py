"""Storage backends, chosen by URI scheme; one module per backend.

Backends import their SDK lazily, so ``pip install warmpool`` without the ``s3``,
``gcs`` or ``azure`` extra still works for local models, and a missing extra is a clear
error naming the extra to install.
"""

from __future__ import annotations

import importlib

from warmpool.errors import ConfigError
from warmpool.model.uri import ModelURI
from warmpool.storage.base import ObjectInfo, Store, validate_relative_key

__all__ = ["ObjectInfo", "Store", "open_store", "validate_relative_key"]

_BACKENDS: dict[str, tuple[str, str, str]] = {
    "file": ("warmpool.storage.local", "LocalStore", ""),
    "s3": ("warmpool.storage.s3", "S3Store", "s3"),
    "gs": ("warmpool.storage.gcs", "GCSStore", "gcs"),
    "az": ("warmpool.storage.azure", "AzureStore", "azure"),
}


def open_store(uri: ModelURI) -> Store:
    """The backend for ``uri``; use it as ``async with open_store(uri) as store``."""
    module_name, class_name, extra = _BACKENDS[uri.scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{uri.scheme}:// needs the '{extra}' extra: pip install 'warmpool[{extra}]' ({exc})"
        ) from exc
    return getattr(module, class_name)(uri)
