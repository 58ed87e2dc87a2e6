"""`empower eval ...` and `empower eval summary RUN...` through the real command line."""

import json

import pytest
from typer.testing import CliRunner

from empower.cli import app, main


def _trace(task_id, passed, written=5):
    return {
        "task_id": task_id,
        "passed": passed,
        "tokens_read": 10,
        "tokens_written": written,
        "suggestions": 2,
        "accepted": 1,
        "suggestion_tokens": [4, 6],
        "suggestion_chars": [12, 20],
        "chars_deleted_from_accepted": 0,
        "turns": 3,
        "end_reason": "finish",
        "status": "passed" if passed else "failed",
    }


def _run(path, passes, **config):
    path.mkdir()
    (path / "config.json").write_text(
        json.dumps(
            {
                "assistant": "smollm2-135m",
                "human": "reference",
                "tasks": "humaneval",
                "n_tasks": len(passes),
                **config,
            }
        )
    )
    (path / "traces.jsonl").write_text(
        "".join(json.dumps(_trace(f"t{i}", p)) + "\n" for i, p in enumerate(passes))
    )
    return path


@pytest.fixture
def runs(tmp_path):
    return (
        _run(tmp_path / "empower-ref", [True, True, False, True]),
        _run(tmp_path / "base-ref", [False, True, False, False]),
    )


def _invoke(*args):
    # rich sizes its tables from COLUMNS; wide enough that no run name wraps.
    return CliRunner(env={"COLUMNS": "300"}).invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_summary_tabulates_every_run(runs):
    result = _invoke("eval", "summary", *runs)
    assert result.exit_code == 0, result.output
    assert "empower-ref" in result.output and "base-ref" in result.output and "0.750" in result.output


def test_summary_rebuilds_summary_json(runs):
    _invoke("eval", "summary", *runs)
    assert json.loads((runs[0] / "summary.json").read_text())["pass_at_1"]["value"] == 0.75


def test_summary_with_a_baseline_prints_paired_tests(runs):
    result = _invoke("eval", "summary", runs[0], "--baseline", runs[1])
    assert result.exit_code == 0, result.output
    assert "McNemar" in result.output


def test_summary_of_a_folder_that_is_no_run_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "summary", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "config.json" in capsys.readouterr().err


def test_eval_help_lists_run_and_summary():
    result = _invoke("eval", "--help")
    assert "summary" in result.output and "run" in result.output


def _one_task(tmp_path, solution: str):
    """A task file with one HumanEval-style task, toy/inc, whose reference body is ``solution``."""
    tasks = tmp_path / "one.jsonl"
    row = {"task_id": "toy/inc", "prompt": "def inc(x):\n", "entry_point": "inc", "canonical_solution": solution,
           "test": "def check(candidate):\n    assert candidate(1) == 2\n"}  # fmt: skip
    tasks.write_text(json.dumps(row) + "\n")
    return tasks


def test_eval_flags_start_a_run(tmp_path, tiny_model_path):
    tasks = _one_task(tmp_path, "    return x + 1\n")
    out = tmp_path / "run"
    result = _invoke(
        "eval",
        "--assistant",
        tiny_model_path,
        "--policy",
        "base-n",
        "--n",
        "4",
        "--human",
        "reference",
        "--tasks",
        "humaneval",
        "--tasks-path",
        tasks,
        "--out",
        out,
        "--metrics-resamples",
        "200",
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["episodes"] == 1


def test_a_plausible_human_plays_a_run_and_its_trace_says_what_each_decision_was_drawn_from(
    tmp_path, tiny_model_path
):
    tasks = _one_task(tmp_path, "    y = x + 1\n    return y\n")
    out = tmp_path / "run"
    result = _invoke(
        "eval", "--assistant", tiny_model_path, "--policy", "base-n", "--n", "4", "--human", "plausible",
        "--human-model", tiny_model_path, "--human-max-tokens", "2", "--tasks", "humaneval",
        "--tasks-path", tasks, "--out", out, "--metrics-resamples", "200",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [trace] = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    assert trace["suggestions"] >= 2 and len(trace["human_answers"]) == trace["suggestions"]
    for answer in trace["human_answers"]:
        assert 0 < answer["chance"] < 1 and answer["bits_per_char"] > 0 and answer["own_bits_per_char"] > 0
        accepted = any(e["kind"] == "accepted" and e["turn"] == answer["turn"] for e in trace["events"])
        assert (answer["draw"] < answer["chance"]) == accepted
    assert json.loads((out / "config.json").read_text())["human"] == "plausible"


def test_unknown_task_set_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--tasks", "nonsense", "--out", str(tmp_path / "run")])
    assert "nonsense" in capsys.readouterr().err


def test_unreachable_human_server_stops_with_a_resume_hint(tmp_path, tiny_model_path, capsys):
    tasks = _one_task(tmp_path, "    return x + 1\n")
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "eval",
                "--assistant",
                tiny_model_path,
                "--max-new-tokens",
                "4",
                "--human",
                "llm",
                "--human-url",
                "http://127.0.0.1:9",
                "--human-retries",
                "0",
                "--tasks",
                "humaneval",
                "--tasks-path",
                str(tasks),
                "--out",
                str(tmp_path / "run"),
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "127.0.0.1:9" in err and "--resume" in err
