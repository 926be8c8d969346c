"""What a worker is asked to load: the model's identity, headers, and per-rank layouts.

The client plans, the worker executes: the content hash (sha256 over the listing,
:func:`warmpool.model.identity.content_hash`), every shard's validated safetensors header,
and from them the layout each rank receives. A ``replicated`` group gives every rank the
whole layout; a ``sharded`` one gives rank r a layout over its own pre-sharded files only
— by default ``model-rank-{rank}-part-{part}.safetensors``, the names vLLM's sharded-state
format writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from warmpool.config import Settings
from warmpool.errors import ConfigError
from warmpool.model.safetensors import SafetensorsHeader
from warmpool.model.uri import ModelURI
from warmpool.pool.layout import Layout, plan_layout

DEFAULT_SHARD_PATTERN = "model-rank-{rank}-part-{part}.safetensors"
SHARDINGS = ("replicated", "sharded")


@dataclass(frozen=True)
class ModelPlan:
    """A model's identity and headers; build it from a metadata cache if you have one."""

    uri: ModelURI
    content_hash: str
    headers: dict[str, SafetensorsHeader]  # relative key → header

    def layout(self, files: list[str] | None = None) -> Layout:
        chosen = self.headers if files is None else {k: self.headers[k] for k in files}
        return plan_layout(self.content_hash, chosen.items())

    def rank_layouts(self, world: int, sharding: str = "replicated",
                     pattern: str = DEFAULT_SHARD_PATTERN) -> list[Layout]:
        """One buffer layout per rank of a ``world``-sized group."""
        if sharding not in SHARDINGS:
            raise ConfigError(f"unknown sharding {sharding!r}; choose "
                              f"{' or '.join(SHARDINGS)}")
        if sharding == "replicated":
            return [self.layout()] * world
        files = shard_files(list(self.headers), world, pattern)
        return [self.layout(files[rank]) for rank in range(world)]


def shard_regex(pattern: str) -> re.Pattern[str]:
    if "{rank}" not in pattern:
        raise ConfigError(f"shard pattern {pattern!r} must contain {{rank}}")
    text = re.escape(pattern)
    text = text.replace(re.escape("{rank}"), r"(?P<rank>\d+)")
    text = text.replace(re.escape("{part}"), r"(?P<part>\d+)")
    return re.compile(text + r"\Z")


def shard_files(keys: list[str], world: int, pattern: str = DEFAULT_SHARD_PATTERN
                ) -> list[list[str]]:
    """Rank r's files, in part order; refuses a model sharded for another group size."""
    regex = shard_regex(pattern)
    by_rank: dict[int, list[tuple[int, str]]] = {}
    for key in keys:
        m = regex.match(key)
        if m:
            part = int(m.group("part")) if "part" in m.groupdict() else 0
            by_rank.setdefault(int(m.group("rank")), []).append((part, key))
    if not by_rank:
        raise ConfigError(f"no file matches the shard pattern {pattern!r}; is the model "
                          "pre-sharded? (use --sharding replicated otherwise)")
    ranks = sorted(by_rank)
    if ranks != list(range(world)):
        raise ConfigError(f"the model is sharded for ranks {ranks}, not for a group of "
                          f"{world} (--tp {len(ranks)}?)")
    return [[key for _, key in sorted(by_rank[r])] for r in range(world)]


async def plan_model(uri: ModelURI, cache_dir: Path | None = None) -> ModelPlan:
    """The model's identity and headers, through the metadata cache like every prefetch:
    one listing, the small files and headers fetched once and reused."""
    from warmpool.model.cache import MetadataCache

    root = cache_dir if cache_dir is not None else Settings.load().cache_dir
    cached = await MetadataCache(root).fetch(uri)
    return ModelPlan(uri, cached.content_hash, dict(cached.headers))
