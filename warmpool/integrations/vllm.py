"""vLLM loads from the pool: load format ``warmpool``.

vLLM calls :func:`register` (the ``vllm.general_plugins`` entry point) in every one of
its processes; it registers :class:`WarmpoolLoader` under the load format ``warmpool``::

    LLM(model=<files dir of the URI>, load_format="warmpool")
    LLM(model=<files dir>, load_format="warmpool",
        model_loader_extra_config={"uri": "s3://bucket/models/llama/", "on_cold": "fail"})

vLLM refuses object-store paths with any load format but its own streamer, so it is given
the metadata cache's files directory (config and tokenizer, no weights), which also names
the URI. Each tensor-parallel rank attaches the pool's full checkpoint (zero-copy) and
hands it to the model's own ``load_weights``, which maps names, fuses q/k/v and gate/up,
and takes the rank's slice. vLLM is imported only inside :func:`register`, so this module
imports without it.

Faster still, an engine can start from an *engine-layout* entry: the parameters as an
engine of the same key (vLLM version and platform, dtype, quantisation, TP size, rank)
held them after post-processing, attached without a copy
(:mod:`warmpool.integrations.vllm_layout`). ``{"export": true}`` writes them after a
load; a later engine finds them by itself (``{"engine_layout": false}`` skips the look-up),
and one whose key differs logs the miss and takes the copy path. A CPU engine keeps them
on the host tier; a CUDA engine in the buffer of its GPU's warmpool worker, copied device
to device (without a worker it exports to the host tier and attaches nothing).

With the compile cache an export made (``warmpool export --compile``), a start compiles
nothing either: ``warmpool engine-env`` prints the variables and arguments
(:mod:`warmpool.compile.serving`).
"""

from __future__ import annotations

LOAD_FORMAT = "warmpool"


def register() -> None:
    """The ``vllm.general_plugins`` entry point: make ``load_format="warmpool"`` known.

    It runs in each of vLLM's processes before a model is built or anything compiled, so
    it is also where a start given a compile cache (``warmpool engine-env``) refuses one
    that is not private to this user: its code would be run."""
    from vllm.model_executor.model_loader import register_model_loader

    from warmpool.compile.serving import check_serving_environment

    check_serving_environment()

    from warmpool.integrations.vllm_loader import WarmpoolLoader

    register_model_loader(LOAD_FORMAT)(WarmpoolLoader)
