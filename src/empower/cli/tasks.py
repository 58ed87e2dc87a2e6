"""`empower tasks check`: load a problem set and run its reference solutions in the sandbox.

    empower tasks check --tasks humaneval --tasks-path mine.jsonl
    empower tasks check --tasks mbpp --tasks-path mbpp.jsonl --sandbox-workers 4

Bad records fail with the file and line; tasks whose tests fail on their own reference are listed
(an evaluation excludes them). The flags come from :class:`empower.sandbox.TaskCheckConfig`.
"""

from __future__ import annotations

from collections import Counter

import typer
from rich.console import Console
from rich.table import Table

from empower.cli import app
from empower.configs import config_command
from empower.sandbox import TaskCheckConfig, check_tasks

tasks_app = typer.Typer(no_args_is_help=True, help="Check problem sets (formats, reference solutions).")
app.add_typer(tasks_app, name="tasks")


@config_command(tasks_app, TaskCheckConfig, "check")
def check(config: TaskCheckConfig) -> None:
    """Load a problem set and run every reference solution against its tests in the sandbox."""
    tasks, good, excluded = check_tasks(config)
    console = Console()
    kinds = Counter(t.test_type.value for t in tasks)
    with_reference = sum(t.reference is not None for t in tasks)
    console.print(
        f"{len(tasks)} tasks ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}); "
        f"{with_reference} with a reference, {with_reference - len(excluded)} of them pass their tests; "
        f"{len(excluded)} excluded."
    )
    if excluded:
        table = Table("task", "status", "message")
        for task, result in excluded:
            table.add_row(task.task_id, result.status.value, result.message[:120])
        console.print(table)
