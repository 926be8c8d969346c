"""Fixtures shared by the whole suite live in plugin modules, listed here.

``make test`` runs the suite on two pytest-xdist workers (``-n 2 --dist loadgroup``). The
engine tests start vLLM and SGLang with two ranks each, which take both cores; they form
one group, run first and in order on one worker (their module fixtures — models written,
uploaded and warmed — are made once), while the other worker takes everything else.
"""

import pytest

pytest_plugins = ["tests.redis_server", "tests.pool_env", "tests.servers",
                  "tests.controller_harness"]

#: Modules whose tests start serving engines (vLLM, SGLang): one xdist group.
ENGINE_MODULES = ("test_vllm.py", "test_vllm_zero_copy.py", "test_vllm_export.py",
                  "test_sglang.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The engine tests first (in their own order), so that under xdist their group,
    the longest, starts at once instead of after everything else."""
    engines = [item for item in items if item.path.name in ENGINE_MODULES]
    for item in engines:
        item.add_marker(pytest.mark.xdist_group("engines"))
    items[:] = engines + [item for item in items if item.path.name not in ENGINE_MODULES]
