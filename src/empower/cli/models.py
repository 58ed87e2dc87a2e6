"""`empower models ...`: prepare and inspect the embedded models."""

from __future__ import annotations

import typer

from empower import models
from empower.cli import app

models_app = typer.Typer(help="Prepare and inspect models (embedded ones are converted once and cached).")
app.add_typer(models_app, name="models")


@models_app.command("prepare")
def prepare(names: list[str] = typer.Argument(None, help="embedded model names; default: smollm2-135m")):
    """Verify the embedded GGUF files and convert them into the local cache (done once)."""
    for name in names or [models.DEFAULT_MODEL]:
        typer.echo(f"{name}: {models.resolve(name)}")


@models_app.command("list")
def list_models():
    """The embedded model names and whether each is cached."""
    for name in [*models.EMBEDDED, models.TINY_MODEL]:
        folder = models.cache_dir() / "models" / name
        state = "cached" if (folder / "empower-model.json").exists() else "not converted yet"
        typer.echo(f"{name:22s} {state}")
