"""`make bench` / `python -m bench [name ...]`: run the benchmarks and record them.

Each ``bench/bench_<name>.py`` defines ``main() -> str``: it prints its figures as it goes and
returns a Markdown section (a table, with the ratios the targets are stated in). This runner
replaces that benchmark's section in ``docs/benchmarks.md`` (between ``<!-- bench:<name> -->``
markers), adding the exact command and the date, and leaves the other sections as they were.
"""

from __future__ import annotations

import datetime
import importlib
import platform
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\nWritten by `make bench` (`python -m bench [name ...]`); each section says the command that\n"
    "produced it. Targets are checked as ratios measured in the same run, never as wall-clock limits.\n"
)


def _available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in (ROOT / "bench").glob("bench_*.py"))


def _record(name: str, body: str) -> None:
    text = DOC.read_text() if DOC.exists() else HEADER
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    stamp = datetime.date.today().isoformat()
    section = (
        f"<!-- bench:{name} -->\n{body.strip()}\n\n"
        f"_Command: `python -m bench {name}` on {stamp} ({machine})._\n<!-- /bench:{name} -->"
    )
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def main(names: list[str]) -> None:
    names = names or _available()
    unknown = sorted(set(names) - set(_available()))
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; available: {_available()}")
    for name in names:
        print(f"== bench {name}", flush=True)
        body = importlib.import_module(f"bench.bench_{name}").main()
        _record(name, body)
        print(f"== recorded in {DOC.relative_to(ROOT)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
