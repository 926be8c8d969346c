"""The serving engines warmpool loads into: one table, the way storage backends are one
(:mod:`warmpool.storage`).

Everything that asks "which engine?" reads this table — a deploy's ``engine_layout``,
``warmpool export --engine``, the controller choosing the Python an export runs in — so
adding an engine is one row here and its integration modules. It imports nothing: the
request parser at the bottom of the house reads it, and no engine is imported until
the engine itself calls our plugin.
"""

from __future__ import annotations

from dataclasses import dataclass

from warmpool.errors import ConfigError


@dataclass(frozen=True)
class Engine:
    """One serving engine.

    ``plugin`` is the module its plugin entry point names (``pyproject.toml``); ``export``
    the module whose ``export(uri, options, settings)`` runs the engine's loader once to
    write its engine layouts, or ``None`` when warmpool cannot make its layouts yet (the
    engine then loads the checkpoint from the pool, copying). ``python_setting`` is the
    :class:`~warmpool.config.Settings` field naming the Python of the engine's own
    environment, which the controller runs an export with (never one a request names).
    """

    name: str
    plugin: str
    export: str | None = None
    python_setting: str | None = None

    @property
    def exports_layouts(self) -> bool:
        return self.export is not None


ENGINES: dict[str, Engine] = {
    "vllm": Engine("vllm", plugin="warmpool.integrations.vllm",
                   export="warmpool.integrations.vllm_export",
                   python_setting="export_vllm_python"),
    "sglang": Engine("sglang", plugin="warmpool.integrations.sglang"),
}

#: The engines a deploy may ask an engine layout of (``"engine_layout": {"engine": ...}``).
LAYOUT_ENGINES: tuple[str, ...] = tuple(n for n, e in ENGINES.items() if e.exports_layouts)


def layout_engine(name: str) -> Engine:
    """The engine ``name`` if warmpool can export its layouts; else a ConfigError that
    lists those it can."""
    engine = ENGINES.get(name)
    if engine is None or not engine.exports_layouts:
        why = "cannot export yet" if engine else "is not an engine warmpool knows"
        raise ConfigError(f"engine {name!r} {why}; choose one of {', '.join(LAYOUT_ENGINES)}")
    return engine
