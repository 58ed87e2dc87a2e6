"""`empower ...`: the command line, a thin layer over the stage functions.

Each command group lives in its own module here and registers on :data:`app`; the work itself
is done by the library modules (``empower.labeling``, ``empower.train``, ...), which the Python API
calls the same way.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import typer
from rich.console import Console

app = typer.Typer(
    name="empower",
    help="Train and evaluate code assistants that write the predictable parts and stop at decisions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

# Command groups register themselves on import, in pipeline order (so `empower --help` reads as the
# pipeline does); ruff's import sorting is switched off for this file in pyproject.toml.
from empower.cli import models as _models  # noqa: E402,F401
from empower.cli import data as _data  # noqa: E402,F401
from empower.cli import train as _train  # noqa: E402,F401
from empower.cli import tasks as _tasks  # noqa: E402,F401
from empower.cli import eval as _eval  # noqa: E402,F401
from empower.cli import reproduce as _reproduce  # noqa: E402,F401
from empower.cli import serve as _serve  # noqa: E402,F401
from empower.cli import study as _study  # noqa: E402,F401


def _unwind_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors (bad paths, values, records, unreachable servers) print one line, exit 2.

    SIGTERM (``kill``, ``timeout``, a cluster scheduler) unwinds like Ctrl-C, so a stage's cleanup
    runs and the grid records the time its finished stages took; without this Python just dies.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _unwind_on_sigterm)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[logging.StreamHandler()])
    try:
        app(args=argv, standalone_mode=True)
    except (ValueError, FileNotFoundError, PermissionError, KeyError, ConnectionError, TimeoutError) as err:
        console.print(f"[bold red]error:[/] {err}", markup=True, highlight=False)
        sys.exit(2)
