"""The packages' layers, read off their imports (lazy ones inside functions included).

The data flow of DESIGN.md goes one way: the contract (Redis keys, payloads) sits below
the pool's Redis registry, the relays and the controller; the controller and the relays
know nothing of each other; the node (``warmpool serve``) and the commands sit on top.
An import against that direction is a cycle in waiting, and a newcomer reading the
lower package would have to read the upper one too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "warmpool"

#: package (or module) → the warmpool packages and modules it must never import.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "contract": ("controller", "relay", "pool", "node", "cli", "console", "operations",
                 "integrations", "loading", "workers"),
    "pool": ("controller", "relay", "node", "cli", "console", "operations", "loading",
             "workers", "tiers", "attachment", "engine_layouts"),
    "loading": ("controller", "relay", "node", "cli", "operations", "workers", "tiers",
                "attachment", "engine_layouts"),
    "workers": ("controller", "relay", "node", "cli", "operations", "tiers", "attachment",
                "engine_layouts"),
    "controller": ("relay", "node", "cli", "console"),
    "relay": ("controller", "node", "cli"),
    "model": ("controller", "relay", "pool", "node", "cli", "loading", "contract"),
    "storage": ("controller", "relay", "pool", "node", "cli", "loading", "contract"),
    "compile": ("controller", "relay", "pool", "node", "cli", "console", "operations",
                "loading", "workers", "tiers", "integrations", "storage"),
}
#: The relay's command module composes a relay process: it may find the controller's
#: Redis (``controller.remote``), as ``warmpool serve`` composes the node.
ALLOWED = {("relay/cli.py", "warmpool.controller.remote")}


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n == "warmpool" or n.startswith("warmpool.")}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_module_imports_against_the_data_flow(layer: str) -> None:
    root = PACKAGE / layer
    modules = sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]
    assert modules, layer
    wrong = []
    for module in modules:
        where = module.relative_to(PACKAGE).as_posix()
        for name in sorted(imported(module)):
            for upper in FORBIDDEN[layer]:
                target = f"warmpool.{upper}"
                if _under(name, target) and not any(
                        w == where and _under(name, a) for w, a in ALLOWED):
                    wrong.append(f"{where} imports {name}")
    assert not wrong, "\n".join(wrong)


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_contract_package_holds_the_shared_parts() -> None:
    """What the registry, the relays and the controller share lives in ``contract/``
    alone: the old homes are gone, so nothing can import the contract from above."""
    for gone in ("controller/keys.py", "controller/events.py", "controller/deadletter.py",
                 "controller/redis_client.py", "controller/redis_lock.py",
                 "controller/serve.py", "controller/worker_bridge.py", "pool/prefetch.py",
                 "pool/attachment.py", "pool/engine_layout.py"):
        assert not (PACKAGE / gone).exists(), gone
    for here in ("keys", "requests", "notifications", "watchlist", "deadletter",
                 "redis_client", "redis_lock"):
        assert (PACKAGE / "contract" / f"{here}.py").is_file(), here


#: Where a module may ask "the host tier or a worker's device?": the selector, and the
#: pool's own bookkeeping of host segments (leases, renames, reclaiming) below it.
DEVICE_BRANCH = re.compile(r'device\)? ?(==|!=) ?(HOST_DEVICE|"cpu")|is_host\(')
SELECTOR = {"tiers/base.py", "tiers/workers.py", "pool/entries.py",
            "contract/requests.py"}  # an engine layout is asked of the host tier only


def test_one_selector_decides_host_tier_or_worker() -> None:
    """Prefetch, evict, attach, engine layouts and the controller ask the tier of a
    device (``tier_for``), never the device string itself."""
    found = []
    for module in sorted(PACKAGE.rglob("*.py")):
        where = module.relative_to(PACKAGE).as_posix()
        if where.startswith(("workers/", "integrations/")) or where in SELECTOR:
            continue
        for number, line in enumerate(module.read_text().splitlines(), 1):
            if DEVICE_BRANCH.search(line):
                found.append(f"{where}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from warmpool.controller.loop import Controller\n")
    assert "warmpool.controller.loop" in imported(module)


def test_make_test_runs_every_engine_module_in_the_engine_process() -> None:
    """``make test`` runs the engine tests beside the rest: the Makefile's list is
    the suite's, and every module that starts an engine is on it (one left off would
    start engines in the other process, both at once on two cores)."""
    from tests.conftest import ENGINE_TESTS

    root = PACKAGE.parent
    makefile = (root / "Makefile").read_text().replace("\\\n", " ")
    line = next(x for x in makefile.splitlines() if x.startswith("ENGINE_TESTS ="))
    assert sorted(line.split("=", 1)[1].split()) == sorted(ENGINE_TESTS)
    starting = sorted(f"tests/{p.name}" for p in (root / "tests").glob("test_*.py")
                      if re.search(r"\b(vllm|sglang)_engines\(", p.read_text()))
    assert starting and set(starting) <= set(ENGINE_TESTS), starting


def test_every_package_is_installed() -> None:
    """pyproject lists its packages by hand (``warmpool/workers`` is a link): a package
    left off the list is missing from the wheel and the image, while the tests, run from
    the checkout, still import it. The image build found ``warmpool.contract`` missing."""
    import tomllib

    root = PACKAGE.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {"warmpool", "warmpool.workers"} | {
        "warmpool." + init.parent.relative_to(PACKAGE).as_posix().replace("/", ".")
        for init in PACKAGE.rglob("__init__.py") if init.parent != PACKAGE}
    assert listed == found
