"""Engine layouts a deploy asked for: run the engine's loader once, in its own Python.

A deploy or pin may carry ``engine_layout`` (:class:`~warmpool.contract.requests.
EngineLayoutWant`). Once the checkpoint is warm on the host tier, the controller runs
``<python> -m warmpool export URI --engine vllm --json ...`` as a child process
(:mod:`warmpool.integrations.vllm_export`): the engine lives in an environment of its own,
with its own torch, so it never runs inside the controller. The program is the node's
setting (``export: vllm_python``, ``WARMPOOL_EXPORT_VLLM_PYTHON``), never a request's: a
request only picks among engines the operator installed. Without one, such a request is
refused with a reason that ``warmpool status`` shows.

The child gets the pool's settings in its environment (runtime dir, cache dir, node,
capacity), so it writes into this node's host tier; the controller then adopts the new
segments into its registry. An export already warm for the key the request describes is
not run again (a restart's reconciliation does not start an engine per model).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmpool.config import Settings
from warmpool.contract.requests import EngineLayoutWant
from warmpool.engines import layout_engine
from warmpool.errors import NotConfigured
from warmpool.integrations.vllm_export import parse_report
from warmpool.pool.entries import Pool

log = logging.getLogger(__name__)
#: The tail of a failed export's output kept as its reason.
ERROR_TAIL = 1500
#: dtype names vLLM takes for the same thing: the key records the torch name.
_DTYPE_NAMES = {"half": "float16", "float": "float32"}


@dataclass(frozen=True)
class ExportDone:
    """What one export run achieved: the engine-layout entries warm for the checkpoint,
    or why not."""

    ok: bool
    layouts: tuple[dict[str, Any], ...] = ()
    error: str | None = None
    seconds: float = 0.0
    already_warm: bool = False
    permanent: bool = False  # a retry cannot help (nothing configured)


class EngineExports:
    def __init__(self, settings: Settings, pool: Pool) -> None:
        self.settings = settings
        self.pool = pool
        # One export per (model, ask) at a time: a convergence pass while one runs joins it.
        self._inflight: dict[tuple[str, EngineLayoutWant], asyncio.Task[ExportDone]] = {}

    def python_for(self, engine: str) -> Path:
        """The configured Python of ``engine``, checked, or :class:`NotConfigured`."""
        setting = layout_engine(engine).python_setting
        python = getattr(self.settings, setting) if setting else None
        if python is None:
            raise NotConfigured(
                f"a deploy asked for a {engine} engine layout, but node {self.settings.node} "
                f"has no {engine} Python configured: set export: {{{engine}_python: "
                f"/path/to/venv/bin/python}} in the config file or "
                f"WARMPOOL_EXPORT_{engine.upper()}_PYTHON, and install vLLM and warmpool "
                "in that environment")
        if not os.access(python, os.X_OK) or not python.is_file():
            raise NotConfigured(f"the configured {engine} Python {python} is not an "
                                "executable file")
        return python

    async def export(self, uri: str, checkpoint: str, want: EngineLayoutWant) -> ExportDone:
        """Make the engine layouts of ``want`` warm for ``uri`` (whose checkpoint, of
        content hash ``checkpoint``, is warm on the host tier), joining such an export
        already running."""
        slot = (uri, want)
        task = self._inflight.get(slot)
        if task is None:
            task = asyncio.create_task(self._export(uri, checkpoint, want),
                                       name=f"export {uri} {want.engine}")
            self._inflight[slot] = task
            task.add_done_callback(lambda t: self._inflight.pop(slot, None))
        return await asyncio.shield(task)

    def busy(self, uri: str) -> bool:
        """An export of ``uri`` is running (a convergence pass must not count it twice)."""
        return any(slot[0] == uri for slot in self._inflight)

    @property
    def tasks(self) -> list[asyncio.Task[ExportDone]]:
        return list(self._inflight.values())

    async def _export(self, uri: str, checkpoint: str, want: EngineLayoutWant) -> ExportDone:
        started = time.perf_counter()
        try:
            python = self.python_for(want.engine)
        except NotConfigured as exc:
            return ExportDone(False, error=str(exc), permanent=True)
        present = self.warm_layouts(checkpoint, want)
        if present is not None:
            return ExportDone(True, present, seconds=time.perf_counter() - started,
                              already_warm=True)
        argv = [str(python), "-m", "warmpool", "export", uri, "--engine", want.engine,
                "--tp", str(want.tp), "--dtype", want.dtype, "--on-cold", "fail", "--json"]
        if want.max_model_len is not None:
            argv += ["--max-model-len", str(want.max_model_len)]
        if want.compile:
            argv.append("--compile")
        rc, out, err = await self._run(argv)
        seconds = time.perf_counter() - started
        if rc != 0:
            tail = (err.strip() or out.strip() or f"exit code {rc}")[-ERROR_TAIL:]
            return ExportDone(False, error=f"{want.engine} export of {uri} failed "
                              f"(exit {rc}): {tail}", seconds=seconds)
        try:
            layouts = tuple(parse_report(out)["layouts"])
        except (ValueError, KeyError, TypeError):
            return ExportDone(False, error=f"{want.engine} export of {uri} printed no report: "
                              f"{out.strip()[-ERROR_TAIL:]}", seconds=seconds)
        await self.pool.adopt_residents()  # the child wrote them: make them the registry's
        return ExportDone(True, layouts, seconds=seconds)

    def warm_layouts(self, checkpoint: str,
                     want: EngineLayoutWant) -> tuple[dict[str, Any], ...] | None:
        """The layouts of every rank that ``want`` describes, when all are warm (and its
        compile cache, when it asks to compile). dtype ``auto`` takes whichever dtype is
        warm; the engine version is the child's to know, so a layout or cache of an older
        engine counts until it is evicted."""
        from warmpool.compile.store import CompileCaches
        from warmpool.engine_layouts import engine_layouts

        dtype = _DTYPE_NAMES.get(want.dtype, want.dtype)
        found = [k for k in engine_layouts(self.settings, checkpoint)
                 if k.engine == want.engine and k.tp_size == want.tp
                 and (dtype == "auto" or k.dtype == dtype)]
        if {k.rank for k in found} != set(range(want.tp)):
            return None
        if want.compile and not CompileCaches(self.settings).matching(
                checkpoint, want.engine, dtype=dtype, tp=want.tp,
                max_model_len=want.max_model_len):
            return None
        return tuple({"label": k.label(), "content_hash": k.content_hash, "key": k.to_json()}
                     for k in found)

    def environment(self) -> dict[str, str]:
        """The controller's environment with the pool's settings made explicit: the child
        may read no config file, or another one."""
        env = {**os.environ, **self.settings.pool_environment(),
               "WARMPOOL_NODE": self.settings.node}
        if self.settings.host_capacity is not None:
            env["WARMPOOL_HOST_CAPACITY"] = str(self.settings.host_capacity)
        return env

    async def _run(self, argv: list[str]) -> tuple[int, str, str]:
        """The child's exit code and output; killed with its whole process group (vLLM's
        engine core and ranks) on timeout or when the controller stops."""
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=self.environment(), start_new_session=True)
        try:
            out, err = await asyncio.wait_for(proc.communicate(),
                                              self.settings.export_timeout_s)
        except TimeoutError:
            _kill_group(proc)
            await proc.wait()
            return -1, "", f"timed out after {self.settings.export_timeout_s:g} s (export: " \
                "timeout_s)"
        except BaseException:
            _kill_group(proc)
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
            raise
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
