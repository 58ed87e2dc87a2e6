"""`empower data ...`: build training pairs from a corpus (Empower, SFT-N, SFT-RAND) and inspect them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import typer

from empower.cli import app
from empower.configs import config_command, option
from empower.labeling import DataConfig, build_data, data_stats, plot_lengths

data_app = typer.Typer(
    help="Build and inspect training data (prompt/completion pairs).", no_args_is_help=True
)
app.add_typer(data_app, name="data")


@dataclass
class StatsConfig:
    folder: Path = option(help="a data folder written by `empower data build`")
    png: Path | None = option(None, "where to save the histogram (default: FOLDER/completion_lengths.png)")


@config_command(data_app, DataConfig, "build")
def build(config: DataConfig) -> None:
    """Score a corpus with the estimator and write training pairs to --out (resumable)."""
    out = build_data(config)
    typer.echo(data_stats(out).summary())


@config_command(data_app, StatsConfig, "stats", positional=("folder",))
def stats(config: StatsConfig) -> None:
    """Counts per method, share of empty completions and a completion-length histogram (text + PNG)."""
    result = data_stats(config.folder)
    typer.echo(result.summary())
    typer.echo(result.text_histogram())
    png = plot_lengths(result, config.png or Path(config.folder) / "completion_lengths.png")
    typer.echo(f"histogram: {png}")
