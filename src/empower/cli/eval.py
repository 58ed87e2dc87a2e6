"""`empower eval ...`: run an evaluation, or summarize saved runs.

    empower eval --assistant smollm2-135m --policy base-n --n 10 --human reference --tasks humaneval
    empower eval summary runs/eval/*                    # table with 95% CIs
    empower eval summary runs/eval/* --baseline runs/eval/base-ref   # plus paired tests
    empower eval agree runs/eval/base-llm --human reference --human-tolerance 0.25   # humans agree?
    empower eval panel --assistant smollm2-135m --policy threshold --eta 2 --limit 40   # every human

``empower eval FLAGS`` is short for ``empower eval run FLAGS``; the flags come from
:class:`empower.env.EvalConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from typer.core import TyperGroup

from empower import metrics, panel
from empower.cli import app
from empower.configs import config_command, option, part_of
from empower.env import EvalConfig, run_eval
from empower.humans import HumanConfig, build_human
from empower.metrics import MetricsConfig


class _RunByDefault(TyperGroup):
    """A group whose first argument, when it names no subcommand, starts the default `run` command."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    cls=_RunByDefault,
    no_args_is_help=True,
    help="Evaluate assistants with simulated humans; summarize saved runs.",
)
app.add_typer(eval_app, name="eval")


@dataclass
class SummaryConfig:
    """Which run folders to tabulate (and compare against a baseline)."""

    runs: list[Path] = option(help="run folders written by `empower eval`")
    baseline: Path | None = option(None, "run folder to compare every other run with (paired tests)")
    write: bool = option(True, "also rewrite each run's summary.json from its traces")


@config_command(eval_app, SummaryConfig, "summary", positional=("runs",))
def summary(config: SummaryConfig) -> None:
    """Table of runs: Pass@1, acceptance, DPR with 95% CIs, tokens read/written, suggestions, lengths."""
    console = Console()
    runs = [r for r in config.runs if r != config.baseline]
    if config.write:
        for folder in [*runs, *([config.baseline] if config.baseline else [])]:
            metrics.write_summary(folder)
    summaries = [metrics.summarize_run(r) for r in ([config.baseline] if config.baseline else []) + runs]
    console.print(metrics.summary_table(summaries))
    for s in summaries:
        if s.excluded:
            console.print(
                f"{s.run}: {s.excluded} task(s) excluded (no reference, or it fails its own tests; see config.json)"
            )
    if config.baseline:
        console.print(metrics.comparison_table([metrics.compare_runs(r, config.baseline) for r in runs]))


@dataclass
class AgreeConfig(HumanConfig, MetricsConfig):
    """Recorded runs, and the candidate human (the human flags) to put before their suggestions."""

    runs: list[Path] = option(
        help="run folders written by `empower eval` (the recorded human's decisions)", default_factory=list
    )

    def __post_init__(self):
        HumanConfig.__post_init__(self)
        MetricsConfig.__post_init__(self)
        if not self.runs:
            raise ValueError("runs: name at least one run folder")


@config_command(eval_app, AgreeConfig, "agree", positional=("runs",))
def agree(config: AgreeConfig) -> None:
    """How often a human (the --human flags) decides as the runs' recorded human did on the same
    suggestions: agreement, Cohen's kappa with a 95% CI over tasks, both acceptance rates, and both
    by suggestion length."""
    human = build_human(part_of(config, HumanConfig))
    rows = [
        panel.agreement(
            metrics.read_traces(run / "traces.jsonl"), panel.run_tasks(run), human,
            part_of(config, MetricsConfig),
        )
        for run in config.runs
    ]  # fmt: skip
    console = Console()
    console.print(panel.agreement_table(rows))
    console.print(panel.length_table(rows))


@config_command(eval_app, panel.PanelConfig, "panel")
def panel_run(config: panel.PanelConfig) -> None:
    """Play one assistant (the assistant flags) with every human of a panel on the same tasks; print
    Pass@1, DPR, acceptance, characters deleted, and each human's agreement with the yardstick (the LLM
    human) on its suggestions. Rerun to resume."""
    rows = panel.run_panel(config)
    console = Console()
    console.print(panel.panel_table(rows, config.yardstick))
    compared = [r.agreement for r in rows if r.agreement]
    if compared:
        console.print(panel.agreement_table(compared))
        console.print(panel.length_table(compared))
    typer.echo(f"panel table: {panel.write_panel(rows, config.out, config.yardstick)}")


@config_command(eval_app, EvalConfig, "run")
def run(config: EvalConfig) -> None:
    """Play one episode per task with an assistant and a simulated human; write the run folder."""
    try:
        out = run_eval(config)
    except (ConnectionError, KeyboardInterrupt) as err:  # e.g. humans.HumanServerError after its retries
        traces = config.out / "traces.jsonl"
        done = len(metrics.read_traces(traces)) if traces.is_file() else 0
        Console(stderr=True).print(
            f"[bold red]stopped:[/] {err or type(err).__name__}\n{done} finished episode(s) are saved in "
            f"{config.out}; continue with the same command and --resume"
        )
        raise typer.Exit(2) from err
    Console().print(metrics.summary_table([metrics.summarize_run(out)]))
    typer.echo(f"run folder: {out}")
