"""A transformers model whose weights are the warm pool's buffer, not a copy of it.

``load_model(uri)`` builds the model class that the checkpoint's cached ``config.json``
names, with every parameter on the ``meta`` device (nothing allocated, nothing
initialised), then makes the attached views its parameters. Buffers that are not in a
checkpoint (rotary ``inv_freq`` and the like) are computed by the module's own
constructor as usual, because only *parameters* are redirected to ``meta``: building the
whole module on ``meta`` would leave them without values. Tied weights are tied again
after the assignment (the checkpoint holds one copy of them).

The lease that keeps the pool from evicting the buffer lives exactly as long as the
model: it ends when the model is garbage-collected or when :func:`release` is called.
The views are read-only mappings; a write into a weight would fault the process, so the
model is returned in ``eval()`` mode with ``requires_grad`` off, and training or
in-place edits need ``load_model(..., copy=True)`` (an ordinary private copy).

The cached files came from a bucket, so they are untrusted input: a config that names
code of its own (``auto_map``) is refused unless the caller passes
``trust_remote_code=True`` (and the node caches code files at all: ``cache_code``); a
config transformers cannot build from is a :class:`CheckpointMismatchError` naming the
file; and a config that claims more layers than the checkpoint holds is refused before
anything is built (20,000 claimed layers once took 47 s and 1.6 GB to refuse).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from warmpool.attachment import AttachedModel, attach
from warmpool.config import Settings
from warmpool.errors import CheckpointMismatchError, NotWarmError, UntrustedCodeError
from warmpool.pool.entries import HOST_DEVICE

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

_ATTACHMENT = "_warmpool_attachment"
_RELEASE = "_warmpool_release"


def load_model(uri: str, *, device: str = HOST_DEVICE, dtype: torch.dtype | None = None,
               copy: bool = False, settings: Settings | None = None,
               model_class: type[PreTrainedModel] | None = None,
               trust_remote_code: bool = False) -> PreTrainedModel:
    """The warm model ``uri`` as a transformers model whose parameters are pool views.

    ``device`` is where the weights must be: ``cpu`` attaches the host tier; a GPU device
    attaches its GPU-tier entry, or copies from the host tier when only that is warm
    (logged). A ``dtype`` other than the checkpoint's, or ``copy=True``, makes private
    copies (logged): the result no longer shares the pool's memory.
    ``trust_remote_code`` lets a checkpoint's own modeling code run (transformers' option
    of that name); it must be asked for, and the node must cache code files
    (``cache_code: true``).
    """
    settings = settings or Settings.load()
    start = time.perf_counter()
    weights = _attach(uri, device, settings)
    try:
        files_dir = files_dir_of(weights, settings)
        model = _build(files_dir, model_class, weights, trust_remote_code)
        shared = _assign(model, weights, device=device, dtype=dtype, copy=copy)
    except BaseException:
        weights.close()
        raise
    model.eval()
    model.requires_grad_(False)
    object.__setattr__(model, _ATTACHMENT, weights if shared else None)
    if shared:
        # The finalizer holds the attachment, never the model: the model stays collectable.
        object.__setattr__(model, _RELEASE, weakref.finalize(model, weights.close))
    else:
        weights.close()
    log.info("loaded %s from the warm pool: %d tensors, %d bytes, %s, %s in %.3f s",
             weights.uri, len(weights), weights.layout.total_bytes, weights.transport,
             "zero-copy views" if shared else "private copies",
             time.perf_counter() - start)
    return model


def release(model: Any) -> None:
    """End the model's lease now instead of at garbage collection.

    The parameters stay readable (the mapping goes with the last view), but the pool may
    evict the entry from this moment: call it when the model is about to be dropped."""
    finalizer = getattr(model, _RELEASE, None)
    if finalizer is not None:
        finalizer()


def attachment_of(model: Any) -> AttachedModel | None:
    """The attachment whose views are ``model``'s parameters (None for copies)."""
    return getattr(model, _ATTACHMENT, None)


def files_dir_of(weights: AttachedModel, settings: Settings) -> Path:
    """The cached config/tokenizer directory of an attached model.

    Found by content hash in the metadata cache, so loading never lists the bucket; a
    cache that lost the entry (pruned, another machine) is filled again from the URI."""
    from warmpool.model.cache import default_cache
    from warmpool.model.uri import parse_uri

    cache = default_cache(settings)
    cached = cache.load(weights.content_hash)
    if cached is None:
        log.info("metadata of %s is not cached: fetching it", weights.uri)
        cached = asyncio.run(cache.fetch(parse_uri(weights.uri)))
        if cached.content_hash != weights.content_hash:
            raise NotWarmError(
                f"{weights.uri} changed since it was warmed (pool {weights.content_hash[:12]}, "
                f"storage {cached.content_hash[:12]}): run `warmpool prefetch {weights.uri}`")
    return cached.files_dir


def _attach(uri: str, device: str, settings: Settings) -> AttachedModel:
    if device == HOST_DEVICE:
        return attach(uri, HOST_DEVICE, settings=settings, holder="transformers")
    try:
        return attach(uri, device, settings=settings, holder="transformers")
    except NotWarmError:
        log.info("%s is not warm on %s: copying it from the host tier", uri, device)
        return attach(uri, HOST_DEVICE, settings=settings, holder="transformers")


#: ``model.layers.12.``, ``transformer.h.3.``, ``blocks.0.``: a checkpoint's layer index.
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _build(files_dir: Path, model_class: type[PreTrainedModel] | None,
           weights: AttachedModel, trust_remote_code: bool) -> PreTrainedModel:
    import transformers

    config_file = files_dir / "config.json"
    raw = _config_json(config_file)
    if "auto_map" in raw and not trust_remote_code:
        raise UntrustedCodeError(
            f"{weights.uri}: {config_file.name} names code of its own (auto_map "
            f"{_clip(raw['auto_map'])}); warmpool runs no code from a bucket unless "
            "load_model(..., trust_remote_code=True) is passed and the node caches code "
            "files (cache_code: true)")
    _check_layers(raw, weights, config_file)
    try:
        config = transformers.AutoConfig.from_pretrained(
            files_dir, local_files_only=True, trust_remote_code=trust_remote_code)
        cls = model_class or _class_for(config)
        with _parameters_on_meta():
            return cls(config)
    except CheckpointMismatchError:
        raise
    except Exception as exc:  # noqa: BLE001 - see below
        # What transformers raises for a config it cannot use has no common base: a
        # TypeError, a KeyError, an OSError, a RecursionError, a ZeroDivisionError (zero
        # heads), huggingface_hub's StrictDataclassFieldValidationError (an Exception).
        # Every one of them, building from an untrusted file, is the file's fault.
        raise CheckpointMismatchError(
            f"{weights.uri}: transformers cannot build a model from {config_file}: "
            f"{type(exc).__name__}: {_clip(str(exc), 300)}") from None


def _config_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointMismatchError(f"{path} is not a readable JSON config: {exc}") from None
    if not isinstance(raw, dict):
        raise CheckpointMismatchError(f"{path} holds {type(raw).__name__}, not an object")
    return raw


def _check_layers(raw: dict[str, Any], weights: AttachedModel, config_file: Path) -> None:
    """Refuse a config that claims more layers than the checkpoint has, before building:
    building the modules (even on ``meta``) costs time and memory per layer."""
    indices = {int(m.group(1)) for name in weights for m in [_LAYER.search(name)] if m}
    for key in _LAYER_KEYS:
        claimed = raw.get(key)
        if claimed is None:
            continue
        if isinstance(claimed, bool) or not isinstance(claimed, int) or claimed < 0:
            raise CheckpointMismatchError(f"{config_file}: {key} {_clip(claimed)} is not a "
                                          "layer count")
        if indices and claimed > max(indices) + 1:
            raise CheckpointMismatchError(
                f"{weights.uri}: {config_file.name} says {key}={claimed}, the checkpoint "
                f"holds {max(indices) + 1} layers")


def _clip(value: object, limit: int = 120) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _class_for(config: Any) -> type[PreTrainedModel]:
    import transformers

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cast("type[PreTrainedModel]", cls)
    try:
        return cast("type[PreTrainedModel]",
                    transformers.AutoModelForCausalLM._model_mapping[type(config)])
    except KeyError:
        raise CheckpointMismatchError(
            f"no transformers class for architectures {config.architectures!r} "
            f"({type(config).__name__}): pass model_class=") from None


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters are created on ``meta``; buffers keep their computed values.

    A parameter is first made where the module asks (``torch.empty``: address space, no
    page touched) and moved to ``meta`` as it is registered, so initialisers that run
    afterwards cost nothing."""
    import torch

    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: Any) -> None:
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    setattr(torch.nn.Module, "register_parameter", register)  # noqa: B010 - a patch, on purpose
    try:
        yield
    finally:
        setattr(torch.nn.Module, "register_parameter", original)  # noqa: B010


def _assign(model: PreTrainedModel, weights: AttachedModel, *, device: str,
            dtype: torch.dtype | None, copy: bool) -> bool:
    """Make the views the model's parameters; True when they are shared, not copies."""
    import torch

    expected = dict(model.named_parameters(remove_duplicate=False))
    unexpected = sorted(set(weights) - set(expected) - set(dict(model.named_buffers())))
    if unexpected:
        raise CheckpointMismatchError(
            f"{weights.uri}: {len(unexpected)} checkpoint tensors have no parameter in "
            f"{type(model).__name__}, e.g. {unexpected[0]!r}")
    for name, param in expected.items():
        if name in weights and tuple(weights[name].shape) != tuple(param.shape):
            raise CheckpointMismatchError(
                f"{weights.uri}: tensor {name!r} has shape {tuple(weights[name].shape)}, "
                f"{type(model).__name__} wants {tuple(param.shape)}")
    # A cpu:N worker's views are host memory: torch knows one host device, "cpu", and
    # torch.device("cpu:0") is not equal to it.
    target = torch.device("cpu") if device.split(":")[0] == "cpu" else torch.device(device)
    shared = not copy and all(
        (dtype is None or t.dtype == dtype) and t.device == target for t in weights.values())
    if not shared:
        log.info("%s: making private copies (dtype %s, device %s, copy=%s)",
                 weights.uri, dtype, device, copy)
    state = {name: _placed(t, target, dtype, shared) for name, t in weights.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointMismatchError(
            f"{weights.uri}: {len(missing)} parameters of {type(model).__name__} are not in "
            f"the checkpoint (nor tied to one that is), e.g. {missing[0]!r}")
    for name, buffer in model.named_buffers():
        if buffer.device != target:
            _set_buffer(model, name, buffer.to(target))
    return shared


def _placed(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None,
            shared: bool) -> torch.Tensor:
    if shared:
        return t
    return t.to(device=device, dtype=dtype or t.dtype, copy=True)


def _set_buffer(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    owner._buffers[leaf] = value
