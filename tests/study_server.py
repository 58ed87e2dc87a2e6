"""Helpers for the study tests: a toy task file, a study database, and a real `empower study serve`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

EMPOWER = [sys.executable, "-m", "empower"]

# HumanEval-format toy tasks; the blank line before the closing quotes keeps each doctest's
# expected output on one line, so it becomes a public test for the run button.
TOY_TASKS = [
    {
        "task_id": "toy/double",
        "prompt": 'def double(x):\n    """Return twice x.\n\n    >>> double(2)\n    4\n\n    """\n',
        "canonical_solution": "    return 2 * x\n",
        "test": "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-3) == -6\n",
        "entry_point": "double",
    },
    {
        "task_id": "toy/add",
        "prompt": 'def add(a, b):\n    """Return the sum of a and b.\n\n    >>> add(1, 2)\n    3\n\n    """\n',
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
        "entry_point": "add",
    },
]
SOLUTIONS = {t["task_id"]: t["prompt"] + t["canonical_solution"] for t in TOY_TASKS}


def write_tasks(folder: Path) -> Path:
    path = folder / "toy_tasks.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in TOY_TASKS))
    return path


def create_study(folder: Path, participants: int = 1) -> Path:
    """`empower study create` with two tiny-model arms; returns the database path."""
    db = folder / "study.sqlite"
    subprocess.run(
        [
            *EMPOWER,
            "study",
            "create",
            "--assistants",
            "A=tiny-random:model",
            "--assistants",
            "B=tiny-random:base-n:4",
            "--tasks",
            "humaneval",
            "--tasks-path",
            str(write_tasks(folder)),
            "--db",
            str(db),
            "--participants",
            str(participants),
            "--max-new-tokens",
            "6",
            "--name",
            "toy study",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return db


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StudyServer:
    """A real `empower study serve` process on 127.0.0.1 (stopped by the caller); waits for the models
    unless ``assistants=False`` (tests that never ask for suggestions)."""

    def __init__(self, db: Path, port: int | None = None, log: Path | None = None, assistants: bool = True):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or db.with_suffix(".serve.log")
        self.process = subprocess.Popen(
            [*EMPOWER, "study", "serve", "--db", str(db), "--port", str(self.port), "--debounce-ms", "150"],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )
        self._wait_ready(assistants)

    def _wait_ready(self, assistants: bool) -> None:
        # Readiness, not a time limit on the test: the loop ends as soon as the server answers or dies.
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"study server exited with {self.process.returncode}:\n{self.log.read_text()}"
                )
            try:
                health = httpx.get(self.url + "/health").json()
                if health["assistant_error"]:
                    raise RuntimeError(f"assistants failed to load: {health['assistant_error']}")
                if not assistants or health["assistants_loaded"] == health["assistants"]:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: the harshest restart (no shutdown hooks run)."""
        self.process.kill()
        self.process.wait()
