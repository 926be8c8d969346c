"""The wheels a lent GPU lacks, fetched here for the device call (``make gpu-wheels``).

The device has no network and its own Python (3.12, manylinux x86-64) with torch, numpy and
transformers. ``bench/gpu-requirements.txt`` names what the GPU check needs beyond those;
this fetches each at the version this machine's suite tested (else the newest that fits),
with its dependencies, into ``.gpu-wheels/`` (ignored by git), and checks that the wheels
and the tree fit in what one device call may carry.

runai-model-streamer is fetched without its dependencies: it asks for torch, which would
bring several GB of CUDA wheels that the device already has.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "bench" / "gpu-requirements.txt"
CARRY_LIMIT = 64 * 2**20  # one device call: the tree and the wheels together
#: The device's Python and the platform of its wheels.
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
          "--abi", "abi3", "--abi", "none", "--only-binary=:all:",
          *(arg for tag in ("manylinux_2_30_x86_64", "manylinux_2_28_x86_64",
                            "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")
            for arg in ("--platform", tag))]
#: Already on the device (its torch build and what transformers needs): never carried.
ON_DEVICE = {"torch", "numpy", "transformers", "triton", "sympy", "mpmath", "networkx",
             "jinja2", "markupsafe", "filelock", "fsspec", "setuptools"}
#: Fetched without dependencies (see the module docstring).
NO_DEPS = {"runai-model-streamer"}


def requirements() -> list[Requirement]:
    return [Requirement(line.split("#")[0].strip()) for line in REQUIREMENTS.read_text()
            .splitlines() if line.split("#")[0].strip()]


def pinned(req: Requirement) -> str:
    """``name==version`` as installed here (what the suite ran), when that satisfies the
    requirement; else the requirement as written."""
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return str(req)
    return f"{req.name}=={version}" if req.specifier.contains(version, prereleases=True) \
        else str(req)


def canonical(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower().replace("_", "-")


def download(dest: Path) -> None:
    pip = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
           "-d", str(dest), *TARGET]
    reqs = requirements()
    plain = [pinned(r) for r in reqs if r.name not in NO_DEPS]
    alone = [pinned(r) for r in reqs if r.name in NO_DEPS]
    subprocess.run([*pip, *plain], check=True)
    subprocess.run([*pip, "--no-deps", *alone, "humanize"], check=True)


def tree_bytes() -> int:
    """The tracked files: what a device call carries of the repository."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    return sum((ROOT / n).stat().st_size for n in names if n and (ROOT / n).is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".gpu-wheels")
    args = parser.parse_args()
    if args.dest.exists():
        shutil.rmtree(args.dest)
    args.dest.mkdir(parents=True)
    download(args.dest)
    for wheel in args.dest.glob("*.whl"):
        if canonical(wheel) in ON_DEVICE or canonical(wheel).startswith("nvidia-"):
            wheel.unlink()  # the device has its own; a second copy would shadow it
    wheels = sorted(args.dest.glob("*.whl"), key=lambda w: w.stat().st_size)
    total = sum(w.stat().st_size for w in wheels)
    tree = tree_bytes()
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{len(wheels)} wheels {total / 2**20:.1f} MiB + tree {tree / 2**20:.1f} MiB = "
          f"{(total + tree) / 2**20:.1f} MiB of {CARRY_LIMIT / 2**20:.0f} MiB")
    if total + tree > CARRY_LIMIT:
        raise SystemExit("the wheels and the tree do not fit in one device call: "
                         "drop a requirement or carry it in a second call")


if __name__ == "__main__":
    main()
