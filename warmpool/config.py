"""Settings: defaults that suit the machine, overridden by a config file, then the
environment, then command-line flags (each later source wins).

The streamer's tunables use the names the serving engines use in
``--model-loader-extra-config`` (``concurrency``, ``memory_limit``, ``distributed``), so
a platform engineer can copy a value from a vLLM command line. ``RUNAI_STREAMER_*``
variables already set in the environment are honoured and win over our defaults.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from warmpool.errors import ConfigError

GiB = 1 << 30


def parse_bytes(value: str | int | None) -> int | None:
    """``"16GiB"``, ``"500MB"``, ``"1e9"`` or an int → bytes; ``None``/``""`` → None."""
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip().lower().replace("_", "")
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 1 << 10,
             "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "b": 1}
    for suffix, mult in units.items():
        if text.endswith(suffix):
            number = text[: -len(suffix)].strip()
            break
    else:
        number, mult = text, 1
    try:
        scaled = float(number) * mult
        if not math.isfinite(scaled):
            raise ValueError(number)
        result = int(scaled)
    except ValueError:
        raise ConfigError(f"not a byte size: {value!r} (try 16GiB or 500MB)") from None
    if result < -1:
        raise ConfigError(f"byte size must be >= -1: {value!r}")
    return result


@dataclass(frozen=True)
class StreamerOptions:
    """runai-model-streamer tunables, under the engines' names."""

    concurrency: int | None = None
    memory_limit: int | None = None  # bytes of host staging buffer; -1 unlimited
    distributed: bool = False

    def environment(self, base: dict[str, str] | None = None,
                    largest_tensor: int = 0) -> dict[str, str]:
        """The ``RUNAI_STREAMER_*`` variables for a streamer run.

        Variables already in ``base`` (the caller's environment) win: an operator who set
        ``RUNAI_STREAMER_CONCURRENCY`` by hand meant it. Without a ``memory_limit`` the
        staging buffer is two of the largest tensor (at least 256 MiB): enough for the
        streamer to overlap reads with our copies, while a bigger ring of freshly
        allocated memory only costs page faults (docs/findings.md).
        """
        env = dict(os.environ if base is None else base)
        cores = os.cpu_count() or 2
        defaults = {
            "RUNAI_STREAMER_CONCURRENCY": str(self.concurrency or max(4, min(16, cores * 2))),
            # A bounded staging buffer keeps host memory flat however large the model.
            "RUNAI_STREAMER_MEMORY_LIMIT": str(
                self.memory_limit if self.memory_limit is not None
                else max(2 * largest_tensor, 256 << 20)
            ),
            # O_DIRECT (the streamer's default) re-reads from disk what the page cache
            # already holds; buffered io_uring reads it from there (docs/findings.md).
            "RUNAI_STREAMER_FS_STRATEGY": "io_uring_buffered",
        }
        explicit = {"RUNAI_STREAMER_CONCURRENCY": self.concurrency,
                    "RUNAI_STREAMER_MEMORY_LIMIT": self.memory_limit}
        for key, value in defaults.items():
            if explicit.get(key) is not None or key not in env:
                env[key] = value
        # SGLang's docs name RUNAI_STREAMER_S3_ENDPOINT, which 0.17 ignores: map it.
        if "RUNAI_STREAMER_S3_ENDPOINT" in env and "AWS_ENDPOINT_URL" not in env:
            env["AWS_ENDPOINT_URL"] = env["RUNAI_STREAMER_S3_ENDPOINT"]
        if self.distributed:
            env.setdefault("RUNAI_STREAMER_DIST", "1")
        return env


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "warmpool"


def _default_runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return Path(base) / "warmpool"
    return Path(f"/tmp/warmpool-{os.getuid()}")


@dataclass(frozen=True)
class PeerSettings:
    """Peer fill over NIXL (``peers:`` in the config file; off unless asked for).

    NIXL has no authentication: whoever holds this node's agent metadata may read what
    it registered. So peers are opt-in, only warm weight segments are ever registered,
    the metadata lives only in Redis, and UCX is held to ``interface`` (its
    ``UCX_NET_DEVICES``): listening on every interface (``all``) must be written out.
    """

    enabled: bool = False
    interface: str = ""  # a UCX device ("eth0", "mlx5_0:1", "lo"), a list, or "all"
    max_peers: int = 2  # a fill splits its ranges across at most this many peers
    range_bytes: int = 64 << 20  # the unit of transfer, checksum and fallback
    timeout_s: float = 30.0  # a range not read in this long is read elsewhere
    wait_s: float = 600.0  # how long a node waits for another that claimed the first fill
    #: Workers seed their own buffers too (a GPU's VRAM, read GPU to GPU by other nodes).
    #: Off by default: device memory cannot be registered read-only, so whoever holds
    #: the metadata could write into the weights this node's engines serve.
    seed_devices: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "interface": self.interface,
                "max_peers": self.max_peers, "range_bytes": self.range_bytes,
                "timeout_s": self.timeout_s, "wait_s": self.wait_s,
                "seed_devices": self.seed_devices}


def _peers(value: Any) -> PeerSettings:
    if isinstance(value, str):  # WARMPOOL_PEERS=eth0: on, over that interface
        value = {"enabled": True, "interface": value.strip()}
    if not isinstance(value, dict):
        raise ValueError("must be a mapping {enabled, interface, max_peers, range_bytes, "
                         "timeout_s, wait_s, seed_devices}, or (from WARMPOOL_PEERS) an "
                         "interface")
    unknown = set(value) - {f.name for f in fields(PeerSettings)}
    if unknown:
        raise ValueError(f"unknown peer setting(s) {', '.join(sorted(unknown))}")
    interface = value.get("interface", "")
    if not isinstance(interface, str) or any(c.isspace() or not c.isprintable()
                                             for c in interface):
        raise ValueError("interface: a UCX device name (eth0, mlx5_0:1), a comma list, "
                         "or all")
    checks: dict[str, Callable[[Any], Any]] = {
        "enabled": _switch, "max_peers": lambda v: _int(v, 1, 64), "range_bytes": _chunk,
        "timeout_s": _seconds, "wait_s": _seconds, "seed_devices": _bool}
    typed: dict[str, Any] = {"enabled": True, "interface": interface}
    for name, check in checks.items():
        if name in value:
            try:
                typed[name] = check(value[name])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{name}: {exc}") from None
    peers = PeerSettings(**typed)
    if peers.enabled and not interface:
        raise ValueError("peers need an interface (the UCX device peers reach this node "
                         "on, e.g. eth0); write interface: all to listen on every one")
    return peers


@dataclass(frozen=True)
class Settings:
    cache_dir: Path = field(default_factory=_default_cache_dir)
    runtime_dir: Path = field(default_factory=_default_runtime_dir)
    host_capacity: int | None = None  # bytes the host tier may hold; None = 80% of /dev/shm
    # The host arena (warmpool.pool.arena): fills take chunks of one shared-memory file
    # whose pages stay faulted after an evict, so the next model does not pay for them.
    # ``host_arena_keep``: after an evict, free faulted chunks beyond this many bytes go
    # back to the kernel (None: all are kept until `warmpool trim`).
    host_arena: bool = False
    host_arena_chunk: int = 64 << 20
    host_arena_keep: int | None = None
    # Bytes the compile caches (``<cache_dir>/compile``) may take; the least recently
    # used go first. None: no limit of their own (each goes with its model's layouts).
    compile_cache_max: int | None = None
    # The metadata cache keeps at most this many models, none unused for longer than
    # this; what a pool entry or a lease uses is always kept.
    cache_max_models: int = 256
    cache_max_age_s: float = 7 * 86400.0
    # Non-weight files larger than this are not cached (one file; all of a model's
    # together are capped at 2 GiB).
    cache_max_file: int = 64 << 20
    # Cache a model's code files (*.py), for transformers' trust_remote_code. Off: nothing
    # from a bucket lands where it could be imported. Config file only, never from the
    # environment, so that no request or sidecar variable turns it on.
    cache_code: bool = False
    redis_url: str | None = None
    watch: tuple[str | dict[str, Any], ...] = ()  # a dict: {"uri": ..., fleet fields}
    streamer: StreamerOptions = StreamerOptions()
    metrics_port: int = 9464
    node: str = field(default_factory=lambda: os.uname().nodename)
    # What this node announces in its heartbeat, for deploys with a ``node_selector``
    # (``labels: {gpu: h100, zone: a}``; WARMPOOL_LABELS="gpu=h100,zone=a").
    labels: dict[str, str] = field(default_factory=dict)
    # Filling from other nodes over NIXL (:class:`PeerSettings`; off by default).
    peers: PeerSettings = PeerSettings()
    # The config file's ``controller:`` section, raw; checked and typed by
    # ControllerOptions.load, where WARMPOOL_<NAME> variables override it.
    controller: dict[str, Any] = field(default_factory=dict)
    # The config file's ``relays:`` list, raw; checked by warmpool.relay.spec, and run
    # by ``warmpool serve`` next to the controller.
    relays: tuple[dict[str, Any], ...] = ()
    # The config file's ``export:`` section (``vllm_python``, ``timeout_s``): the Python
    # of vLLM's own environment, which the controller runs ``-m warmpool export`` with
    # when a deploy asks for an engine layout (never a program a request names), and how
    # long one export may take.
    export_vllm_python: Path | None = None
    export_timeout_s: float = 1800.0

    @classmethod
    def load(cls, config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
        """Defaults ← config file (``WARMPOOL_CONFIG``) ← environment ← ``overrides``."""
        settings = cls()
        path = config_file or os.environ.get("WARMPOOL_CONFIG")
        if path:
            settings = settings._merge(_read_config_file(Path(path)),
                                       lambda key: f"{key} in {path}")
        env_var = {key: var for var, key in ENV_NAMES.items()}
        settings = settings._merge(_from_environment(), lambda key: env_var[key])
        return settings._merge({k: v for k, v in overrides.items() if v is not None},
                               _flag_name)

    def pool_environment(self) -> dict[str, str]:
        """The variables (:data:`ENV_NAMES`) that make a child process use the same pool:
        its runtime and cache directories, and its controller's Redis."""
        names = {key: var for var, key in ENV_NAMES.items()}
        env = {names["runtime_dir"]: str(self.runtime_dir),
               names["cache_dir"]: str(self.cache_dir)}
        if self.redis_url:
            env[names["redis_url"]] = self.redis_url
        if self.host_arena:
            env[names["host_arena"]] = "true"
            env[names["host_arena_chunk"]] = str(self.host_arena_chunk)
            if self.host_arena_keep is not None:
                env[names["host_arena_keep"]] = str(self.host_arena_keep)
        if self.compile_cache_max is not None:
            env[names["compile_cache_max"]] = str(self.compile_cache_max)
        return env

    def _merge(self, values: dict[str, Any], where: Callable[[str], str] = repr) -> Settings:
        """Overlay ``values``; every value is checked here, and a bad one is a one-line
        ConfigError naming it by ``where(key)`` (the variable, flag or file entry)."""
        streamer_keys = {"concurrency", "memory_limit", "distributed"}
        top: dict[str, Any] = {}
        streamer: dict[str, Any] = {}
        for key, value in values.items():
            if key == "controller":
                if not isinstance(value, dict):
                    raise ConfigError("'controller' must be a mapping of controller settings")
                top[key] = {**self.controller, **value}
                continue
            if key == "relays":  # each checked by relay.spec.parse_specs when serve starts
                if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                    raise ConfigError("'relays' must be a list of relay settings (mappings)")
                top[key] = tuple(value)
                continue
            check = _CHECKS.get(key)
            if check is None:
                raise ConfigError(f"unknown setting {key!r}")
            try:
                checked = check(value)
            except (ConfigError, TypeError, ValueError, OverflowError) as exc:
                raise ConfigError(f"{where(key)}: {value!r} is not usable: {exc}") from None
            (streamer if key in streamer_keys else top)[key] = checked
        if streamer:
            top["streamer"] = replace(self.streamer, **streamer)
        return replace(self, **top)


def _flag_name(key: str) -> str:
    return "--redis" if key == "redis_url" else f"--{key.replace('_', '-')}"


def _int(value: Any, low: int, high: int | None = None) -> int:
    """An integer in [low, high]: from an int, or a string of digits (not a bool, not 1.5)."""
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise ValueError("not an integer")
    number = int(value.strip()) if isinstance(value, str) else int(value)
    if number < low or (high is not None and number > high):
        raise ValueError(f"must be between {low} and {high}" if high is not None
                         else f"must be at least {low}")
    return number


def _size(value: Any, low: int) -> int | None:
    size = parse_bytes(value)
    if size is not None and size < low:
        raise ValueError(f"must be at least {low} byte(s)" if low > 0 else "must be >= -1")
    if size is not None and size > MAX_BYTES:
        raise ValueError(f"must be at most {MAX_BYTES} bytes (1 PiB)")
    return size


def _path(value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value) or "\x00" in str(value):
        raise ValueError("not a path")
    return Path(value).expanduser()


#: Upper bounds: past these a number is a typo, and some (1e308 s, 1e20 bytes) overflow
#: what they are handed to (Redis's PX, a C size_t) far from the setting.
MAX_SECONDS = 10 * 366 * 86400.0
MAX_BYTES = 1 << 50  # 1 PiB


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("not a number of seconds")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0 or seconds > MAX_SECONDS:
        raise ValueError(f"must be a number of seconds from 0 to {MAX_SECONDS:g}")
    return seconds


def _bool(value: Any) -> bool:
    """Only a real boolean: in YAML ``"false"`` (quoted) is a string, and a string that
    becomes ``True`` turned the relay's authentication off once."""
    if isinstance(value, bool):
        return value
    raise ValueError("not a boolean: write true or false, unquoted")


def _switch(value: Any) -> bool:
    """A boolean, or (from an environment variable) one of true/false, 1/0, on/off."""
    if isinstance(value, bool):
        return value
    words = {"true": True, "1": True, "on": True, "false": False, "0": False, "off": False}
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    raise ValueError("not a boolean: write true or false")


def _chunk(value: Any) -> int:
    size = _size(value, 1 << 20)
    if size is None or size % (1 << 20) or size > 1 << 34:
        raise ValueError("must be a whole number of MiB, from 1 MiB to 16 GiB")
    return size


def _labels(value: Any) -> dict[str, str]:
    """Node labels: names and values of letters, digits and ._/- (a selector matches
    them exactly)."""
    from warmpool.contract.requests import MAX_LABELS, valid_labels

    if isinstance(value, str):
        pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError("must be name=value pairs separated by commas")
        value = {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(value, dict) or not valid_labels(value):
        raise ValueError(f"must map at most {MAX_LABELS} names to values (letters, digits "
                         "and ._/-)")
    return dict(value)


def _name(value: Any) -> str:
    """A node name: it becomes part of Redis keys and log lines."""
    if not isinstance(value, str) or not value.strip() or len(value) > 253 or any(
            c.isspace() or not c.isprintable() for c in value):
        raise ValueError("must be a non-empty name without spaces or control characters")
    return value


def _redis_url(value: Any) -> str:
    schemes = ("redis://", "rediss://", "unix://", "redis+sentinel://")
    if not isinstance(value, str) or not value.startswith(schemes):
        raise ValueError(f"a Redis URL starts with one of {', '.join(schemes)}")
    return value


def _watch(value: Any) -> tuple[str | dict[str, Any], ...]:
    from warmpool.contract.watchlist import Watchlist

    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(
            isinstance(i, (str, dict)) for i in items):
        raise ValueError("must be a list of model prefixes (each a URI, or a mapping "
                         "{uri: ..., nodes: all | replicas: N, node_selector: {...}})")
    kept = tuple(i.strip() if isinstance(i, str) else dict(i) for i in items
                 if not isinstance(i, str) or i.strip())
    Watchlist.parse(kept)  # InvalidURIError (a ValueError) names the bad entry
    return kept


#: Every setting's check and conversion: a value that passes is one the code can use.
_CHECKS: dict[str, Callable[[Any], Any]] = {
    "cache_dir": _path,
    "runtime_dir": _path,
    "host_capacity": lambda v: _size(v, 1),
    "host_arena": _switch,
    "host_arena_chunk": _chunk,
    "host_arena_keep": lambda v: _size(v, 0),
    "compile_cache_max": lambda v: _size(v, 0),
    "redis_url": _redis_url,
    "watch": _watch,
    "metrics_port": lambda v: _int(v, -1, 65535),  # 0: any free port, -1: off
    "node": _name,
    "labels": _labels,
    "peers": _peers,
    "concurrency": lambda v: _int(v, 1, 1024),
    "memory_limit": lambda v: _size(v, -1),
    "distributed": _bool,
    "cache_max_models": lambda v: _int(v, 1, 1_000_000),
    "cache_max_age_s": lambda v: _seconds(v),
    "cache_max_file": lambda v: _size(v, 1),
    "cache_code": _bool,
    "export_vllm_python": _path,
    "export_timeout_s": _seconds,
}


def _from_environment() -> dict[str, Any]:
    return {key: os.environ[var] for var, key in ENV_NAMES.items() if os.environ.get(var)}


#: The environment variable of each setting that has one.
ENV_NAMES = {
    "WARMPOOL_CACHE_DIR": "cache_dir",
    "WARMPOOL_RUNTIME_DIR": "runtime_dir",
    "WARMPOOL_HOST_CAPACITY": "host_capacity",
    "WARMPOOL_HOST_ARENA": "host_arena",
    "WARMPOOL_HOST_ARENA_CHUNK": "host_arena_chunk",
    "WARMPOOL_HOST_ARENA_KEEP": "host_arena_keep",
    "WARMPOOL_COMPILE_CACHE_MAX": "compile_cache_max",
    "WARMPOOL_REDIS_URL": "redis_url",
    "WARMPOOL_WATCH": "watch",
    "WARMPOOL_NODE": "node",
    "WARMPOOL_LABELS": "labels",
    "WARMPOOL_PEERS": "peers",
    "WARMPOOL_METRICS_PORT": "metrics_port",
    "WARMPOOL_CACHE_MAX_MODELS": "cache_max_models",
    "WARMPOOL_CACHE_MAX_AGE_S": "cache_max_age_s",
    "WARMPOOL_EXPORT_VLLM_PYTHON": "export_vllm_python",
    "WARMPOOL_EXPORT_TIMEOUT_S": "export_timeout_s",
}


def _read_config_file(path: Path) -> dict[str, Any]:
    """TOML, JSON or YAML, by extension; the keys are Settings' field names."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block the read for ever
            raise ConfigError(f"config file {path} is not a regular file")
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # noqa: BLE001 - any parser's error is a config error
        raise ConfigError(f"config file {path} does not parse: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    streamer = data.pop("streamer", {}) or {}
    export = data.pop("export", {}) or {}
    if not isinstance(streamer, dict) or not isinstance(export, dict):
        raise ConfigError(f"config file {path}: 'streamer' and 'export' must be mappings")
    return {**data, **streamer, **{f"export_{k}": v for k, v in export.items()}}


def private_dir(path: Path, *, repair: bool = True) -> Path:
    """Create ``path`` (mode 0700) or check that an existing one is ours and private.

    Sockets, leases and segment records live here; a directory another user can write
    would let them swap a socket or forge a layout. A loose mode on a directory of ours
    is tightened, or refused when ``repair`` is False (the socket directory: something
    may already have been swapped in, so a person should look first).
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is not a directory (a symlink?); refusing to use it")
    if st.st_uid != os.getuid():
        raise ConfigError(f"{path} belongs to uid {st.st_uid}, not to us ({os.getuid()})")
    if st.st_mode & 0o077:
        if not repair:
            raise ConfigError(f"{path} has mode {stat.S_IMODE(st.st_mode):o}; it must be 0700 "
                              "(someone may have replaced a socket in it: check, then chmod 700)")
        os.chmod(path, 0o700)
    return path


@dataclass(frozen=True)
class ControllerOptions:
    """Tunables: the config file's ``controller:`` section, then ``WARMPOOL_<NAME>`` in
    the environment, override the defaults (see load)."""

    debounce_s: float = 2.0  # quiet time after an upload event before checking the model
    recheck_s: float = 30.0  # sweep of incomplete uploads and leased old versions
    heartbeat_s: float = 5.0
    claim_idle_s: float = 60.0  # a stream entry idle this long belongs to a dead consumer
    max_deliveries: int = 5
    max_inflight: int = 32
    max_desired: int = 1024  # models one node may be asked to keep warm
    failure_backoff_s: float = 30.0  # a wanted model that failed waits this, doubling...
    failure_backoff_cap_s: float = 3600.0  # ... up to this, between attempts
    give_up_after: int = 5  # failures before a wanted model is given up until asked again
    history_keep_s: float = 7 * 24 * 3600.0  # evicted/failed/lost entries, then forgotten
    lock_ttl_s: float = 30.0
    shutdown_grace_s: float = 10.0  # in-flight work may finish; then it is abandoned
    loader: str = "auto"
    key_prefix: str = "warmpool"
    events_channel: str = ""  # default: <key_prefix>:events

    @classmethod
    def load(cls, file_values: Mapping[str, Any] | None = None, environ: Any = None,
             **overrides: Any) -> ControllerOptions:
        """Defaults ← ``file_values`` (the config file's section) ← environment ←
        ``overrides``. An unknown name or a value of the wrong type is a ConfigError
        naming where it came from, so a typo never silently keeps a default."""
        env = os.environ if environ is None else environ
        file_values = file_values or {}
        defaults = cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(file_values) - known)
        if unknown:
            raise ConfigError(f"unknown controller setting(s) {', '.join(map(repr, unknown))} "
                              f"in the config file; known: {', '.join(sorted(known))}")
        values: dict[str, Any] = {}
        for name in sorted(known):
            kind = type(getattr(defaults, name))
            sources = [(f"controller.{name} in the config file", file_values.get(name)),
                       (f"WARMPOOL_{name.upper()}", env.get(f"WARMPOOL_{name.upper()}") or None)]
            for where, raw in sources:
                if raw is None:
                    continue
                values[name] = _option(name, kind, raw, where)
        for name, raw in overrides.items():
            if raw is not None:
                if name not in known:
                    raise ConfigError(f"unknown controller option {name!r}")
                kind = type(getattr(defaults, name))
                values[name] = _option(name, kind, raw, f"controller option {name}")
        return cls(**values)


#: The smallest usable value of each numeric option: a heartbeat of 0 s floods the log,
#: a max_inflight of 0 never takes a message, a TTL of 0 is a lock that never holds.
_MINIMUM: dict[str, float] = {
    "debounce_s": 0.0, "recheck_s": 0.1, "heartbeat_s": 0.1, "claim_idle_s": 0.1,
    "max_deliveries": 1, "max_inflight": 1, "lock_ttl_s": 0.3, "shutdown_grace_s": 0.0,
}
DAY = 86400.0
#: The largest sensible value of each numeric option. Past these, a value is a typo (or
#: an attack on the config): ``lock_ttl_s=1e308`` overflowed Redis's PX argument, and
#: ``max_inflight=1e20`` was accepted, then refused by Redis 8 times a second.
_MAXIMUM: dict[str, float] = {
    "debounce_s": 3600, "recheck_s": DAY, "heartbeat_s": 3600, "claim_idle_s": DAY,
    "max_deliveries": 1000, "max_inflight": 4096, "max_desired": 1_000_000,
    "failure_backoff_s": DAY, "failure_backoff_cap_s": 30 * DAY, "give_up_after": 1000,
    "history_keep_s": 366 * DAY, "lock_ttl_s": 3600, "shutdown_grace_s": 3600,
}


def _option(name: str, kind: type, raw: Any, where: str) -> Any:
    """``raw`` converted to ``kind`` and checked, or a one-line ConfigError naming ``where``."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{where}: {raw!r} is not usable: {why}")

    try:
        if kind is not str and isinstance(raw, bool):
            raise ValueError
        if kind is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError
        value = kind(raw.strip() if isinstance(raw, str) and kind is not str else raw)
    except (TypeError, ValueError, OverflowError):
        raise bad(f"not a valid {kind.__name__}") from None
    if kind in (int, float):
        if not math.isfinite(value):
            raise bad("not a finite number")
        if value < _MINIMUM.get(name, 0):
            raise bad(f"must be at least {_MINIMUM.get(name, 0):g}")
        if value > _MAXIMUM.get(name, math.inf):
            raise bad(f"must be at most {_MAXIMUM[name]:g}")
    if name == "loader":
        from warmpool.loading.loaders import check_loader

        check_loader(value, where)
    if name == "key_prefix" and (not value or any(c.isspace() for c in value)):
        raise bad("must be a non-empty prefix without spaces")
    return value
