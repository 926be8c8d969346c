"""The loaders that fill a buffer from a model's files: one table of names.

Torch-free, so that a config file, a request or a worker message naming a loader is
checked where it enters (:func:`check_loader`) without importing the loaders. The fill
functions, one signature each, are :data:`warmpool.loading.streaming.FILLS`, keyed by the
same names (a test holds them together).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from warmpool.errors import ConfigError

#: A loader chosen for one model: ``auto`` resolves to one of these
#: (:func:`warmpool.loading.streaming.choose_loader`).
Chosen = Literal["runai", "native", "pread"]
#: What a caller may ask for.
Loader = Literal["auto", "runai", "native", "pread"]


@dataclass(frozen=True)
class LoaderInfo:
    name: Chosen
    reads: str  # what it reads, for help texts and errors
    local_only: bool


LOADERS_BY_NAME: dict[str, LoaderInfo] = {
    "runai": LoaderInfo("runai", "runai-model-streamer: local files, S3, GCS, Azure; "
                        "distributed across a worker group", local_only=False),
    "native": LoaderInfo("native", "warmpool's own async clients: every store warmpool "
                         "lists", local_only=False),
    "pread": LoaderInfo("pread", "threads of preadv on local files", local_only=True),
}
#: Every name a caller may give: ``auto`` first (the default), then the loaders.
LOADERS: tuple[str, ...] = ("auto", *LOADERS_BY_NAME)


def check_loader(name: object, where: str = "loader") -> Loader:
    """``name`` if it names a loader (or ``auto``); else a one-line ConfigError saying
    where it came from and what may be chosen."""
    if name not in LOADERS:
        raise ConfigError(f"{where}: unknown loader {name!r}; choose one of "
                          f"{', '.join(LOADERS)}")
    return name  # type: ignore[return-value]
