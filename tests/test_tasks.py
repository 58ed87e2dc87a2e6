"""Task loading: each format into typed records, broken records named, hub path on a local folder.

Run: ``.venv/bin/pytest tests/test_tasks.py``. Tests on the shared problem sets skip without them.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from empower.sandbox import SandboxConfig, Status, run_many, run_task_tests
from empower.tasks import TASK_SETS, Task, TestType, load_tasks

HUMANEVAL_ROW = {
    "task_id": "mine/0",
    "prompt": 'def inc(x):\n    """Add one.\n    >>> inc(1)\n    2\n    """\n',
    "canonical_solution": "    return x + 1\n",
    "test": "def check(candidate):\n    assert candidate(1) == 2\n",
    "entry_point": "inc",
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_humaneval_from_the_package_has_164_tasks():
    tasks = load_tasks("humaneval")
    assert (len(tasks), tasks[0].task_id, tasks[0].test_type) == (164, "HumanEval/0", TestType.HUMANEVAL)


def test_humaneval_reference_starts_with_prompt():
    assert all(t.reference.startswith(t.prompt) for t in load_tasks("humaneval"))


def test_limit_keeps_the_first_tasks():
    assert [t.task_id for t in load_tasks("humaneval", limit=2)] == ["HumanEval/0", "HumanEval/1"]


def test_user_humaneval_file(tmp_path):
    (task,) = load_tasks("humaneval", write_jsonl(tmp_path / "mine.jsonl", [HUMANEVAL_ROW]))
    assert (task.task_id, task.statement.splitlines()[0], task.reference) == (
        "mine/0",
        "Add one.",
        HUMANEVAL_ROW["prompt"] + "    return x + 1\n",
    )


def test_docstring_examples_become_public_tests(tmp_path):
    (task,) = load_tasks("humaneval", write_jsonl(tmp_path / "mine.jsonl", [HUMANEVAL_ROW]))
    assert [(c.input, c.output) for c in task.public_test_cases] == [("inc(1)", "2")]


def test_broken_json_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(HUMANEVAL_ROW) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2:"):
        load_tasks("humaneval", path)


def test_record_missing_a_field_is_named(tmp_path):
    row = {k: v for k, v in HUMANEVAL_ROW.items() if k != "entry_point"}
    with pytest.raises(ValueError, match=r"jsonl:1: missing field 'entry_point'"):
        load_tasks("humaneval", write_jsonl(tmp_path / "bad.jsonl", [row]))


def test_unknown_task_set_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: " + ", ".join(TASK_SETS)):
        load_tasks("codeforces")


def test_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_tasks("humaneval", tmp_path / "nope.jsonl")


def test_livecodebench_without_path_asks_for_one():
    with pytest.raises(ValueError, match="tasks-path"):
        load_tasks("livecodebench")


def test_hub_path_loads_through_datasets(tmp_path):
    folder = tmp_path / "hub-like"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", [HUMANEVAL_ROW])
    (task,) = load_tasks("humaneval", f"hf:{folder}:test")  # split named after the file
    assert task.reference == HUMANEVAL_ROW["prompt"] + HUMANEVAL_ROW["canonical_solution"]


def test_task_round_trips_through_plain_values():
    task = load_tasks("humaneval", limit=1)[0]
    plain = json.loads(json.dumps(dataclasses.asdict(task)))
    assert Task(**plain) == task


def test_reference_must_extend_the_prompt():
    with pytest.raises(ValueError, match="does not start with the prompt"):
        Task("t", "s", "def f():\n", TestType.HUMANEVAL, test_code="pass", reference="def g():\n    pass\n")


def test_mbpp_prompt_is_the_code_through_the_function_header(shared_data):
    task = {t.task_id: t for t in load_tasks("mbpp", shared_data / "mbpp" / "mbpp.jsonl")}["mbpp/11"]
    assert task.prompt.rstrip().endswith("def remove_Occ(s,ch):") and task.reference.startswith(task.prompt)


def test_full_mbpp_file_is_cut_to_the_evaluation_ids(shared_data):
    ids = [int(t.task_id.split("/")[1]) for t in load_tasks("mbpp", shared_data / "mbpp" / "mbpp.jsonl")]
    assert (min(ids), max(ids), len(ids)) == (11, 510, 500)


@pytest.mark.parametrize(
    ("file", "kinds"),
    [
        ("lcb_2408_2501_279_public_tests.json", {TestType.STDIN, TestType.FUNCTIONAL}),
        ("lcb_v5_879_public_titles.json", {TestType.STDIN, TestType.FUNCTIONAL}),
    ],
)
def test_livecodebench_has_both_test_types(shared_data, file, kinds):
    tasks = load_tasks("livecodebench", shared_data / "livecodebench" / file)
    assert {t.test_type for t in tasks} == kinds


def test_livecodebench_hub_style_record(tmp_path):
    row = {
        "question_title": "Twice",
        "question_id": "abc123",
        "question_content": "Double each number.",
        "starter_code": "class Solution:\n    def twice(self, nums: List[int]) -> List[int]:\n        ",
        "public_test_cases": json.dumps([{"input": "[1, 2]", "output": "[2, 4]", "testtype": "functional"}]),
        "metadata": json.dumps({"func_name": "twice"}),
    }
    (task,) = load_tasks("livecodebench", write_jsonl(tmp_path / "lcb.jsonl", [row]))
    assert (task.task_id, task.entry_point, task.test_type, task.prompt.endswith(":\n")) == (
        "abc123",
        "twice",
        TestType.FUNCTIONAL,
        True,
    )


def test_livecodebench_mixed_test_types_are_refused(tmp_path):
    tests = [
        {"input": "1", "output": "1", "testtype": "stdin"},
        {"input": "1", "output": "1", "testtype": "functional"},
    ]
    with pytest.raises(ValueError, match=r"lcb\.jsonl:1: test types"):
        load_tasks("livecodebench", write_jsonl(tmp_path / "lcb.jsonl", [{"problem": "p", "tests": tests}]))


def test_livecodebench_functional_entry_point_from_starter(shared_data):
    tasks = load_tasks("livecodebench", shared_data / "livecodebench" / "lcb_2408_2501_279_public_tests.json")
    task = next(t for t in tasks if t.test_type is TestType.FUNCTIONAL)
    assert f"def {task.entry_point}(self" in task.prompt


@pytest.mark.parametrize(
    "file", ["leetcodedataset_test_200_solutions_tests.json", "leetcode_contest_180_hidden_tests.jsonl"]
)
def test_leetcode_formats_load(shared_data, file):
    tasks = load_tasks("leetcode", shared_data / "leetcode" / file)
    assert tasks and all("class Solution" in t.prompt for t in tasks)


@pytest.mark.parametrize(
    ("name", "path", "count"),
    [
        ("humaneval", None, 12),
        ("mbpp", "mbpp/mbpp.jsonl", 12),
        ("leetcode", "leetcode/leetcodedataset_test_200_solutions_tests.json", 12),
    ],
)
def test_references_pass_their_tests_in_the_sandbox(shared_data, name, path, count):
    tasks = load_tasks(name, shared_data / path if path else None, limit=count)
    results = run_many([(t, t.reference) for t in tasks], SandboxConfig(sandbox_workers=2))
    assert [t.task_id for t, r in zip(tasks, results, strict=True) if r.status is not Status.PASSED] == []


def test_leetcode_linked_list_reference_passes(shared_data):
    tasks = load_tasks(
        "leetcode", shared_data / "leetcode" / "leetcodedataset_train_1889_solutions_tests.json", limit=3
    )
    task = next(t for t in tasks if "ListNode" in t.prompt)
    assert run_task_tests(task, task.reference).status is Status.PASSED


def test_cli_tasks_check_reports_excluded_tasks(tmp_path):
    from typer.testing import CliRunner

    from empower.cli import app

    broken = {**HUMANEVAL_ROW, "task_id": "mine/1", "canonical_solution": "    return x\n"}
    path = write_jsonl(tmp_path / "mine.jsonl", [HUMANEVAL_ROW, broken])
    result = CliRunner().invoke(app, ["tasks", "check", "--tasks-path", str(path), "--sandbox-workers", "2"])
    output = " ".join(result.output.split())  # rich wraps lines at the terminal width
    assert result.exit_code == 0 and "1 excluded" in output and "mine/1" in output
