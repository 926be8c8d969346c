"""SGLang loads from the pool: load format ``warmpool``.

SGLang calls :func:`register` (the ``sglang.srt.plugins`` entry point) in each of its
processes. Its ``LoadFormat`` enum is closed — ``LoadConfig`` turns the string into the
enum and raises for an unknown one — but ``get_model_loader`` instantiates
``load_config.load_format`` when it is a class. So the plugin adds ``warmpool`` to the
CLI's choices, and wraps ``LoadConfig._verify_load_format`` (through SGLang's hook
registry) so that the string ``warmpool`` becomes :class:`WarmpoolLoader` before the enum
sees it::

    python -m sglang.launch_server --model-path "$(warmpool metadata URI --files-dir)" \\
        --load-format warmpool [--model-loader-extra-config '{"on_cold": "fail"}']

The loader builds the model as SGLang's default loader does and feeds the pool's tensors
to the model's own ``load_weights`` (name mapping, fusing, TP slicing), then SGLang's
post-processing. Which tier the weights come from, warming a cold model and the log line
are :mod:`warmpool.integrations.weights`, shared with the vLLM loader. SGLang is imported
only inside :func:`register`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from warmpool.integrations.weights import LoaderOptions

LOAD_FORMAT = "warmpool"
VERIFY_TARGET = "sglang.srt.configs.load_config.LoadConfig._verify_load_format"


def names_warmpool(load_format: Any) -> bool:
    """Whether a ``--load-format`` value asks for this loader (SGLang lower-cases them)."""
    return isinstance(load_format, str) and load_format.strip().lower() == LOAD_FORMAT


def rank_device(device_type: str, index: int | None) -> str:
    """The rank's device as warmpool names it: ``cuda:N`` for a GPU, ``cpu`` otherwise."""
    if device_type == "cuda":
        return f"cuda:{index or 0}"
    return "cpu"


def register() -> None:
    """The ``sglang.srt.plugins`` entry point."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import LOAD_FORMAT_CHOICES, add_load_format_choices

    if LOAD_FORMAT not in LOAD_FORMAT_CHOICES:
        add_load_format_choices([LOAD_FORMAT])
    HookRegistry.register(VERIFY_TARGET, _verify_load_format, HookType.AROUND)


def _verify_load_format(original: Any, config: Any, *args: Any, **kwargs: Any) -> Any:
    """Around ``LoadConfig._verify_load_format``: our name becomes our loader class, and
    the class passes when the config is checked again (copies of a LoadConfig are; some
    SGLang versions raise for any non-string, non-enum format)."""
    if names_warmpool(config.load_format):
        config.load_format = loader_class()
        return None
    if _LOADER is not None and config.load_format is _LOADER:
        return None
    return original(config, *args, **kwargs)


_LOADER: type | None = None


def tp_rank() -> int:
    """This process's tensor-parallel rank. SGLang 0.5.23 keeps it in its runtime context
    (``sglang.srt.distributed`` no longer exports the getter that earlier 0.5 releases
    had); both are asked, the newer first."""
    try:
        from sglang.srt.runtime_context import get_parallel
    except ImportError:
        from sglang.srt.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    return int(get_parallel().tp_rank)


def loader_class() -> type:
    """The loader class, defined on first use: its base class is SGLang's."""
    global _LOADER
    if _LOADER is None:
        _LOADER = _define_loader()
    return _LOADER


def _define_loader() -> type:
    import logging

    import torch
    from sglang.srt.model_loader import loader as sgl_loader
    from sglang.srt.model_loader.utils import set_default_torch_dtype

    from warmpool.integrations import weights

    logger = logging.getLogger("sglang.srt.model_loader.warmpool")

    class WarmpoolLoader(sgl_loader.BaseModelLoader):
        """Weights from the warmpool pool (GPU tier, host tier, or warmed first)."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            self.options = LoaderOptions.parse(load_config.model_loader_extra_config)

        def download_model(self, model_config: Any) -> None:
            """Nothing to download: load_model warms a cold model (or refuses to)."""

        def load_model(self, *, model_config: Any, device_config: Any,
                       **_: Any) -> torch.nn.Module:
            started = time.perf_counter()
            target = torch.device(device_config.device)
            index = getattr(device_config, "gpu_id", None)
            if target.type == "cuda" and torch.cuda.is_initialized():
                index = torch.cuda.current_device()
            rank = tp_rank()
            ref = weights.resolve_model(model_config.model_path, self.options.uri)
            attached, source = weights.open_weights(
                ref.uri, rank_device(target.type, index), on_cold=self.options.on_cold,
                holder=f"sglang rank {rank} pid {os.getpid()}", logger=logger)
            with attached:
                weights.check_same_model(ref, attached)
                quant = sgl_loader._get_quantization_config(model_config, self.load_config)
                with set_default_torch_dtype(model_config.dtype):
                    with target:
                        model = sgl_loader._initialize_model(model_config, self.load_config,
                                                             quant)
                    stream = weights.NameTracker(attached)
                    try:
                        sgl_loader.DefaultModelLoader.load_weights_and_postprocess(
                            model, iter(stream), target)
                    except (KeyError, ValueError, RuntimeError, AssertionError,
                            IndexError) as exc:
                        raise stream.mismatch(ref.uri, type(model).__name__, exc) from exc
            logger.info("Loading weights took %.2f seconds (warmpool, %s, rank %d)",
                        time.perf_counter() - started, source.tier, rank)
            return model.eval()

    return WarmpoolLoader
