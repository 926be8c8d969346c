"""The watch list: which uploads warm a model, and which model an object belongs to."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from warmpool.model.uri import ModelURI, parse_uri


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
