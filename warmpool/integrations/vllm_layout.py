"""vLLM's zero-copy start: its processed parameters as an engine-layout entry.

*Export*: after a normal load through the pool, the parameters as this rank holds them
are written to the pool (:func:`processed_tensors`, then
:func:`warmpool.engine_layouts.export_sync`): to the host tier from a CPU engine, to
its GPU's worker (device to device) from a CUDA one. *Attach*: a later engine with the same
key (:func:`engine_key`) builds the model on ``meta``, registers the pool's views as its
parameters (tied aliases as the same object), copies buffers, and runs vLLM's
post-processing under ``weights_already_processed()`` so quantisation methods keep the
bytes as they are and only rebuild their Python-side state (:func:`build_attached`).

On CPU, vLLM's post-processing of an unquantized linear layer replaces its weight with a
packed oneDNN copy and leaves an empty placeholder, whatever the flag says. So for a
parameter that post-processing emptied, the export keeps the weight from *before*
post-processing, and the attach lets post-processing pack it again from the view: those
weights are copies after attach (:func:`pool_views` counts what stays a view). On CUDA the
unquantized linear post-processing leaves weights in place, so every one stays a view.

Imported only inside vLLM's processes: it imports vLLM at module level.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from warmpool.pool.engine_key import EngineKey
from warmpool.pool.layout import Layout
from warmpool.pool.layout_index import LayoutIndex

ENGINE = "vllm"


def engine_key(vllm_config: Any, model_config: Any, checkpoint: str, rank: int) -> EngineKey:
    """The key of this rank's processed parameters. The platform goes into the version:
    post-processing differs between CPU and CUDA builds of one vLLM version."""
    import vllm
    from vllm.platforms import current_platform

    dtype = str(model_config.dtype).removeprefix("torch.")
    parallel = vllm_config.parallel_config
    return EngineKey(checkpoint=checkpoint, engine=ENGINE,
                     engine_version=f"{vllm.__version__}/{current_platform.device_type}",
                     dtype=dtype, quantization=str(model_config.quantization or "none"),
                     tp_size=int(parallel.tensor_parallel_size) *
                     int(parallel.pipeline_parallel_size), rank=rank)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's tensor before post-processing (references, no copies): what
    :func:`processed_tensors` exports for the ones post-processing empties."""
    return {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}


def processed_tensors(model: nn.Module, before: Mapping[str, torch.Tensor]) -> list[
        tuple[str, torch.Tensor]]:
    """What to export: each distinct parameter once (tied aliases are recovered from the
    model on attach) and each buffer, as post-processing left them — or as they were
    before it, for parameters it emptied (see the module docstring)."""
    out: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        earlier = before.get(name)
        if param.numel() == 0 and earlier is not None and earlier.numel() > 0:
            out.append((name, earlier))
        else:
            out.append((name, param.detach()))
    for name, buffer in model.named_buffers():
        if buffer is not None:
            out.append((_BUFFER + name, buffer.detach()))
    return out


#: Buffers are stored under this prefix: a buffer and a parameter may not share a name
#: in one module, but the prefix makes "is it a buffer" a property of the entry itself.
_BUFFER = "buffer:"


@dataclass(frozen=True)
class ViewCount:
    """How much of the engine's parameter memory is the pool's, after attach."""

    params: int
    views: int
    views_bytes: int
    entry_bytes: int  # the parameters' bytes in the entry

    def describe(self) -> str:
        return (f"{self.views} of {self.params} parameters ({self.views_bytes} of "
                f"{self.entry_bytes} bytes) are views of the pool")


def build_attached(vllm_config: Any, model_config: Any, prefix: str,
                   tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """The model with ``tensors`` (an engine-layout entry's views) as its parameters."""
    from vllm.model_executor.model_loader.utils import (
        initialize_model,
        process_weights_after_loading,
    )
    from vllm.model_executor.utils import weights_already_processed
    from vllm.utils.torch_utils import set_default_torch_dtype

    device = torch.device(vllm_config.device_config.device
                          if vllm_config.load_config.device is None
                          else vllm_config.load_config.device)
    with set_default_torch_dtype(model_config.dtype):
        with torch.device("meta"):
            model = initialize_model(vllm_config=vllm_config, model_config=model_config,
                                     prefix=prefix)
        _assign(model, tensors)
        with weights_already_processed():
            process_weights_after_loading(model, model_config, device)
        _materialize_meta(model, device)
    return model.eval()


def _assign(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules(remove_duplicate=False))
    # Aliases: every name under which a parameter object appears (tied embeddings).
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    names = {name for group in aliases.values() for name in group}
    wanted = {n for n in tensors if not n.startswith(_BUFFER)}
    unknown = wanted - names
    if unknown:
        raise ValueError(f"the engine layout has parameters the model lacks: "
                         f"{sorted(unknown)[:8]}")
    for group in aliases.values():
        source = next((n for n in group if n in tensors), None)
        if source is None:
            continue  # left on meta; _materialize_meta allocates it
        param = nn.Parameter(tensors[source], requires_grad=False)
        _copy_attrs(_get(modules, group[0]), param)
        for name in group:
            module_name, _, leaf = name.rpartition(".")
            modules[module_name]._parameters[leaf] = param
    for name, tensor in tensors.items():
        if not name.startswith(_BUFFER):
            continue
        module_name, _, leaf = name[len(_BUFFER):].rpartition(".")
        module = modules.get(module_name)
        if module is not None and leaf in module._buffers:
            # Buffers are copied: they are small, and vLLM may update one in place.
            module._buffers[leaf] = tensor.clone()


def _get(modules: Mapping[str, nn.Module], name: str) -> Any:
    module_name, _, leaf = name.rpartition(".")
    return modules[module_name]._parameters[leaf]


def _copy_attrs(old: Any, new: nn.Parameter) -> None:
    """vLLM hangs loader attributes (``weight_loader``, ``output_dim``) on parameters;
    post-processing and reloading read them, so the replacement carries them too."""
    for key, value in vars(old).items():
        if not key.startswith("_") and not hasattr(new, key):
            setattr(new, key, value)


def _materialize_meta(model: nn.Module, device: torch.device) -> None:
    """Allocate what the entry did not provide (placeholders post-processing emptied)."""
    for module in model.modules():
        for leaf, param in list(module._parameters.items()):
            if param is not None and param.device.type == "meta":
                module._parameters[leaf] = nn.Parameter(
                    torch.empty_like(param, device=device), requires_grad=False)
        for leaf, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type == "meta":
                module._buffers[leaf] = torch.empty_like(buffer, device=device)


def pool_views(model: nn.Module, layout: Layout | LayoutIndex,
               buffer_start: int) -> ViewCount:
    """Count the parameters whose memory lies inside the pool's buffer; the rest were
    replaced by post-processing (on CPU: packed linear weights)."""
    params = views = views_bytes = 0
    end = buffer_start + layout.total_bytes
    for param in model.parameters():
        nbytes = param.numel() * param.element_size()
        params += 1
        ptr = param.data_ptr()
        if nbytes and buffer_start <= ptr and ptr + nbytes <= end:
            views += 1
            views_bytes += nbytes
    entry_bytes = sum(s.nbytes for s in layout.slots if not s.name.startswith(_BUFFER))
    return ViewCount(params, views, views_bytes, entry_bytes)
