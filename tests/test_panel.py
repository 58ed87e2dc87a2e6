"""The panel's evidence: replaying recorded suggestions before another human, and Cohen's kappa.

Run: .venv/bin/pytest tests/test_panel.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from empower import metrics, models
from empower.assistant import AssistantConfig, build_assistant
from empower.cli import main
from empower.env import EvalConfig, TokenCounter, run_episodes
from empower.humans import HumanConfig, ReferenceHuman, build_human
from empower.metrics import MetricsConfig
from empower.panel import PanelConfig, agreement, cohen_kappa, run_tasks, shown_suggestions
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
    run_episodes(list(by_id.values()), assistant, human, config, TokenCounter(config.count_tokenizer),
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


def _panel_file(path, tiny_model_path):
    path.write_text(
        "humans:\n"
        "  - {label: fallible, human: reference, human_tolerance: 0.5, human_repair: 0.5}\n"
        "  - {label: twin, human: reference, human_tolerance: 0.5, human_repair: 0.5}\n"
        "  - {label: exact, human: reference}\n"
        f"  - {{label: plausible, human: plausible, human_model: {tiny_model_path}, human_accept_rate: 0.5}}\n"
        f"  - {{label: llm, human: llm, human_model: {tiny_model_path}, human_max_new_tokens: 8}}\n"
    )
    return path


def test_the_panel_plays_one_assistant_with_every_human_and_tabulates_them(
    tasks, tmp_path, tiny_model_path, capsys, monkeypatch
):
    """Every human plays the same tasks; a human agrees with its twin (the yardstick) on every
    suggestion; the table and its files hold one row per human; a rerun resumes without replaying."""
    _, path = tasks
    out = tmp_path / "panel"
    args = ["eval", "panel", "--assistant", tiny_model_path, "--policy", "model", "--max-new-tokens", "6",
            "--tasks", "humaneval", "--tasks-path", str(path), "--sim-max-rounds", "6",
            "--panel", str(_panel_file(tmp_path / "panel.yaml", tiny_model_path)), "--yardstick", "fallible",
            "--out", str(out), "--metrics-resamples", "200"]  # fmt: skip
    monkeypatch.setenv("COLUMNS", "250")
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code in (0, None)
    table = capsys.readouterr().out
    saved = json.loads((out / "panel.json").read_text())
    labels = ["fallible", "twin", "exact", "plausible", "llm"]
    assert [h["label"] for h in saved["humans"]] == labels and saved["yardstick"] == "fallible"
    for label in labels:
        assert {t["task_id"] for t in metrics.read_traces(out / label / "traces.jsonl")} == {
            "toy/add", "toy/double", "toy/greet"
        }  # fmt: skip
        assert any(line.startswith(f"│ {label} ") for line in table.splitlines())
    by_label = {h["label"]: h for h in saved["humans"]}
    shown = sum(t["suggestions"] for t in metrics.read_traces(out / "fallible" / "traces.jsonl"))
    assert by_label["fallible"]["agreement"] is None  # the yardstick itself
    twin = by_label["twin"]["agreement"]
    assert twin["decisions"] == shown > 0 and twin["only_recorded"] == twin["only_candidate"] == 0
    assert twin["kappa"]["value"] == 1.0
    assert all(by_label[x]["agreement"]["decisions"] == shown for x in ("exact", "plausible", "llm"))
    assert by_label["twin"]["summary"] == {**by_label["fallible"]["summary"], "run": "twin", "human": "twin"}
    assert (out / "panel.md").read_text().count("\n") == 2 + len(labels)
    before = [(out / label / "traces.jsonl").read_text() for label in labels]
    with pytest.raises(SystemExit):
        main(args)
    assert [(out / label / "traces.jsonl").read_text() for label in labels] == before
    assert json.loads((out / "panel.json").read_text()) == saved


@pytest.mark.parametrize(
    ("entry", "message"),
    [("{label: a, human: reference, assistant: x}", r"humans\[0\]: assistant cannot differ"),
     ("{human: reference}", r"humans\[0\]: each human needs a `label`"),
     ("{label: a, human: nobody}", r"humans\[0\]"),
     ("{label: a, human_tolerance: 2}", "human_tolerance")],
)  # fmt: skip
def test_a_bad_panel_file_is_refused_naming_the_file_and_the_entry(tmp_path, entry, message):
    panel_file = tmp_path / "panel.yaml"
    panel_file.write_text(f"humans:\n  - {entry}\n")
    with pytest.raises(ValueError, match=message) as err:
        PanelConfig(panel=panel_file, yardstick="")
    assert str(panel_file) in str(err.value)


def test_a_yardstick_outside_the_panel_is_refused_by_name():
    with pytest.raises(ValueError, match="yardstick 'oracle' is not a human of the panel"):
        PanelConfig(yardstick="oracle")
