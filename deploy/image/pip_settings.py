"""The host's pip settings, for an image build: where pip finds packages, its CA bundle,
its constraints (from its config files and ``PIP_*`` variables alike).

    python deploy/image/pip_settings.py build/pip.conf   # prints the -v mounts

Writes them as one pip config file (mode 0600; the build reads it as a secret, so an
index URL with a password never lands in a layer or the image's history) and prints a
read-only volume for each local path the settings name (a find-links directory, a
``file://`` index, the CA bundle, a constraints file), so that the build sees the same
files at the same paths. Behind a proxy or offline, the image then builds as the host's
own ``pip install`` would.
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path


def settings() -> dict[str, dict[str, str]]:
    """``pip config list``: ``section.key='value'`` lines, ``:env:`` for variables."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                            capture_output=True, text=True, check=True).stdout
    out: dict[str, dict[str, str]] = {}
    for line in listed.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        section, _, name = key.rpartition(".")
        if section in ("", ":env:"):
            section = "global"
        out.setdefault(section, {})[name] = value.strip().strip("'\"")
    return out


def local_paths(values: dict[str, dict[str, str]]) -> list[str]:
    found = set()
    for section in values.values():
        for value in section.values():
            for token in value.split():
                path = token.removeprefix("file://")
                if not path.startswith("/") or not Path(path).exists():
                    continue
                if Path(path).name == "simple":  # a local index: its files lie beside it
                    path = str(Path(path).parent)
                found.add(str(Path(path).resolve()) if Path(path).is_file() else path)
    return sorted(found)


def main() -> None:
    target = Path(sys.argv[1])
    values = settings()
    config = configparser.ConfigParser(interpolation=None)
    config.read_dict(values)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        config.write(f)
    print(" ".join(f"-v {p}:{p}:ro" for p in local_paths(values)))


if __name__ == "__main__":
    main()
