"""The engine table (:mod:`warmpool.engines`) and the loader table
(:mod:`warmpool.loading.loaders`): the one answer to "which engine?" and "which loader?"."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from warmpool.config import Settings
from warmpool.contract.requests import parse_request
from warmpool.engines import ENGINES, LAYOUT_ENGINES, layout_engine
from warmpool.errors import BadEvent, ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_each_engine_is_the_one_its_plugin_entry_point_names() -> None:
    """The table and pyproject's entry points agree: an engine finds the module the
    table says, and every module the table names exists and has what it is named for."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    points = {group: spec["warmpool"] for group, spec in project["entry-points"].items()}
    named = {value.split(":")[0] for value in points.values()}
    assert named == {e.plugin for e in ENGINES.values()}
    for engine in ENGINES.values():
        assert engine.name in next(g for g, v in points.items()
                                   if v.startswith(engine.plugin + ":"))
        if engine.export is not None:
            exporter = importlib.import_module(engine.export)
            assert callable(exporter.export) and callable(exporter.ExportOptions)
            assert engine.python_setting in Settings.__dataclass_fields__


def test_requests_and_exports_take_the_engines_that_can_export() -> None:
    assert LAYOUT_ENGINES == tuple(n for n, e in ENGINES.items() if e.export)
    assert "vllm" in LAYOUT_ENGINES and "sglang" not in LAYOUT_ENGINES
    doc = {"action": "deploy", "uri": "s3://b/m/"}
    for name in LAYOUT_ENGINES:
        want = parse_request({**doc, "engine_layout": {"engine": name}}).engine_layout
        assert want is not None and want.engine == name
    for name in ("sglang", "tgi"):
        with pytest.raises(BadEvent, match="engine_layout.engine"):
            parse_request({**doc, "engine_layout": {"engine": name}})
        with pytest.raises(ConfigError, match=f"engine '{name}' .*choose one of vllm"):
            layout_engine(name)


def test_one_table_of_loaders_every_entry_checks_against() -> None:
    """Every loader the table names has a fill function and nothing else has one; the
    config file, the Python API and a worker's load message all refuse a name outside
    it, each saying where the name came from; naming one imports no torch."""
    from warmpool.config import ControllerOptions
    from warmpool.loading.loaders import LOADERS, LOADERS_BY_NAME, check_loader
    from warmpool.loading.streaming import FILLS

    assert FILLS.keys() == LOADERS_BY_NAME.keys()
    assert LOADERS == ("auto", *LOADERS_BY_NAME)
    for name in LOADERS:
        assert check_loader(name) == name
    with pytest.raises(ConfigError, match=r"WARMPOOL_LOADER: unknown loader 'fast'; "
                                          r"choose one of auto, runai, native, pread"):
        ControllerOptions.load({}, environ={"WARMPOOL_LOADER": "fast"})
    assert ControllerOptions.load({"loader": "pread"}, environ={}).loader == "pread"

    done = subprocess.run([sys.executable, "-c", "import sys, warmpool.loading.loaders as l; "
                           "l.check_loader('native'); print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_a_pread_load_of_an_object_store_is_refused_by_the_table() -> None:
    from warmpool.errors import StreamError
    from warmpool.loading.streaming import choose_loader
    from warmpool.model.uri import parse_uri

    with pytest.raises(StreamError, match="the pread loader reads local files only"):
        choose_loader(parse_uri("s3://bucket/model/"), "pread")
