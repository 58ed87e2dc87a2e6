"""The lock files: write them from a clean environment, and check an environment against them.

    python .ci/pins.py write [--report pip-report.json] > constraints.txt   # in the clean venv
    python .ci/pins.py check constraints.txt [--complete]                   # in the venv to check

``write`` lists every installed distribution at its exact version (``pip freeze``, as importlib
sees it), plus the packages a ``pip install --dry-run --report`` would add (llama.cpp's server, so
that locking does not build it). torch and its CUDA companions are left out: the Makefile pins
torch itself (``TORCH``), and a GPU machine swaps the build. ``check`` fails when an installed
distribution's version differs from its pin or has none; with ``--complete`` also when a pinned
distribution is missing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from importlib import metadata

UNPINNED = re.compile(r"^(empower|torch|triton|nvidia-.*|pip|setuptools|wheel)$")


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and not UNPINNED.match(normal(name)):
            found[normal(name)] = dist.version
    return found


def read_lock(path: str) -> dict[str, str]:
    pins = {}
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, version = line.partition("==")
            if not sep:
                sys.exit(f"{path}:{number}: expected NAME==VERSION, got {line!r}")
            pins[normal(name)] = version.strip()
    return pins


def write(report: str | None) -> None:
    pins = installed()
    if report:
        with open(report) as handle:
            for item in json.load(handle)["install"]:
                name = normal(item["metadata"]["name"])
                if not UNPINNED.match(name):
                    pins[name] = item["metadata"]["version"]
    print("# Exact versions CI tested; written by `make lock` from a clean environment (see README).")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")


def check(path: str, complete: bool) -> int:
    pins, have = read_lock(path), installed()
    problems = [f"{name} {version} is installed, the lock says {pins[name]}"
                for name, version in sorted(have.items()) if name in pins and pins[name] != version]
    problems += [f"{name} {version} is installed but not in the lock" for name, version in sorted(have.items())
                 if name not in pins]
    if complete:
        problems += [f"{name}=={pins[name]} is in the lock but not installed" for name in sorted(pins) if name not in have]
    for problem in problems:
        print(f"{path}: {problem}", file=sys.stderr)
    if not problems:
        print(f"{path}: all {len(have)} installed distributions match their pins")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    writer = commands.add_parser("write", help="print the lock of this environment")
    writer.add_argument("--report", help="a `pip install --dry-run --report` file whose packages to add")
    checker = commands.add_parser("check", help="compare this environment with a lock file")
    checker.add_argument("lock")
    checker.add_argument("--complete", action="store_true", help="every pinned distribution must be installed")
    args = parser.parse_args()
    if args.command == "write":
        write(args.report)
        return 0
    return check(args.lock, args.complete)


if __name__ == "__main__":
    sys.exit(main())
