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
only inside :func:`register` and the loader module (:mod:`warmpool.integrations.sglang_loader`).
"""

from __future__ import annotations

from typing import Any

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
    if getattr(config.load_format, "LOAD_FORMAT", None) == LOAD_FORMAT:
        return None  # our class, resolved by an earlier check of this config
    return original(config, *args, **kwargs)


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
    """The loader class (:mod:`warmpool.integrations.sglang_loader`), imported on first
    use: its base class is SGLang's."""
    from warmpool.integrations.sglang_loader import WarmpoolLoader

    return WarmpoolLoader
