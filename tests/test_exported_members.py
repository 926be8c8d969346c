"""The public surface a serving process sees first: ``warmpool.__all__`` and the modules.

A short, sorted list of names that all exist and none private; and every module of the
package is reached as a module, never shadowed by a function of the same name (so
``import warmpool.pool.attachment`` gives the module, not ``attach``).
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
    assert "warmpool.pool.attachment" in names and "warmpool.operations" in names
    for name in names:
        module = importlib.import_module(name)
        assert isinstance(module, types.ModuleType), name
        parent, _, last = name.rpartition(".")
        assert isinstance(getattr(importlib.import_module(parent), last), types.ModuleType), \
            f"{name} is shadowed by {parent}.{last}"
