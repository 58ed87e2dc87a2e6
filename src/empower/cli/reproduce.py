"""`empower reproduce`, `empower calibrate`, `empower report`: the experiment grid and its report.

empower reproduce --config configs/demo.yaml           # data -> train -> eval -> report (resumable)
empower reproduce --config configs/paper-gpu.yaml --check  # resolve everything and print the plan first
empower calibrate --config configs/cpu-study.yaml      # only the eta sweep on validation tasks
empower report runs/demo --out runs/demo/report        # Markdown + HTML + PNG from saved runs
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

import typer

from empower.cli import app, console
from empower.configs import config_command, load_config
from empower.report import ReportConfig, build_report

_CONFIG = typer.Option(..., "--config", help="YAML experiment (see configs/*.yaml and docs/reproduce.md)")
_OUT = typer.Option(None, "--out", help="run folder; overrides the config's out")


def _load(config: Path, out: Path | None):
    from empower.reproduce import ReproduceConfig

    loaded = load_config(ReproduceConfig, config)
    return dataclasses.replace(loaded, out=out) if out is not None else loaded


@app.command("reproduce")
def reproduce(
    config: Path = _CONFIG,
    out: Path | None = _OUT,
    check: bool = typer.Option(
        False,
        "--check",
        help="resolve every model, server, task set and the corpus, print the plan; run nothing",
    ),
):
    """Run the paper's grid (Empower, SFT-10/20, SFT-RAND, Base, Base-10/20, Threshold); rerun to resume."""
    if check:
        from empower.preflight import report

        if not report(_load(config, out)):
            raise typer.Exit(1)
        return
    from empower.reproduce import reproduce as run

    run(_load(config, out), command=shlex.join(["empower", *sys.argv[1:]]))


@app.command("calibrate")
def calibrate(config: Path = _CONFIG, out: Path | None = _OUT):
    """Choose eta on validation tasks by DPR (the config's calibration section) and report the sweep."""
    from empower.calibration import calibrate_only

    eta = calibrate_only(_load(config, out))
    console.print(f"recommended eta: {eta:g} bits")


@config_command(app, ReportConfig, "report", positional=("runs",))
def report(config: ReportConfig) -> None:
    """Tables (Pass@1, acceptance, DPR with 95% CIs), paired tests and figures from saved runs."""
    path = build_report(config.runs, config.out)
    typer.echo(f"report: {path}\nhtml:   {path.with_suffix('.html')}")
