#!/usr/bin/env python
"""Host-tier benchmark: how long until every byte of a checkpoint has been read once?

Generates a Llama-shaped checkpoint (``warmpool.model.generate``, ~2 GB by default), starts
SeaweedFS on loopback ports and uploads the checkpoint to it, then times each method in
a FRESH PROCESS (one subprocess per measurement, several repetitions, medians):

* ``safetensors.torch.load_file`` + touch           (the obvious alternative, the baseline)
* runai-model-streamer alone + touch                 (local directory: its default O_DIRECT
                                                      reads and buffered io_uring; S3)
* ``warmpool.tiers.prefetch``                              (time to warm, local and S3)
* ``warmpool.attachment`` of the warm entry, alone and + touch

"Touch" is the same for every method: a sum over an int64 view of each tensor's bytes
(the < 8-byte tail as uint8), so every byte is read once; the sums double as a checksum
that every method must agree on.

Run ``python bench/host_tier.py --help``; bench/README.md explains how to read the table.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # first statement: a child's import time counts from here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from contextlib import ExitStack, suppress  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
MASK64 = (1 << 64) - 1
RESULT_MARK = "BENCH-RESULT "
BUCKET = "warmpool-bench"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
#: Variables a developer's shell may carry that would change what the children measure.
SCRUB = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3",
         "WARMPOOL_CONFIG", "WARMPOOL_HOST_CAPACITY", "WARMPOOL_REDIS_URL")


# =========================================================================================
# The child: one measurement in a fresh interpreter
# =========================================================================================

def touch(tensor: Any) -> int:
    """Read every byte of ``tensor`` once; return the wrapping 64-bit sum of its words.

    The int64 view makes this a memory-bandwidth reduction (a uint8 sum is ~200x slower
    in torch). Words are counted from the tensor's first byte, so the sum does not
    depend on where the bytes live; a start that int64 cannot view is copied once.
    """
    import torch

    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return 0
    flat = tensor.reshape(-1).view(torch.uint8)
    words = nbytes // 8
    total = 0
    if words:
        body = flat[: words * 8]
        try:
            view = body.view(torch.int64)
        except RuntimeError:
            view = body.clone().view(torch.int64)
        total += int(view.sum())
    if nbytes % 8:
        total += int(flat[words * 8:].sum(dtype=torch.int64))
    return total & MASK64


def _one_thread() -> None:
    """The touch runs on one thread in every child that touches.

    With torch's default (one OpenMP thread per core) the worker threads keep spinning
    after each reduction and take the CPU from runai's I/O threads: on a 2-core machine
    that made the streamer 1.5-4x slower, and it would measure the touch, not the loader.
    One thread still reduces at memory bandwidth (~8 GB/s here). The prefetch child
    keeps torch's default: there the copies are warmpool's own work."""
    import torch

    torch.set_num_threads(1)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    method = spec["method"]
    out: dict[str, Any] = {}
    if method != "prefetch":
        _one_thread()
    if method == "load_file":
        import torch  # noqa: F401
        from safetensors.torch import load_file

        imported = time.perf_counter()
        checksum = tensors = 0
        for path in spec["paths"]:
            for tensor in load_file(path).values():
                checksum += touch(tensor)
                tensors += 1
        done = time.perf_counter()
    elif method == "runai":
        import torch  # noqa: F401
        from runai_model_streamer import SafetensorsStreamer

        imported = time.perf_counter()
        checksum = tensors = 0
        with SafetensorsStreamer() as streamer:
            streamer.stream_files(spec["paths"], owned=spec.get("owned", True))
            for _name, tensor in streamer.get_tensors():
                checksum += touch(tensor)
                tensors += 1
        done = time.perf_counter()
    elif method == "prefetch":
        import asyncio

        import torch  # noqa: F401

        from warmpool.config import Settings
        from warmpool.tiers.prefetch import prefetch

        imported = time.perf_counter()
        result = asyncio.run(prefetch(spec["uri"], settings=Settings.load()))
        done = time.perf_counter()
        out["prefetch"] = result.to_json()
        if result.already_warm:
            raise SystemExit("the entry was already warm: the bench failed to evict it")
        checksum, tensors = None, result.entry.tensors
    elif method == "attach":
        import torch  # noqa: F401

        from warmpool import attach

        imported = time.perf_counter()
        model = attach(spec["uri"])
        views = model.tensors
        attached = time.perf_counter()
        checksum = None
        if spec.get("touch"):
            checksum = sum(touch(t) for t in views.values())
        done = time.perf_counter()
        out["attach_s"] = attached - imported
        tensors = len(views)
        model.close()
    else:
        raise SystemExit(f"unknown method {method!r}")
    out.update(import_s=imported - _T0, op_s=done - imported, tensors=tensors,
               checksum=None if checksum is None else checksum & MASK64)
    return out


def run_child_main(raw: str) -> None:
    result = child(json.loads(raw))
    sys.stdout.flush()
    print(RESULT_MARK + json.dumps(result), flush=True)


# =========================================================================================
# The parent: set up, measure, report, clean up
# =========================================================================================

@dataclass
class Row:
    key: str
    method: str  # label shown in the table
    source: str  # local | s3 | shm
    cache: str  # warm | cold
    spec: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    prepare: str = ""  # "evict" before every repetition
    reps: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def median(self, name: str) -> float | None:
        values = [r[name] for r in self.reps if r.get(name) is not None]
        return statistics.median(values) if values else None

    def spread(self, name: str) -> tuple[float, float] | None:
        values = [r[name] for r in self.reps if r.get(name) is not None]
        return (min(values), max(values)) if values else None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stack = ExitStack()
        self.notes: list[str] = []
        self.setup: dict[str, float] = {}
        self.python = sys.executable
        self.base_env = {k: v for k, v in os.environ.items()
                         if k not in SCRUB and not k.startswith("RUNAI_STREAMER_")}
        self.base_env["PYTHONUNBUFFERED"] = "1"
        ignored = sorted(k for k in os.environ if k.startswith("RUNAI_STREAMER_"))
        if ignored:
            self.notes.append("Ignored from the calling shell (defaults measured): "
                              + ", ".join(ignored))
        self.seaweed: Any = None
        self.drop_ok: bool | None = None
        self.drop_error = ""

    # --- setup ------------------------------------------------------------------------
    def make_dirs(self) -> None:
        if self.args.workdir:
            self.work = Path(self.args.workdir).resolve()
            self.work.mkdir(parents=True, exist_ok=True)
        else:
            self.work = Path(tempfile.mkdtemp(prefix="warmpool-bench-", dir="/var/tmp"))
        self.model_dir = self.work / "model"
        self.runtime_dir = self.work / "runtime"
        self.cache_dir = self.work / "cache"
        fs = _filesystem(self.work)
        if fs in ("tmpfs", "ramfs"):
            self.notes.append(f"The work directory {self.work} is on {fs}: a 'cold' page cache "
                              "is impossible there (pass --workdir on a disk).")

    def generate(self) -> None:
        from warmpool.model.generate import PRESETS, Shape, generate_model

        base = PRESETS[self.args.size_preset]
        layers = self.args.layers
        if layers is None:
            per_layer = (Shape(**{**base.__dict__, "layers": 1}).nbytes()
                         - Shape(**{**base.__dict__, "layers": 0}).nbytes())
            fixed = Shape(**{**base.__dict__, "layers": 0}).nbytes()
            layers = max(1, round((self.args.target_gb * 1e9 - fixed) / per_layer))
        self.shape = Shape(**{**base.__dict__, "layers": layers})
        started = time.perf_counter()
        if (self.model_dir / "model.safetensors.index.json").exists() and self.args.workdir:
            index = json.loads((self.model_dir / "model.safetensors.index.json").read_text())
            config = json.loads((self.model_dir / "config.json").read_text())
            self.shape = Shape(hidden=config["hidden_size"],
                               intermediate=config["intermediate_size"],
                               layers=config["num_hidden_layers"], vocab=config["vocab_size"],
                               kv_heads=config["num_key_value_heads"],
                               heads=config["num_attention_heads"])
            self.model = {"bytes": index["metadata"]["total_size"],
                          "files": sorted(set(index["weight_map"].values())),
                          "tensors": len(index["weight_map"]), "reused": True}
        else:
            self.model = generate_model(self.model_dir, self.shape, shards=self.args.shards)
        self.setup["generate_s"] = time.perf_counter() - started
        self.bytes = int(self.model["bytes"])
        self.shards = [self.model_dir / f for f in self.model["files"]]
        self.local_uri = str(self.model_dir)

    def start_s3(self) -> None:
        sys.path.insert(0, str(HERE))
        from _seaweed import seaweedfs  # type: ignore[import-not-found]
        from boto3.s3.transfer import TransferConfig

        started = time.perf_counter()
        self.seaweed = self.stack.enter_context(seaweedfs(self.work / "seaweedfs"))
        self.setup["seaweedfs_start_s"] = time.perf_counter() - started
        client = self.seaweed.client()
        try:
            client.create_bucket(Bucket=BUCKET)
        except client.exceptions.ClientError as exc:  # a kept --workdir already has it
            if exc.response.get("Error", {}).get("Code") not in (
                    "BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        prefix = f"models/{self.args.size_preset}-{self.shape.layers}l/"
        transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20,
                                  max_concurrency=4)
        started = time.perf_counter()
        for path in sorted(self.model_dir.iterdir()):
            client.upload_file(str(path), BUCKET, prefix + path.name, Config=transfer)
        self.setup["s3_upload_s"] = time.perf_counter() - started
        self.s3_uri = f"s3://{BUCKET}/{prefix}"
        self.s3_paths = [f"{self.s3_uri}{p.name}" for p in self.shards]

    # --- page cache ---------------------------------------------------------------------
    def source_files(self, source: str) -> list[Path]:
        if source == "local":
            return list(self.shards)
        if source == "s3":
            return sorted((self.work / "seaweedfs" / "data").rglob("*.dat"))
        return []

    def make_cold(self, source: str) -> bool:
        """Take the source's bytes out of the page cache; False when that is impossible.

        ``fadvise`` (the default): POSIX_FADV_DONTNEED on exactly the files the row reads
        (the shards, or SeaweedFS's volume files) - any user may, nothing else is touched.
        ``drop_caches``: ``echo 3 > /proc/sys/vm/drop_caches`` (root only, machine-wide: it
        also evicts torch's libraries, so the code is re-warmed right after by one
        ``import`` - otherwise a first reduction reads libtorch from disk).
        """
        if self.args.cold_method == "drop_caches":
            if self.drop_ok is False:
                return False
            try:
                os.sync()
                DROP_CACHES.write_text("3\n")
                self.drop_ok = True
            except OSError as exc:
                self.drop_ok = False
                self.drop_error = f"{type(exc).__name__}: {exc.strerror or exc}"
                return False
            subprocess.run([self.python, "-c", _REWARM], env=self.base_env, check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
            return True
        for path in self.source_files(source):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return True

    def resident_fraction(self, source: str) -> float | None:
        """Share of the source's bytes in the page cache (fincore), None if unknown."""
        if not shutil.which("fincore"):
            return None
        paths = [str(p) for p in self.source_files(source)]
        if not paths:
            return None
        try:
            out = subprocess.run(["fincore", "--json", "--bytes", "-o", "RES,SIZE", *paths],
                                 capture_output=True, text=True, timeout=60, check=True).stdout
            files = json.loads(out)["fincore"]
        except (subprocess.SubprocessError, ValueError, KeyError):
            return None
        size = sum(int(f["size"]) for f in files)
        res = sum(min(int(f["res"]), int(f["size"])) for f in files)
        return res / size if size else None

    # --- the pool -----------------------------------------------------------------------
    def settings(self) -> Any:
        from warmpool.config import Settings

        return Settings.load(runtime_dir=str(self.runtime_dir), cache_dir=str(self.cache_dir))

    def evict_all(self) -> None:
        """Evict every entry of the bench's private pool and empty its metadata cache."""
        import asyncio

        from warmpool.pool.entries import Pool
        from warmpool.pool.registry.base import State

        if self.runtime_dir.exists():
            async def go() -> None:
                pool = Pool(self.settings())
                for entry in await pool.entries():
                    if entry.state in (State.WARM, State.FAILED, State.LOST):
                        with suppress(Exception):
                            await pool._evict_one(entry, force=True, reason="bench")
                pool.host.remove_all()
                pool.host.reclaim()
            asyncio.run(go())
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    def leftover_segments(self) -> list[str]:
        from warmpool.pool.host import SHM_DIR, HostTier

        if not self.runtime_dir.exists():
            return []
        prefix = HostTier(self.runtime_dir).prefix
        return sorted(p.name for p in SHM_DIR.glob(f"{prefix}*"))

    def ensure_warm(self) -> None:
        from warmpool.pool.host import HostTier

        if HostTier(self.runtime_dir).residents() if self.runtime_dir.exists() else []:
            return
        result = self.run_child({"method": "prefetch", "uri": self.local_uri}, self.pool_env())
        if "error" in result:
            raise RuntimeError(f"could not warm the model for attach: {result['error']}")

    def pool_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {"WARMPOOL_RUNTIME_DIR": str(self.runtime_dir),
                "WARMPOOL_CACHE_DIR": str(self.cache_dir), **(extra or {})}

    # --- measuring ----------------------------------------------------------------------
    def run_child(self, spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.run([self.python, str(Path(__file__).resolve()), "--child",
                               json.dumps(spec)], env={**self.base_env, **env},
                              capture_output=True, text=True, timeout=self.args.child_timeout)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            return {"error": f"exit {proc.returncode}: {tail}", "stderr": proc.stderr[-4000:]}
        result = json.loads(lines[-1][len(RESULT_MARK):])
        result["wall_s"] = wall
        result["cpu_s"] = cpu  # user + system of the whole child, all threads
        return result

    def rows(self) -> list[Row]:
        s3 = self.seaweed is not None
        s3_env = self.seaweed.env() if s3 else {}
        local_paths = [str(p) for p in self.shards]
        caches = ["warm"] + (["cold"] if self.args.cold else [])
        rows: list[Row] = []
        for cache in caches:
            c = "" if cache == "warm" else "-cold"
            rows.append(Row("load_file" + c, "safetensors load_file + touch", "local", cache,
                            {"method": "load_file", "paths": local_paths}))
            rows.append(Row("runai" + c, "runai streamer, default O_DIRECT + touch", "local",
                            cache, {"method": "runai", "paths": local_paths}))
            rows.append(Row("runai-buffered" + c, "runai streamer, io_uring_buffered + touch",
                            "local", cache, {"method": "runai", "paths": local_paths},
                            {"RUNAI_STREAMER_FS_STRATEGY": "io_uring_buffered"}))
            if s3:
                rows.append(Row("runai-s3" + c, "runai streamer + touch", "s3", cache,
                                {"method": "runai", "paths": self.s3_paths}, s3_env))
                rows.append(Row("prefetch-s3" + c, "warmpool prefetch (to warm)", "s3", cache,
                                {"method": "prefetch", "uri": self.s3_uri},
                                self.pool_env(s3_env), prepare="evict"))
            rows.append(Row("prefetch" + c, "warmpool prefetch (to warm)", "local", cache,
                            {"method": "prefetch", "uri": self.local_uri}, self.pool_env(),
                            prepare="evict"))
            if cache == "cold":
                continue  # the warm entry is shared memory, not page cache: nothing to make cold
            rows.append(Row("attach" + c, "warmpool.attachment (views only)", "shm", cache,
                            {"method": "attach", "uri": self.local_uri}, self.pool_env(),
                            prepare="warm"))
            rows.append(Row("attach-touch" + c, "warmpool.attachment + touch", "shm", cache,
                            {"method": "attach", "uri": self.local_uri, "touch": True},
                            self.pool_env(), prepare="warm"))
        wanted = set(self.args.only.split(",")) if self.args.only else None
        return [r for r in rows if wanted is None or r.key.removesuffix("-cold") in wanted]

    def measure_once(self, row: Row, rep: int, say: Any) -> None:
        """One repetition of ``row`` (a row that failed once is not run again)."""
        if row.error:
            return
        if row.prepare == "evict":
            self.evict_all()
        elif row.prepare == "warm":
            try:
                self.ensure_warm()
            except RuntimeError as exc:
                row.error = str(exc)
                say(f"  {row.key}: skipped ({exc})")
                return
        if row.cache == "cold" and not self.make_cold(row.source):
            row.error = f"drop_caches not permitted ({self.drop_error})"
            say(f"  {row.key}: skipped, {row.error}")
            return
        resident = self.resident_fraction(row.source)
        result = self.run_child(row.spec, row.env)
        result["resident_before"] = resident
        row.reps.append(result)
        if "error" in result:
            row.error = result["error"]
            say(f"  {row.key} #{rep + 1}: FAILED {row.error}")
            return
        say(f"  {row.key} #{rep + 1}: op {result['op_s']:.3f}s  wall {result['wall_s']:.2f}s  "
            f"cpu {result['cpu_s']:.2f}s"
            + (f"  (cached before: {resident:.0%})" if resident is not None else ""))

    # --- the whole run ------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        say = _printer()
        started = time.perf_counter()
        self.load_before = os.getloadavg()
        self.make_dirs()
        try:
            say(f"work directory {self.work}")
            self.generate()
            say(f"model: {self.bytes / 1e9:.2f} GB, {self.model['tensors']} tensors, "
                f"{len(self.shards)} shards ({self.setup['generate_s']:.1f}s to generate)")
            if self.args.s3:
                self.start_s3()
                say(f"SeaweedFS {self.seaweed.version} at {self.seaweed.endpoint} "
                    f"(started in {self.setup['seaweedfs_start_s']:.1f}s, upload "
                    f"{self.setup['s3_upload_s']:.1f}s)")
            self.evict_all()
            os.sync()  # the generated and uploaded bytes are written back before any timing
            rows = self.rows()
            # Round-robin: every round runs each row once, so a change in the machine's load
            # during the run spreads over all methods instead of spoiling one of them.
            for rep in range(self.args.reps):
                say(f"round {rep + 1} of {self.args.reps}")
                for row in rows:
                    self.measure_once(row, rep, say)
            if not self.args.keep:
                self.evict_all()
            report = self.report(rows, time.perf_counter() - started)
        finally:
            self.cleanup(say)
        return report

    def cleanup(self, say: Any) -> None:
        if self.args.keep:
            self.stack.close()  # SeaweedFS cannot outlive us; its data stays
            left = self.leftover_segments()
            say(f"--keep: kept {self.work} (model, cache, runtime dir, SeaweedFS data)"
                + (f" and the warm entry (/dev/shm/{', '.join(left)}); free it with "
                   f"WARMPOOL_RUNTIME_DIR={self.runtime_dir} warmpool evict --force "
                   f"{self.local_uri}" if left else ""))
            return
        with suppress(Exception):
            self.evict_all()
        with suppress(Exception):
            left = self.leftover_segments()
            if left:
                from warmpool.pool.host import SHM_DIR

                for name in left:
                    (SHM_DIR / name).unlink(missing_ok=True)
                say(f"removed leftover shm segments: {left}")
        self.stack.close()
        shutil.rmtree(self.work, ignore_errors=True)

    # --- reporting ----------------------------------------------------------------------
    def report(self, rows: list[Row], total_s: float) -> dict[str, Any]:
        baseline = {r.cache: r for r in rows if r.key.startswith("load_file") and r.reps
                    and not r.error}
        checksums = {r.key: {x.get("checksum") for x in r.reps} - {None} for r in rows}
        reference = next(iter(checksums.get("load_file", set()) or []), None)
        table = []
        for r in rows:
            op, wall, imp = r.median("op_s"), r.median("wall_s"), r.median("import_s")
            base = baseline.get(r.cache)
            b_op = base.median("op_s") if base else None
            b_wall = base.median("wall_s") if base else None
            sums = checksums[r.key]
            if not sums:
                check = "—"
            elif reference is None:
                check = "?"
            else:
                check = "ok" if sums == {reference} else "MISMATCH"
            reads = r.spec["method"] != "attach" or r.spec.get("touch")
            residents = [x.get("resident_before") for x in r.reps
                         if x.get("resident_before") is not None]
            table.append({
                "key": r.key, "method": r.method, "source": r.source, "page_cache": r.cache,
                "reps": len([x for x in r.reps if "error" not in x]),
                "op_s": op, "op_range_s": r.spread("op_s"),
                "gb_per_s": (self.bytes / op / 1e9) if (op and reads) else None,
                "op_vs_load_file": (b_op / op) if (op and b_op) else None,
                "import_s": imp, "wall_s": wall, "wall_range_s": r.spread("wall_s"),
                "wall_vs_load_file": (b_wall / wall) if (wall and b_wall) else None,
                "cpu_s": r.median("cpu_s"),
                "resident_before": statistics.median(residents) if residents else None,
                "checksum": check, "error": r.error, "runs": r.reps,
            })
        if self.drop_ok is False:
            self.notes.append(f"Cold rows skipped: writing {DROP_CACHES} is not permitted here "
                              f"({self.drop_error}); try --cold-method fadvise.")
        drop_permitted = (self.drop_ok if self.drop_ok is not None
                          else os.access(DROP_CACHES, os.W_OK))
        return {
            "bench": "host_tier",
            "host": _host_name(self.args),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": _machine(),
            "versions": _versions(self.seaweed),
            "model": {"bytes": self.bytes, "tensors": self.model["tensors"],
                      "shards": len(self.shards), "preset": self.args.size_preset,
                      "shape": self.shape.__dict__, "dtype": "bfloat16"},
            "reps": self.args.reps,
            "touch": "sum over an int64 view of each tensor's bytes (uint8 for a <8-byte tail), "
                     "on one torch thread",
            "cold": {"rows": self.args.cold, "method": self.args.cold_method,
                     "drop_caches_permitted": drop_permitted,
                     "drop_caches_error": self.drop_error or None},
            "warmpool_streamer_env": _warmpool_streamer_env(),
            "setup_s": self.setup, "total_s": total_s,
            "loadavg": {"start": self.load_before, "end": os.getloadavg()},
            "notes": self.notes, "rows": table,
        }


_REWARM = """
import torch, safetensors.torch, runai_model_streamer
for m in ("warmpool", "warmpool.attachment", "warmpool.tiers.prefetch"):
    try:
        __import__(m)
    except Exception:
        pass
"""


# =========================================================================================
# Output
# =========================================================================================

def _fmt(value: float | None, digits: int = 3, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f}×" if value >= 100 else f"{value:.2f}×" if value < 10 else f"{value:.1f}×"


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1000:.1f} ms" if value < 0.1 else f"{value:.2f} s"


TABLE_COLUMNS = ["method", "source", "page cache", "op", "op min–max", "GB/s",
                 "op vs load_file", "import", "process wall", "wall vs load_file", "child CPU",
                 "bytes ok"]


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    out = []
    for r in report["rows"]:
        if r["error"] and not r["reps"]:
            out.append([r["method"], r["source"], r["page_cache"], "failed: " + r["error"][:60],
                        *["—"] * 8])
            continue
        rng = r["op_range_s"]
        cache = r["page_cache"]
        if r["resident_before"] is not None and r["source"] != "shm":
            cache += f" ({r['resident_before']:.0%})"
        out.append([
            r["method"], r["source"], cache, _seconds(r["op_s"]),
            f"{_seconds(rng[0])}–{_seconds(rng[1])}" if rng else "—",
            _fmt(r["gb_per_s"], 2), _ratio(r["op_vs_load_file"]), _seconds(r["import_s"]),
            _seconds(r["wall_s"]), _ratio(r["wall_vs_load_file"]), _seconds(r["cpu_s"]),
            r["checksum"] + (" (failed reps)" if r["error"] else ""),
        ])
    return out


def caption(report: dict[str, Any]) -> str:
    m = report["model"]
    return (f"{m['bytes'] / 1e9:.2f} GB bf16 checkpoint ({m['tensors']} tensors, {m['shards']} "
            f"shards), {report['reps']} fresh processes per row, medians. Touch (the same for "
            f"every method): {report['touch']}. 'op' is measured inside the child from after its "
            "imports to the last byte read (prefetch: until the entry is warm; attach: until "
            "the views exist); 'process wall' is the whole fresh process (interpreter, torch "
            "import, op, exit) measured by the parent. Speedup = load_file's time / this row's "
            "time in the same page-cache state (> 1 is faster). Page cache: share of the "
            "source's bytes cached just before the run (fincore). 'child CPU': user + system "
            "seconds of the whole child, all threads. 'bytes ok': the touch checksum equals "
            "load_file's.")


def headline(report: dict[str, Any]) -> list[str]:
    """The comparisons a reader wants first, from the medians in the table."""
    rows = {r["key"]: r for r in report["rows"] if r["op_s"] is not None}

    def op(key: str) -> float | None:
        return rows[key]["op_s"] if key in rows else None

    out = []
    attach, touched = op("attach"), op("attach-touch")
    if attach is not None:
        out.append(f"warmpool.attachment: usable views in {_seconds(attach)} "
                   f"(process wall {_seconds(rows['attach']['wall_s'])}, of which import "
                   f"{_seconds(rows['attach']['import_s'])}).")
    if touched is not None:
        parts = []
        for key, what in (("load_file", "load_file + touch from a warm page cache"),
                          ("load_file-cold", "load_file + touch from a cold one"),
                          ("runai-s3", "runai + touch from S3")):
            other = op(key)
            if other is not None and touched > 0:
                ratio = other / touched
                faster = ("about as fast as" if 0.95 <= ratio <= 1.05 else
                          f"{_ratio(ratio)} faster than" if ratio > 1 else
                          f"{_ratio(1 / ratio)} slower than")
                parts.append(f"{faster} {what} ({_seconds(other)})")
        out.append(f"attach + touch of every byte: {_seconds(touched)}"
                   + (f", {', '.join(parts)}." if parts else "."))
    warm = [(k, op(k)) for k in ("prefetch", "prefetch-s3", "prefetch-cold", "prefetch-s3-cold")
            if op(k) is not None]
    if warm:
        gb = report["model"]["bytes"] / 1e9
        out.append("Time to warm (prefetch, off the serving path): " + ", ".join(
            f"{rows[k]['source']}{' cold' if k.endswith('-cold') else ''} {_seconds(v)} "
            f"({gb / v:.2f} GB/s)" for k, v in warm) + ".")
    return out


def print_table(report: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(caption(report))
        print(" | ".join(TABLE_COLUMNS))
        for row in table_rows(report):
            print(" | ".join(row))
        print("\n".join(headline(report)))
        return
    table = Table(title=f"warmpool host tier — {report['host']}", caption=caption(report),
                  caption_justify="left")
    for i, col in enumerate(TABLE_COLUMNS):
        table.add_column(col, justify="left" if i < 3 else "right")
    for row in table_rows(report):
        table.add_row(*row)
    console = Console(width=max(200, shutil.get_terminal_size().columns))
    console.print(table)
    for line in headline(report):
        console.print(line, soft_wrap=True)


def markdown(report: dict[str, Any]) -> str:
    m, v, mach = report["model"], report["versions"], report["machine"]
    lines = [f"# warmpool host-tier benchmark — {report['host']}", "",
             f"Run {report['when']} by `python bench/host_tier.py` "
             f"({report['total_s']:.0f} s in all).", "",
             f"Machine: {mach['cpus']} CPUs, {mach['mem_gib']:.0f} GiB RAM, {mach['system']}; "
             f"python {v['python']}, torch {v['torch']}, safetensors {v['safetensors']}, "
             f"runai-model-streamer {v['runai_model_streamer']}, SeaweedFS {v['seaweedfs']}.", "",
             f"Model: Llama-shaped, preset `{m['preset']}` with {m['shape']['layers']} layers "
             f"(hidden {m['shape']['hidden']}, vocab {m['shape']['vocab']}).", "",
             "| " + " | ".join(TABLE_COLUMNS) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * (len(TABLE_COLUMNS) - 3)) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
              for row in table_rows(report)]
    lines += ["", caption(report), ""]
    lines += [f"- {line}" for line in headline(report)] + [""]
    cold = report["cold"]
    how = ("`posix_fadvise(POSIX_FADV_DONTNEED)` on exactly the files the row reads (the shards; "
           "for S3 rows SeaweedFS's volume files), after an fdatasync"
           if cold["method"] == "fadvise" else
           "`echo 3 > /proc/sys/vm/drop_caches` (followed by one `import torch, …` so that only "
           "the weights are cold, not torch's code)")
    lines.append("Page cache: the checkpoint is in the page cache after generation (and "
                 "SeaweedFS's volume files after the upload); that is the 'warm' state. "
                 + (f"'cold' rows ran right after {how}. " if cold["rows"] else
                    "No cold rows were asked for (--no-cold). ")
                 + ("`echo 3 > /proc/sys/vm/drop_caches` is permitted on this machine "
                    "(`--cold-method drop_caches`), but it empties the cache of the whole "
                    "machine. " if cold["drop_caches_permitted"] else
                    "`echo 3 > /proc/sys/vm/drop_caches` is NOT permitted on this machine"
                    + (f" ({cold['drop_caches_error']}). " if cold["drop_caches_error"] else ". "))
                 + "The warm entry lives in shared memory (tmpfs), which is not dropped from the "
                   "page cache, so attach rows have no cold variant.")
    lines += ["", f"warmpool's streamer settings (its defaults on this machine): "
              f"`{json.dumps(report['warmpool_streamer_env'])}`; runai rows run the streamer's own "
              "defaults except where the row says otherwise.", "",
              "Setup: " + ", ".join(f"{k} {v:.1f}s" for k, v in report["setup_s"].items()) + ".",
              "", f"Load average (1 min) at start {report['loadavg']['start'][0]:.2f}, at end "
              f"{report['loadavg']['end'][0]:.2f} on {mach['cpus']} CPUs: anything above ~0.5 "
              "means "
              "other processes shared the CPUs and the timings carry their noise. CPU seconds "
              "per child (user + system, median) are in the JSON (`cpu_s`)."]
    for note in report["notes"]:
        lines += ["", note]
    return "\n".join(lines) + "\n"


# =========================================================================================
# Helpers
# =========================================================================================

def _printer() -> Any:
    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)
    return say


def _host_name(args: argparse.Namespace) -> str:
    name = args.name or socket.gethostname().split(".")[0] or "dev"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name) or "dev"


def _filesystem(path: Path) -> str:
    best, fstype = "", ""
    with suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    return fstype


def _machine() -> dict[str, Any]:
    mem = 0
    with suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {"cpus": os.cpu_count(), "mem_gib": mem / (1 << 30),
            "system": f"{platform.system()} {platform.release()}", "cpu": platform.processor()}


def _versions(seaweed: Any) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    numbered = [w for w in (seaweed.version.split() if seaweed else []) if w[:1].isdigit()
                and "." in w]
    out = {"python": platform.python_version(),
           "seaweedfs": numbered[0] if numbered else seaweed.version if seaweed else "not used"}
    for name, dist in (("torch", "torch"), ("safetensors", "safetensors"),
                       ("runai_model_streamer", "runai-model-streamer"), ("warmpool", "warmpool"),
                       ("boto3", "boto3")):
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            out[name] = "?"
    return out


def _warmpool_streamer_env() -> dict[str, str]:
    from warmpool.config import StreamerOptions

    env = StreamerOptions().environment(base={})
    return {k: v for k, v in env.items() if k.startswith("RUNAI_STREAMER_")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-preset", default="small", choices=["tiny", "small", "llama-3-8b"],
                   help="shape of the generated model (warmpool.model.generate.PRESETS; "
                   "default small)")
    p.add_argument("--layers", type=int, default=None,
                   help="number of layers (default: enough for --target-gb)")
    p.add_argument("--target-gb", type=float, default=2.0,
                   help="checkpoint size to aim for when --layers is not given (default 2.0)")
    p.add_argument("--shards", type=int, default=4, help="safetensors shards (default 4)")
    p.add_argument("--reps", type=int, default=3,
                   help="fresh processes per row; the table shows medians (default 3)")
    p.add_argument("--no-cold", dest="cold", action="store_false",
                   help="skip the cold-page-cache rows (they drop the page cache machine-wide)")
    p.add_argument("--cold-method", choices=["fadvise", "drop_caches"], default="fadvise",
                   help="how cold rows evict the source from the page cache: fadvise "
                        "(DONTNEED on the source files only; default) or drop_caches (root, "
                        "machine-wide)")
    p.add_argument("--no-s3", dest="s3", action="store_false", help="skip SeaweedFS and S3 rows")
    p.add_argument("--only", default="",
                   help="comma-separated row keys: load_file,runai,runai-buffered,runai-s3,"
                        "prefetch,prefetch-s3,attach,attach-touch (load_file is the baseline)")
    p.add_argument("--workdir", default=None,
                   help="where to put model, pool and SeaweedFS data (default: a new "
                        "directory under /var/tmp; it must be on a disk for cold rows); "
                        "an existing model there is reused")
    p.add_argument("--out", default=str(HERE / "results"), help="results directory")
    p.add_argument("--name", default=None, help="results file suffix (default: hostname or 'dev')")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (and the warm entry's segment) afterwards")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="measure nothing: print the table of an earlier run's JSON and "
                        "rewrite its markdown beside it")
    p.add_argument("--child-timeout", type=float, default=300.0, help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        run_child_main(args.child)
        return 0
    if args.render:
        source = Path(args.render)
        report = json.loads(source.read_text())
        print_table(report)
        source.with_suffix(".md").write_text(markdown(report))
        print(f"\nwrote {source.with_suffix('.md')}", file=sys.stderr)
        return 0
    # SIGTERM (and SIGINT, which a background job inherits as ignored) end the run the
    # way Ctrl-C does: through the cleanup that evicts, stops SeaweedFS and removes files.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    try:
        report = Bench(args).run()
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'Ctrl-C'}); cleaned up", file=sys.stderr)
        return 130
    print_table(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"host_tier-{report['host']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(f"\nwrote {stem}.md and {stem}.json", file=sys.stderr)
    failed = [r["key"] for r in report["rows"] if r["error"]]
    if failed:
        print(f"rows with errors: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
