"""The watch list: which uploads warm a model, and which model an object belongs to."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from warmpool.contract.requests import Spread, spread_of
from warmpool.errors import BadEvent, InvalidURIError
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
    #: Where in the fleet an upload under a prefix warms (``{"uri": ..., "nodes": "all"}``
    #: in the config file); a prefix without one warms on one node.
    spreads: tuple[tuple[ModelURI, Spread], ...] = ()

    @classmethod
    def parse(cls, entries: str | Iterable[str | Mapping[str, Any]]) -> Watchlist:
        """From config ``watch: [...]`` or ``WARMPOOL_WATCH`` (comma-separated). A config
        entry may be a mapping: ``{"uri": PREFIX, "nodes": "all" | "replicas": N,
        "node_selector": {...}}``.

        Raises :class:`InvalidURIError` for an entry that is not a model location or
        whose fleet fields are wrong.
        """
        items = entries.split(",") if isinstance(entries, str) else entries
        uris: list[ModelURI] = []
        spreads: list[tuple[ModelURI, Spread]] = []
        for item in items:
            if isinstance(item, Mapping):
                uri = parse_uri(str(item.get("uri", "")).strip())
                try:
                    spread = spread_of({k: v for k, v in item.items() if k != "uri"})
                except BadEvent as exc:
                    raise InvalidURIError(f"watch entry {uri}: {exc}") from None
                if spread is not None:
                    spreads.append((uri, spread))
                uris.append(uri)
            elif item.strip():
                uris.append(parse_uri(item.strip()))
        return cls(tuple(dict.fromkeys(uris)), tuple(spreads))

    def spread_for(self, model: ModelURI) -> Spread | None:
        """The fleet spread of the longest watched prefix holding ``model``, if any."""
        found = [(p, s) for p, s in self.spreads if p.contains(model)]
        return max(found, key=lambda f: len(f[0].prefix))[1] if found else None

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
