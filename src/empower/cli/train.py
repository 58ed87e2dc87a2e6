"""`empower train ...`: fine-tune an assistant on a data folder, and merge a LoRA adapter.

empower train --data runs/data/empower --base smollm2-135m --out runs/models/empower [--full]
accelerate launch -m empower train --data ... --out ...     # several devices, same flags
empower train merge runs/models/empower --out runs/models/empower-merged
"""

from __future__ import annotations

from pathlib import Path

import typer
from accelerate import PartialState

from empower.cli import app
from empower.configs import config_group
from empower.train import TrainConfig, merge_adapter, train


def _train(config: TrainConfig) -> None:
    """Fine-tune a base model on prompt/completion pairs (LoRA by default); loss on completions only."""
    out = train(config)
    if PartialState().is_main_process:  # under accelerate/torchrun, every rank returns here
        typer.echo(f"model saved in {out}")


train_app = config_group(app, TrainConfig, "train", _train)


@train_app.command("merge")
def merge(
    src: Path = typer.Argument(..., help="output folder of `empower train` holding a LoRA adapter"),
    out: Path = typer.Option(..., "--out", help="folder for the merged full model"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out"),
    dtype: str = typer.Option(
        "float32", "--dtype", help="saved weights: float32, bfloat16 (GPUs; half the size) or float16"
    ),
):
    """Merge a LoRA adapter into its base model's weights (a standalone model folder)."""
    typer.echo(f"merged model saved in {merge_adapter(src, out, overwrite=overwrite, dtype=dtype)}")
