"""The ``warmpool`` load format of SGLang: :class:`WarmpoolLoader`, a plain module-level
loader class. SGLang is imported at the top, so only the hook that
:func:`warmpool.integrations.sglang.register` installs imports this module, when a
config names the format.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from sglang.srt.model_loader import loader as sgl_loader
from sglang.srt.model_loader.utils import set_default_torch_dtype

from warmpool.integrations import weights
from warmpool.integrations.sglang import LOAD_FORMAT, rank_device, tp_rank
from warmpool.integrations.weights import LoaderOptions

logger = logging.getLogger("sglang.srt.model_loader.warmpool")


class WarmpoolLoader(sgl_loader.BaseModelLoader):
    """Weights from the warmpool pool (GPU tier, host tier, or warmed first)."""

    #: How :func:`warmpool.integrations.sglang._verify_load_format` knows the class when
    #: a copied LoadConfig is checked again.
    LOAD_FORMAT = LOAD_FORMAT

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
