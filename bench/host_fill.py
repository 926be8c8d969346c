"""Filling a fresh host-tier segment from the page cache: which way of writing it is fastest?

A warm checkpoint is read from the page cache at memory speed; what bounds time-to-warm is
the new shared-memory segment: every tmpfs page is allocated and zeroed on first touch.
This script fills a fresh ``/dev/shm`` segment with the same model several ways, in one
process, repetitions interleaved, and checks each segment bit-exactly against the file:

- warmpool's pread loader as it is (threads of ``preadv`` into the mapping);
- pre-faulting first in parallel threads (``MADV_POPULATE_WRITE``), then the loader;
- ``posix_fallocate`` first, then the loader;
- ``pwrite`` from a per-thread bounce buffer (tmpfs allocates without zeroing a page that
  is wholly overwritten, and no page-table fault is taken);
- ``sendfile`` from the file into the segment's fd (the kernel's own copy);
- ``MADV_HUGEPAGE`` on the mapping, and a ``memfd_create(MFD_HUGETLB)`` segment: used only
  where the kernel allows huge pages for shared memory; the report says whether it did.

Also the two floors, same run: reading the file into memory already faulted (page cache
copy only) and faulting a fresh segment without reading (allocation and zeroing only).
CPU seconds (user + system, all threads) are reported beside wall time: on a machine with
few cores that others share, that is what decides whether more threads can help.

    python bench/host_fill.py --gb 1 --reps 3
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from report import write_report  # bench/report.py: bench/ is first on sys.path

HERE = Path(__file__).resolve().parent
MADV_POPULATE_WRITE = 23  # Linux 5.14; not named by Python's mmap module
PAGE = mmap.PAGESIZE


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _sys() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


class Fill:
    """One fresh segment per run, filled by a method, checked, then removed."""

    def __init__(self, model: Path, threads: int) -> None:
        from warmpool.model.safetensors import parse_header
        from warmpool.pool.layout import plan_layout

        self.model = model
        self.threads = threads
        headers = []
        for path in sorted(model.glob("*.safetensors")):
            data = path.read_bytes()[:8]
            n = int.from_bytes(data, "little")
            with open(path, "rb") as f:
                head = f.read(8 + n)
            headers.append((path.name, parse_header(head, file=path.name,
                                                    file_size=path.stat().st_size)))
        self.layout = plan_layout("0" * 64, headers)
        self.size = self.layout.total_bytes
        self.arena: Any = None

    # ------------------------------------------------------------------ the segment
    def fresh(self, hugetlb: bool = False) -> tuple[int, mmap.mmap, str]:
        if hugetlb:
            fd = os.memfd_create("warmpool-bench", os.MFD_CLOEXEC | os.MFD_HUGETLB)
            path = ""
            size = -(-self.size // (2 << 20)) * (2 << 20)
        else:
            path = f"/dev/shm/warmpool-bench-fill-{os.getpid()}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            size = self.size
        os.ftruncate(fd, size)
        return fd, mmap.mmap(fd, size), path

    def jobs(self) -> list[Any]:
        from warmpool.loading.pread import plan_jobs

        return plan_jobs(self.layout)

    def pool(self, fn: Callable[[Any], None], items: list[Any]) -> None:
        with ThreadPoolExecutor(self.threads) as ex:
            for _ in ex.map(fn, items):
                pass

    # ------------------------------------------------------------------ the methods
    def loader(self, fd: int, m: mmap.mmap) -> None:
        """warmpool's pread loader, unchanged."""
        import torch

        from warmpool.loading.pread import stream_pread

        stream_pread(self.model, self.layout, torch.frombuffer(m, dtype=torch.uint8),
                     progress=lambda n: None)

    def prefault_then_loader(self, fd: int, m: mmap.mmap) -> None:
        step = -(-self.size // self.threads // PAGE) * PAGE
        self.pool(lambda s: m.madvise(MADV_POPULATE_WRITE, s, min(step, self.size - s)),
                  list(range(0, self.size, step)))
        self.loader(fd, m)

    def fallocate_then_loader(self, fd: int, m: mmap.mmap) -> None:
        os.posix_fallocate(fd, 0, self.size)
        self.loader(fd, m)

    def hugepage_then_loader(self, fd: int, m: mmap.mmap) -> None:
        m.madvise(mmap.MADV_HUGEPAGE)
        self.loader(fd, m)

    def pwrite(self, fd: int, m: mmap.mmap) -> None:
        local = threading.local()
        files = {f: os.open(self.model / f, os.O_RDONLY) for f in self.layout.files}
        try:
            def one(job: Any) -> None:
                buf = getattr(local, "buf", None)
                if buf is None or len(buf) < job.nbytes:
                    buf = local.buf = bytearray(max(job.nbytes, 32 << 20))
                view = memoryview(buf)[:job.nbytes]
                _read_all(files[job.file], view, job.start)
                at = 0
                for p in job.pieces:
                    _write_all(fd, view[at:at + p.nbytes], p.dst)
                    at += p.nbytes
            self.pool(one, self.jobs())
        finally:
            for f in files.values():
                os.close(f)

    def sendfile(self, fd: int, m: mmap.mmap) -> None:
        files = {f: os.open(self.model / f, os.O_RDONLY) for f in self.layout.files}
        try:
            def one(job: Any) -> None:
                out = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)  # own file position
                try:
                    for p in job.pieces:
                        os.lseek(out, p.dst, os.SEEK_SET)
                        done = 0
                        while done < p.nbytes:
                            done += os.sendfile(out, files[job.file], p.src + done,
                                                p.nbytes - done)
                finally:
                    os.close(out)
            self.pool(one, self.jobs())
        finally:
            for f in files.values():
                os.close(f)

    def floor_fault_only(self, fd: int, m: mmap.mmap) -> None:
        step = -(-self.size // self.threads // PAGE) * PAGE
        self.pool(lambda s: m.madvise(MADV_POPULATE_WRITE, s, min(step, self.size - s)),
                  list(range(0, self.size, step)))

    # ------------------------------------------------------------------ the arena
    def arena_reused(self) -> dict[str, Any]:
        """warmpool's host arena as a fill uses it: chunks a previous model filled and
        left faulted (the first call fills them once, untimed), mapped with MAP_POPULATE,
        the same loader, then the publish's clearing of padding and tail; timed from the
        allocation."""
        from warmpool.pool.host import HostTier

        if self.arena is None:
            self.arena = HostTier(Path(tempfile.mkdtemp(prefix="warmpool-fill-arena-")),
                                  64 << 20)
            self._arena_fill()  # the model before: its pages are what the next one reuses
        return self._arena_fill()

    def _arena_fill(self) -> dict[str, Any]:
        from warmpool.loading.pread import stream_pread
        from warmpool.pool.arena import zero_gaps

        host = self.arena
        cpu, sys_s, t = _cpu(), _sys(), time.perf_counter()
        segment = host.create("0" * 64, self.size)
        stream_pread(self.model, self.layout, segment.buffer, progress=lambda n: None)
        zero_gaps(segment.whole, self.layout)
        wall = time.perf_counter() - t
        cpu, sys_s = _cpu() - cpu, _sys() - sys_s
        ok = self.check(memoryview(segment.buffer.numpy()))
        segment.release()
        host.arena.settle(segment.grant)
        return {"s": wall, "cpu_s": cpu, "sys_s": sys_s, "bytes_ok": ok,
                "shmem_huge_kb": _shmem_huge_kb()}

    # ------------------------------------------------------------------ one run
    def run(self, name: str, hugetlb: bool = False, prefaulted: bool = False) -> dict[str, Any]:
        if name == "arena_reused":
            return self.arena_reused()
        try:
            fd, m, path = self.fresh(hugetlb)
        except OSError as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        try:
            if prefaulted:  # the page-cache floor: the segment is faulted before the clock
                self.floor_fault_only(fd, m)
            method = getattr(self, "loader" if prefaulted or hugetlb else name)
            cpu, sys_s, t = _cpu(), _sys(), time.perf_counter()
            method(fd, m)
            wall = time.perf_counter() - t
            cpu, sys_s = _cpu() - cpu, _sys() - sys_s
            ok = None if name == "floor_fault_only" else self.check(m)
            huge = _shmem_huge_kb()
            return {"s": wall, "cpu_s": cpu, "sys_s": sys_s, "bytes_ok": ok,
                    "shmem_huge_kb": huge}
        except OSError as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            m.close()
            os.close(fd)
            if path:
                os.unlink(path)

    def check(self, m: mmap.mmap | memoryview) -> bool:
        """Every tensor's bytes equal the file's (the loader's contract)."""
        view = memoryview(m)
        try:
            for file in self.layout.files:
                with open(self.model / file, "rb") as f:
                    data = f.read()
                for s in self.layout.slots_of(file):
                    if view[s.offset:s.offset + s.nbytes] != data[s.file_offset:
                                                                   s.file_offset + s.nbytes]:
                        return False
            return True
        finally:
            view.release()


def _read_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError("file ended early")
        done += n


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)


def _shmem_huge_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("ShmemHugePages:"):
            return int(line.split()[1])
    return 0


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        return f"unreadable ({exc.strerror})"


METHODS = [
    ("loader", "warmpool pread loader (today)", {}),
    ("prefault_then_loader", "pre-fault in threads (MADV_POPULATE_WRITE), then loader", {}),
    ("fallocate_then_loader", "posix_fallocate, then loader", {}),
    ("hugepage_then_loader", "MADV_HUGEPAGE on the mapping, then loader", {}),
    ("hugetlb", "memfd MFD_HUGETLB segment, then loader", {"hugetlb": True}),
    ("pwrite", "pwrite from per-thread bounce buffers (no mapping faults)", {}),
    ("sendfile", "sendfile file -> segment fd, per thread", {}),
    ("floor_fault_only", "floor: fault + zero a fresh segment only (no read)", {}),
    ("floor_copy_only", "floor: loader into an already-faulted segment", {"prefaulted": True}),
    ("arena_reused", "host arena: chunks an evicted model left faulted (warmpool, "
     "host_arena: true)", {}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: the loader's default")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--name", default=socket.gethostname() or "dev")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from s3_rate import write_model  # type: ignore[import-not-found]

    from warmpool.loading.pread import THREADS

    threads = args.threads or THREADS
    work = Path(tempfile.mkdtemp(prefix="warmpool-fill-", dir="/var/tmp"))
    load_start = os.getloadavg()[0]
    fill = None
    try:
        write_model(work / "model", int(args.gb * 1e9))
        fill = Fill(work / "model", threads)
        for path in (work / "model").glob("*.safetensors"):  # into the page cache
            with open(path, "rb") as f:
                while f.read(16 << 20):
                    pass
        samples: dict[str, list[dict[str, Any]]] = {m: [] for m, _, _ in METHODS}
        for rep in range(args.reps):
            for method, label, kw in METHODS:
                out = fill.run(method, **kw)
                samples[method].append(out)
                print(f"[{rep + 1}/{args.reps}] {label}: "
                      + (out["error"] if "error" in out else
                         f"{out['s']:.3f} s, cpu {out['cpu_s']:.2f} s (sys {out['sys_s']:.2f}),"
                         f" ok {out['bytes_ok']}"), flush=True)
        size = fill.size
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if fill is not None and fill.arena is not None:
            fill.arena.remove_all()
            shutil.rmtree(fill.arena.runtime_dir, ignore_errors=True)
    report(args, samples, size, threads, load_start)


def report(args: argparse.Namespace, samples: dict[str, list[dict[str, Any]]], size: int,
           threads: int, load_start: float) -> None:
    rows = []
    base = statistics.median(s["s"] for s in samples["loader"] if "s" in s)
    for method, label, _ in METHODS:
        good = [s for s in samples[method] if "s" in s]
        if not good:
            rows.append({"method": method, "label": label, "error": samples[method][0]["error"]})
            continue
        med = statistics.median(s["s"] for s in good)
        rows.append({"method": method, "label": label, "median_s": med,
                     "min_s": min(s["s"] for s in good), "max_s": max(s["s"] for s in good),
                     "gbps": size / med / 1e9, "speedup": base / med,
                     "cpu_s": statistics.median(s["cpu_s"] for s in good),
                     "sys_s": statistics.median(s["sys_s"] for s in good),
                     "bytes_ok": all(s["bytes_ok"] is not False for s in good),
                     "shmem_huge_kb": max(s["shmem_huge_kb"] for s in good),
                     "samples": good})
    lines = [f"# filling a fresh host-tier segment from the page cache — {args.name}", "",
             f"Run {time.strftime('%Y-%m-%dT%H:%M:%S%z')} by `python bench/host_fill.py --gb "
             f"{args.gb} --reps {args.reps}`: {size / 1e9:.2f} GB, {threads} threads, "
             f"{os.cpu_count()} CPUs (load average {load_start:.1f} at start, "
             f"{os.getloadavg()[0]:.1f} at end: shared with other work, read ratios). "
             f"Kernel {os.uname().release}; shmem_enabled: "
             f"`{_read('/sys/kernel/mm/transparent_hugepage/shmem_enabled')}`; "
             f"hugepages-2048kB/shmem_enabled: "
             f"`{_read('/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled')}`;"
             f" nr_hugepages: `{_read('/proc/sys/vm/nr_hugepages')}`.", "",
             "| method | median | min-max | GB/s | vs today | CPU s (sys) | bytes ok | "
             "ShmemHugePages |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | not possible here: {r['error']} | | | | | | |")
            continue
        ok = "—" if r["method"] == "floor_fault_only" else ("ok" if r["bytes_ok"] else "WRONG")
        lines.append(f"| {r['label']} | {r['median_s']:.3f} s | {r['min_s']:.3f}-"
                     f"{r['max_s']:.3f} s | {r['gbps']:.2f} | {r['speedup']:.2f}x | "
                     f"{r['cpu_s']:.2f} ({r['sys_s']:.2f}) | {ok} | {r['shmem_huge_kb']} kB |")
    write_report(args.out, f"host_fill-{args.name}", lines, rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
