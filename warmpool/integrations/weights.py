"""The weights of one serving rank, from the best tier that has them.

An engine asks for a model on its device and gets read-only views plus where they came
from. The order is the fastest first: a GPU-tier entry on that very device (device to
device copy), else the host tier (one shared segment; the engine copies to its device),
else the model is warmed now — by ``warmpool prefetch`` in a child process, which asks
this node's controller when one runs, so one process owns the pool — and then attached
from the host tier.
``on_cold="fail"`` turns the last case into an error, for deployments where a cold start
must not hide behind a slow load. Every call logs one line saying which path it took,
how many bytes and how long, so a slower path is never taken silently.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from warmpool.attachment import AttachedModel, attach
from warmpool.config import Settings
from warmpool.errors import CheckpointMismatchError, ConfigError, NotWarmError, WorkerError
from warmpool.model.cache import FILES_DIR, MANIFEST
from warmpool.pool.entries import HOST_DEVICE
from warmpool.pool.refs import ModelRef

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
_HASH = re.compile(r"[0-9a-f]{64}")

Path_ = Literal["gpu", "host", "warmed"]
OnCold = Literal["warm", "fail"]
ON_COLD: tuple[OnCold, ...] = ("warm", "fail")


@dataclass(frozen=True)
class WeightSource:
    """Where one rank's weights came from: ``path`` is ``gpu`` (a GPU-tier entry on the
    rank's device), ``host`` (the host tier) or ``warmed`` (cold; warmed, then attached
    from the host tier); ``seconds`` covers the whole call, warming included."""

    path: Path_
    nbytes: int
    seconds: float
    uri: str

    @property
    def tier(self) -> str:
        return _TIERS[self.path]

    def describe(self) -> str:
        return (f"warmpool: {self.uri} from the {_WORDS[self.path]}: "
                f"{self.nbytes / 1e9:.3f} GB in {self.seconds:.3f} s")


_TIERS = {"gpu": "GPU tier", "host": "host tier", "warmed": "host tier, warmed first"}
_WORDS = {**_TIERS, "warmed": "host tier after warming it (it was cold)"}


def open_weights(uri: str, device: str, *, on_cold: OnCold = "warm",
                 settings: Settings | None = None, holder: str = "",
                 logger: logging.Logger | None = None) -> tuple[AttachedModel, WeightSource]:
    """Attach ``uri`` (a model URI, or a content hash when it is warm) for a rank on
    ``device`` (``cpu``, ``cuda:N``). The caller owns the returned attachment: close it
    once the engine has copied the weights into its own memory."""
    if on_cold not in ON_COLD:
        raise ValueError(f"on_cold must be one of {', '.join(ON_COLD)}, not {on_cold!r}")
    settings = settings or Settings.load()
    logger = logger or log
    started = time.perf_counter()
    path: Path_
    model = attach_gpu_tier(uri, device, settings, holder, logger)
    if model is not None:
        path = "gpu"
    else:
        try:
            model, path = attach(uri, HOST_DEVICE, settings=settings, holder=holder), "host"
        except NotWarmError:
            if on_cold == "fail":
                raise NotWarmError(
                    f"{uri} is not warm on {device} nor on the host tier, and on_cold is "
                    f"'fail': run `warmpool prefetch {uri}` first") from None
            logger.warning("warmpool: %s is cold; warming it now (on_cold='fail' makes "
                           "this an error)", uri)
            warm(uri, settings)
            model, path = attach(uri, HOST_DEVICE, settings=settings, holder=holder), "warmed"
    source = WeightSource(path, model.layout.total_bytes, time.perf_counter() - started,
                          model.uri)
    logger.info("%s", source.describe())
    return model, source


def attach_gpu_tier(uri: str, device: str, settings: Settings, holder: str,
                logger: logging.Logger) -> AttachedModel | None:
    """The GPU-tier entry on ``device``, or None when there is none to use."""
    if not device.startswith("cuda"):
        return None
    try:
        return attach(uri, device, settings=settings, holder=holder)
    except (NotWarmError, WorkerError) as exc:
        # No worker on this GPU, or the model is not warm there: the host tier is the
        # next best, and the path in the log line says which one was taken.
        logger.debug("warmpool: no GPU-tier entry for %s on %s: %s", uri, device, exc)
        return None


def warm(uri: str, settings: Settings) -> None:
    """Make ``uri`` warm on this node's host tier, by running ``warmpool prefetch`` in a
    child process: it asks the controller when one runs (the controller owns the pool),
    else warms in that process. Not in this one: an engine's rank has torch.distributed
    set up, threads pinned to its cores and its own event loop, and the streamer has been
    seen to hang in there, while a separate process starts clean. Ranks that warm the
    same model at once are serialised by the pool's lock; the last ones find it warm."""
    if ModelRef.parse(uri).is_hash:
        raise NotWarmError(f"{uri} is a content hash that is not warm; a hash cannot be "
                           "warmed, name the model by its URI")
    argv = [sys.executable, "-m", "warmpool.cli", "prefetch", uri, "--json"]
    env = {**os.environ, **settings.pool_environment()}
    done = subprocess.run(argv, capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise NotWarmError(f"{uri} is not warm and warming it failed: "
                           f"{reason.removeprefix('error: ')}")


# --- which model an engine was pointed at ----------------------------------------------


EXTRA_KEYS = ("uri", "on_cold", "export", "engine_layout")


@dataclass(frozen=True)
class LoaderOptions:
    """An engine's loader extra config (``model_loader_extra_config``), checked: an
    unknown key is a typo, never ignored."""

    uri: str | None = None
    on_cold: OnCold = "warm"
    #: Write the engine's processed parameters into the pool as an engine-layout entry
    #: after loading them (:mod:`warmpool.engine_layouts`).
    export: bool = False
    #: Start from an engine-layout entry of the same key when there is one (zero-copy);
    #: False always takes the copy path.
    engine_layout: bool = True

    @classmethod
    def parse(cls, extra: Any) -> LoaderOptions:
        if isinstance(extra, str):  # engines pass the CLI's JSON through unparsed
            extra = json.loads(extra) if extra.strip() else {}
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(EXTRA_KEYS))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in the warmpool loader's extra config; "
                              f"it takes {', '.join(EXTRA_KEYS)}")
        on_cold = extra.get("on_cold", "warm")
        if on_cold not in ON_COLD:
            raise ConfigError(f"on_cold must be one of {', '.join(ON_COLD)}, not {on_cold!r}")
        uri = extra.get("uri")
        if uri is not None and not isinstance(uri, str):
            raise ConfigError(f"uri must be a string, not {uri!r}")
        for name in ("export", "engine_layout"):
            if not isinstance(extra.get(name, False), bool):
                raise ConfigError(f"{name} must be true or false, not {extra[name]!r}")
        return cls(uri=uri or None, on_cold=on_cold, export=extra.get("export", False),
                   engine_layout=extra.get("engine_layout", True))


@dataclass(frozen=True)
class RequestedModel:
    """The model an engine asked for: ``uri`` to attach, and ``content_hash`` when the
    engine was given a metadata-cache files directory (its config and tokenizer are of
    that exact content, so the weights must be too)."""

    uri: str
    content_hash: str | None
    files_dir: Path


def resolve_model(model_dir: str | os.PathLike[str], uri: str | None = None) -> RequestedModel:
    """The model behind the directory an engine was given (``<cache>/<hash>/files``),
    optionally with ``uri`` named explicitly; the URI is read from the cache's manifest
    when not. Engines refuse object-store paths with their own formats, so this
    directory is how an engine is pointed at the pool."""
    files_dir = Path(model_dir).expanduser()
    content_hash, recorded = _cache_identity(files_dir)
    if uri:
        return RequestedModel(uri, content_hash, files_dir)
    if recorded is None:
        raise ConfigError(
            f"cannot tell which model to load: {files_dir} is not a warmpool metadata cache "
            f"directory (`warmpool metadata URI --files-dir` prints one); name the model "
            f"with the loader's extra config {{\"uri\": \"s3://bucket/prefix/\"}}")
    return RequestedModel(recorded, content_hash, files_dir)


def _cache_identity(files_dir: Path) -> tuple[str | None, str | None]:
    """(content hash, recorded URI) when ``files_dir`` is a cache entry's files folder."""
    entry = files_dir.resolve().parent
    if files_dir.name != FILES_DIR or not _HASH.fullmatch(entry.name):
        return None, None
    try:
        manifest = json.loads((entry / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return None, None
    if manifest.get("content_hash") != entry.name:
        return None, None
    return entry.name, str(manifest.get("uri") or "") or None


def check_same_model(ref: RequestedModel, model: AttachedModel) -> None:
    """Refuse weights of another content than the config the engine read: a pool entry
    of another version would load without a shape error and serve garbage."""
    if ref.content_hash is not None and model.content_hash != ref.content_hash:
        raise CheckpointMismatchError(
            f"the pool's entry for {ref.uri} is content {model.content_hash[:12]}, but the "
            f"engine was given the files of content {ref.content_hash[:12]} ({ref.files_dir}); "
            f"point the engine at `warmpool metadata {ref.uri} --files-dir`, or warm this "
            f"version again")


# --- feeding an engine's own weight loader ---------------------------------------------


class NameTracker:
    """Wraps the (name, tensor) stream an engine consumes, so an error inside the engine's
    loader can name the tensor it was handling; engines raise a bare ``KeyError`` for a
    checkpoint name their module lacks."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors
        self.current: str | None = None
        self.count = 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self._tensors.items():
            self.current = name
            self.count += 1
            yield name, tensor
        self.current = None

    def mismatch(self, uri: str, module: str, exc: BaseException) -> CheckpointMismatchError:
        where = (f"checkpoint tensor {self.current!r}" if self.current is not None
                 else "the checkpoint")
        return CheckpointMismatchError(f"{where} of {uri} does not fit the engine's {module}: "
                                  f"{type(exc).__name__}: {exc}; nothing was served")


def missing_parameters(expected: Iterable[str], loaded: Iterable[str]) -> list[str]:
    """Module parameters the checkpoint did not fill, sorted (empty when complete)."""
    return sorted(set(expected) - set(loaded))
