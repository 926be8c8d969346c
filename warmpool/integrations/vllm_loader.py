"""The ``warmpool`` load format of vLLM: :class:`WarmpoolLoader`, a plain module-level
loader class as vLLM's own are. vLLM is imported at the top, so only
:func:`warmpool.integrations.vllm.register` imports this module (vLLM calls it in each of
its processes); importing :mod:`warmpool.integrations.vllm` costs nothing without vLLM.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from warmpool.errors import CheckpointMismatchError
from warmpool.integrations import weights
from warmpool.integrations.weights import LoaderOptions

# A child of vLLM's logger: our path line appears wherever vLLM's own lines do.
logger = init_logger("vllm.model_executor.model_loader.warmpool")


class WarmpoolLoader(BaseModelLoader):
    """Weights from the warmpool pool (GPU tier, host tier, or warmed first)."""

    def __init__(self, load_config: Any) -> None:
        # vLLM builds a loader once more only to ask get_external_weight_memory:
        # parsing the options is all that happens here.
        super().__init__(load_config)
        self.options = LoaderOptions.parse(load_config.model_loader_extra_config)
        self._pending_export: tuple[str, str, dict[str, torch.Tensor]] | None = None

    def download_model(self, model_config: Any) -> None:
        """Nothing to download: load_weights warms a cold model (or refuses to)."""

    def get_external_weight_memory(self, vllm_config: Any) -> int:
        """Bytes of this model held by a warmpool worker on this rank's GPU, so vLLM
        counts them inside its memory budget; 0 on the host tier or CPU."""
        device = _device()
        if not device.startswith("cuda"):
            return 0
        ref = weights.resolve_model(vllm_config.model_config.model, self.options.uri)
        if self.options.engine_layout and ref.content_hash is not None:
            held = _engine_layout_bytes(vllm_config, ref.content_hash, device)
            if held:  # what load_model will attach: the engine layout, not the files
                return held
        model = weights.attach_gpu_tier(ref.uri, device, _settings(), "vllm memory probe",
                                        logger)
        if model is None:
            return 0
        with model:
            return int(model.layout.total_bytes)

    def load_model(self, vllm_config: Any, model_config: Any,
                   prefix: str = "") -> torch.nn.Module:
        """An engine-layout entry of this engine's key when there is one (zero-copy,
        no post-processing of the bytes); else the copy path, then — with
        ``{"export": true}`` — the processed parameters written to the pool."""
        started = time.perf_counter()
        if self.options.engine_layout:
            model = _attach_layout(self.options, vllm_config, model_config, prefix)
            if model is not None:
                _log_model_in_place(started, "engine layout")
                return model
        self._pending_export = None
        model = super().load_model(vllm_config, model_config, prefix)
        _log_model_in_place(started, "copy")
        if self.options.export and self._pending_export is not None:
            _export(model, vllm_config, model_config, *self._pending_export)
        return model

    def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
        started = time.perf_counter()
        rank = get_tensor_model_parallel_rank()
        ref = weights.resolve_model(model_config.model, self.options.uri)
        attached, source = weights.open_weights(
            ref.uri, _device(), on_cold=self.options.on_cold, settings=_settings(),
            holder=f"vllm rank {rank} pid {os.getpid()}", logger=logger)
        with attached:
            weights.check_same_model(ref, attached)
            _feed(model, attached, model_config, ref.uri)
            if self.options.export:
                from warmpool.integrations.vllm_layout import snapshot

                self._pending_export = (attached.uri, attached.content_hash,
                                        snapshot(model))
        logger.info("Loading weights took %.2f seconds (warmpool, %s, rank %d)",
                    time.perf_counter() - started, source.tier, rank)

def _engine_layout_bytes(vllm_config: Any, checkpoint: str, device: str) -> int:
    """Bytes of this rank's engine layout warm in ``device``'s worker (0: none).
    Asked of the worker's status: a probe takes no lease."""
    from warmpool.errors import WarmpoolError
    from warmpool.integrations import vllm_layout
    from warmpool.workers.client import call, worker_for

    key = vllm_layout.engine_key(vllm_config, vllm_config.model_config, checkpoint,
                                 get_tensor_model_parallel_rank())
    try:
        reply = call(worker_for(_settings(), device), {"op": "status"}, timeout=5.0)
    except WarmpoolError:
        return 0
    return sum(int(r.get("bytes", 0)) for r in reply.get("residents", [])
               if r.get("content_hash") == key.content_hash and r.get("state") == "warm")

def _log_model_in_place(started: float, path: str) -> None:
    # The whole step (build, weights, post-processing): what a start-up waits for.
    logger.info("warmpool: model with weights in place after %.3f seconds (%s path, "
                "rank %d)", time.perf_counter() - started, path,
                get_tensor_model_parallel_rank())

def _attach_layout(options: LoaderOptions, vllm_config: Any, model_config: Any,
                   prefix: str) -> torch.nn.Module | None:
    from warmpool.engine_layouts import attach_engine_layout
    from warmpool.integrations import vllm_layout

    started = time.perf_counter()
    rank = get_tensor_model_parallel_rank()
    where = _layout_device(_device(), _settings())
    if where is None:
        logger.info("no engine layout on %s: no warmpool worker serves it; loading "
                    "through the pool's copy path", _device())
        return None
    ref = weights.resolve_model(model_config.model, options.uri)
    if ref.content_hash is None:
        logger.info("no engine layout: the checkpoint's content hash is unknown (the "
                    "engine was not given a metadata-cache directory); copy path")
        return None
    key = vllm_layout.engine_key(vllm_config, model_config, ref.content_hash, rank)
    attached = attach_engine_layout(key, _settings(),
                                    holder=f"vllm rank {rank} pid {os.getpid()}",
                                    logger=logger, device=where)
    if attached is None:  # the miss and its reason are logged
        logger.info("loading %s through the copy path", ref.uri)
        return None
    try:
        model = vllm_layout.build_attached(vllm_config, model_config, prefix, attached)
    except Exception as exc:  # noqa: BLE001 - the copy path still serves the model
        attached.close()
        logger.warning("the engine layout %s of %s does not fit this engine (%s: %s); "
                       "loading through the copy path", key.label(), ref.uri,
                       type(exc).__name__, exc)
        return None
    # The lease lives as long as the engine's model: the views are its parameters.
    model._warmpool_engine_layout = attached  # type: ignore[assignment]
    first = attached.layout.slots[0] if attached.layout.slots else None
    base = (attached[first.name].data_ptr() - first.offset) if first else 0
    count = vllm_layout.pool_views(model, attached.layout, base)
    logger.info("Loading weights took %.2f seconds (warmpool, engine layout %s, rank "
                "%d); %s", time.perf_counter() - started, key.label(), rank,
                count.describe())
    return model

def _export(model: torch.nn.Module, vllm_config: Any, model_config: Any, uri: str,
            checkpoint: str, before: dict[str, torch.Tensor]) -> None:
    from warmpool.engine_layouts import export_sync
    from warmpool.integrations import vllm_layout
    from warmpool.pool.entries import HOST_DEVICE

    rank = get_tensor_model_parallel_rank()
    key = vllm_layout.engine_key(vllm_config, model_config, checkpoint, rank)
    settings = _settings()
    # On a GPU with a worker: device to device into the worker's buffer. Without
    # one: the host tier (a later engine on this GPU will not find it there, but a
    # worker started later can; nothing is lost but the zero-copy start).
    where = _layout_device(_device(), settings) or HOST_DEVICE
    result = export_sync(key, vllm_layout.processed_tensors(model, before),
                         checkpoint_uri=uri, settings=settings, device=where)
    logger.info("engine layout %s of %s %s on %s (%d tensors, %d bytes, %.2f s)",
                key.label(), uri, "already in the pool" if result.already_warm
                else "exported to the pool", where, result.entry.tensors,
                result.entry.bytes, result.seconds)

def _feed(model: torch.nn.Module, attached: Any, model_config: Any, uri: str) -> None:
    stream = weights.NameTracker(attached)
    name = type(model).__name__
    try:
        loaded = model.load_weights(iter(stream))  # type: ignore[operator]
    except (KeyError, ValueError, RuntimeError, AssertionError, IndexError) as exc:
        raise stream.mismatch(uri, name, exc) from exc
    if loaded is not None and model_config.quantization is None:
        missing = weights.missing_parameters(
            (n for n, _ in model.named_parameters()), loaded)
        if missing:
            raise CheckpointMismatchError(
                f"{uri} has no weights for {len(missing)} parameter(s) of the engine's "
                f"{name}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; "
                "nothing was served")


def _device() -> str:
    """This rank's device as warmpool names it (``cuda:N`` or ``cpu``)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def _layout_device(device: str, settings: Any) -> str | None:
    """Where this rank's engine layout lives: the host tier for a CPU engine, the
    worker of its GPU for a CUDA one — None when no worker serves that GPU (a host-tier
    layout cannot become a GPU engine's parameters)."""
    from warmpool.errors import WorkerError
    from warmpool.pool.entries import HOST_DEVICE
    from warmpool.workers.client import worker_for

    if not device.startswith("cuda"):
        return HOST_DEVICE
    try:
        worker_for(settings, device)
    except WorkerError:
        return None
    return device


def _settings() -> Any:
    from warmpool.config import Settings

    return Settings.load()
