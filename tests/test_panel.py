"""The panel's evidence: replaying recorded suggestions before another human, and Cohen's kappa.

Run: .venv/bin/pytest tests/test_panel.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from empower import models
from empower.assistant import AssistantConfig, build_assistant
from empower.cli import main
from empower.env import EvalConfig, TokenCounter, run_episodes
from empower.humans import HumanConfig, ReferenceHuman, build_human
from empower.metrics import MetricsConfig
from empower.panel import agreement, cohen_kappa, run_tasks, shown_suggestions
from empower.tasks import load_tasks
from test_env import PROBLEMS, _write_tasks

METRICS = MetricsConfig(metrics_resamples=200)


@pytest.fixture(scope="module")
def counter_tokenizer():
    return models.load_tokenizer(models.DEFAULT_MODEL)


def test_cohen_kappa_of_the_textbook_table():
    """Wikipedia's example: 20 both yes, 5 and 10 split, 15 both no: kappa 0.4."""
    assert cohen_kappa(20, 5, 10, 15) == pytest.approx(0.4)
    assert cohen_kappa(7, 0, 0, 3) == pytest.approx(1.0)
    assert cohen_kappa(0, 5, 5, 0) == pytest.approx(-1.0)
    assert cohen_kappa(0, 0, 0, 9) == 1.0  # both always reject: chance agreement is certain, and met
    per_task = np.array([[1, 0], [0, 1], [0, 0], [1, 1]])  # summed over tasks: 1, 1, 0, 2
    assert cohen_kappa(*per_task) == pytest.approx(cohen_kappa(1, 1, 0, 2))


def trace(name: str, events: list[tuple[str, str]]) -> dict:
    prompt = PROBLEMS[name][0]
    program = prompt
    for kind, text in events:
        program = (
            program[: len(program) - len(text)]
            if kind == "deleted"
            else program + text * (kind != "suggested")
        )
    return {"task_id": f"toy/{name}", "human": "recorded", "program": program,
            "events": [{"kind": kind, "text": text} for kind, text in events]}  # fmt: skip


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    path = _write_tasks(tmp_path_factory.mktemp("tasks") / "toy.jsonl")
    return {t.task_id: t for t in load_tasks("humaneval", str(path))}, path


RECORDED = [
    # a near miss the recorded human took in, then repaired; an exact one it took; a wrong one it rejected
    trace("add", [("suggested", "    return a - b\n"), ("accepted", "    return a - b\n"), ("deleted", "- b\n"),
                  ("wrote", "+ b\n"), ("finished", "")]),
    trace("double", [("suggested", "    y = x * 2\n"), ("accepted", "    y = x * 2\n"), ("wrote", "    return y\n"),
                     ("finished", "")]),
    trace("greet", [("suggested", "    print(name)\n"), ("rejected", ""),
                    ("wrote", "    return 'Hello, ' + name + '!'\n"), ("finished", "")]),
]  # fmt: skip


def test_replaying_a_trace_shows_each_suggestion_in_the_program_it_was_shown_in(tasks):
    by_id, _ = tasks
    [shown] = shown_suggestions(RECORDED[0], by_id["toy/add"].prompt)
    assert (shown.state, shown.accepted) == (PROBLEMS["add"][0], True)
    with pytest.raises(ValueError, match="toy/add: replaying"):
        shown_suggestions(RECORDED[0] | {"program": "def other():\n"}, by_id["toy/add"].prompt)


def test_an_exact_human_disagrees_with_a_fallible_one_on_its_near_misses_only(tasks, counter_tokenizer):
    by_id, _ = tasks
    exact = ReferenceHuman(HumanConfig(human="reference"), counter_tokenizer)
    fallible = ReferenceHuman(HumanConfig(human="reference", human_tolerance=0.1), counter_tokenizer)
    found = agreement(RECORDED, by_id, exact, METRICS)
    assert (found.both, found.only_recorded, found.only_candidate, found.neither) == (1, 1, 0, 1)
    assert found.kappa.value == pytest.approx(0.4) and found.raw == pytest.approx(2 / 3)
    assert (found.acceptance, found.recorded_acceptance) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    # the three suggestions are 14, 16 and 17 characters long: all in the 11-20 bin
    assert [(b.label, b.shown, b.accepted, b.recorded) for b in found.by_length] == [
        ("1-10", 0, 0, 0),
        ("11-20", 3, 1, 2),
        ("21-40", 0, 0, 0),
        ("41-80", 0, 0, 0),
        ("81+", 0, 0, 0),
    ]
    same = agreement(RECORDED, by_id, fallible, METRICS)
    assert (same.raw, same.kappa.value) == (1.0, 1.0)


def test_a_human_agrees_with_its_own_recorded_run_on_every_suggestion(tasks, tiny, tiny_model_path, tmp_path):
    """A real run (tiny model's suggestions, a fallible repairing human): replayed, every program comes
    back and the same human decides every suggestion as it did."""
    by_id, path = tasks
    config = EvalConfig(assistant=tiny_model_path, policy="model", max_new_tokens=6, human="reference",
                        human_tolerance=0.5, human_repair=0.5, tasks="humaneval", tasks_path=str(path),
                        sim_max_rounds=6, sandbox_workers=2, out=tmp_path / "run")  # fmt: skip
    assistant = build_assistant(config.part(AssistantConfig), model=tiny[0], tokenizer=tiny[1])
    human = build_human(config.part(HumanConfig))
    traces = []
    run_episodes(list(by_id.values()), assistant, human, config, TokenCounter(config.sim_count_tokenizer),
                 traces.append)  # fmt: skip
    found = agreement(traces, by_id, human, METRICS)
    assert found.decisions == sum(t["suggestions"] for t in traces) > 0
    assert (
        found.raw == 1.0 and found.recorded_acceptance == sum(t["accepted"] for t in traces) / found.decisions
    )


def test_the_agree_command_prints_the_table_for_run_folders(tasks, tmp_path, capsys, monkeypatch):
    _, path = tasks
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"tasks": "humaneval", "tasks_path": str(path)}))
    (run / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in RECORDED))
    assert set(run_tasks(run)) == {"toy/add", "toy/double", "toy/greet"}
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as done:
        main(["eval", "agree", str(run), "--human", "reference", "--metrics-resamples", "200"])
    out = capsys.readouterr().out
    assert done.value.code in (0, None)
    row, length_row = [line for line in out.splitlines() if line.startswith("│ reference ")]
    cells = [cell.strip() for cell in row.split("│")[1:9]]
    assert cells[:5] == ["reference", "recorded", "3", "3", "0.667"] and cells[6:] == ["0.333", "0.667"]
    assert cells[5].startswith("0.400 [")
    assert [c.strip() for c in length_row.split("│")[1:4]] == ["reference", "-", "0.33 (1/3)"]
