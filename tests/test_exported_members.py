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
    names = [m.name for m in pkgutil.walk_packages(warmpool.__path__, "warmpool.")]
    assert "warmpool.attachment" in names and "warmpool.operations" in names
    for name in names:
        module = importlib.import_module(name)
        assert isinstance(module, types.ModuleType), name
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
    for info in pkgutil.walk_packages(warmpool.__path__, "warmpool."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            # A private one (a parser's internal signal, caught where it is raised)
            # never reaches a caller.
            if isinstance(value, type) and issubclass(value, BaseException) \
                    and value.__module__ == info.name and info.name != "warmpool.errors" \
                    and not value.__name__.startswith("_"):
                elsewhere.append(f"{info.name}.{value.__name__}")
    assert elsewhere == []
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, BaseException) \
                and value.__module__ == "warmpool.errors":
            assert issubclass(value, errors.WarmpoolError), value
    rebuilt = protocol.rebuild_error(protocol.error_reply(
        errors.ForeignSegmentError("planted")).get("error"))
    assert type(rebuilt) is errors.ForeignSegmentError and str(rebuilt) == "planted"
