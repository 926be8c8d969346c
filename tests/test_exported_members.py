"""The public surface a serving process sees first: ``warmpool.__all__`` and the modules.

A short, sorted list of names that all exist and none private; and every module of the
package is reached as a module, never shadowed by a function of the same name (so
``import warmpool.attachment`` gives the module, not ``attach``).
"""

from __future__ import annotations

import importlib
import pkgutil
import types

import warmpool

#: Modules that import their engine at the top, by design: only the engine's plugin hook
#: imports them, from inside the engine (:mod:`warmpool.integrations.vllm`, ``.sglang``).
ENGINE_MODULES = {"warmpool.integrations.vllm_loader": "vllm",
                  "warmpool.integrations.sglang_loader": "sglang"}


def modules() -> list[types.ModuleType]:
    """Every module of the package, imported; an engine module without its engine
    installed must fail for that reason alone (and is left out)."""
    found = []
    for info in pkgutil.walk_packages(warmpool.__path__, "warmpool."):
        try:
            found.append(importlib.import_module(info.name))
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] != ENGINE_MODULES.get(info.name):
                raise
    return found


def test_every_exported_name_exists() -> None:
    for name in warmpool.__all__:
        assert getattr(warmpool, name) is not None, name


def test_exports_are_sorted_unique_and_public() -> None:
    # isort style, as ruff (RUF022) keeps it: classes, then the rest
    assert warmpool.__all__ == sorted(warmpool.__all__, key=lambda n: (not n[:1].isupper(), n))
    assert len(set(warmpool.__all__)) == len(warmpool.__all__)
    assert [n for n in warmpool.__all__ if n.startswith("_")] == ["__version__"]


def test_nothing_public_is_left_out_of_all() -> None:
    for name in warmpool.__all__:
        getattr(warmpool, name)  # load the lazy ones
    public = {name for name, value in vars(warmpool).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)
              and getattr(value, "__module__", "warmpool").startswith("warmpool")}
    assert public <= set(warmpool.__all__)
    assert set(dir(warmpool)) >= set(warmpool.__all__)


def test_every_error_can_be_caught_as_a_warmpool_error() -> None:
    errors = [getattr(warmpool, n) for n in warmpool.__all__ if n.endswith("Error")]
    assert warmpool.WorkerError in errors and warmpool.NotWarmError in errors
    assert all(issubclass(e, warmpool.WarmpoolError) for e in errors)


def test_every_module_imports_as_a_module() -> None:
    found = modules()
    names = [m.__name__ for m in found]
    assert "warmpool.attachment" in names and "warmpool.operations" in names
    for module in found:
        name = module.__name__
        parent, _, last = name.rpartition(".")
        assert isinstance(getattr(importlib.import_module(parent), last), types.ModuleType), \
            f"{name} is shadowed by {parent}.{last}"


def test_every_exception_class_lives_in_errors_and_is_a_warmpool_error() -> None:
    """One place to find what can be raised, and every one of them catchable as a
    WarmpoolError and rebuilt by name when it crosses the worker protocol (a
    ForeignSegmentError defined in pool/host.py once came back as a plain WorkerError)."""
    from warmpool import errors
    from warmpool.workers import protocol

    elsewhere = []
    for module in modules():
        for value in vars(module).values():
            # A private one (a parser's internal signal, caught where it is raised)
            # never reaches a caller.
            if isinstance(value, type) and issubclass(value, BaseException) \
                    and value.__module__ == module.__name__ \
                    and module.__name__ != "warmpool.errors" \
                    and not value.__name__.startswith("_"):
                elsewhere.append(f"{module.__name__}.{value.__name__}")
    assert elsewhere == []
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, BaseException) \
                and value.__module__ == "warmpool.errors":
            assert issubclass(value, errors.WarmpoolError), value
    rebuilt = protocol.rebuild_error(protocol.error_reply(
        errors.ForeignSegmentError("planted")).get("error"))
    assert type(rebuilt) is errors.ForeignSegmentError and str(rebuilt) == "planted"
