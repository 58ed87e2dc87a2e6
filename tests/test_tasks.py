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


# ------------------------------------------------------------------ LiveCodeBench releases


@pytest.fixture
def release(tmp_path):
    from lcb_fixture import write_release

    return write_release(tmp_path / "lcb")


@pytest.mark.parametrize(
    "selection, ids",
    [
        ("", ["abc001_a", "abc002_a", "abc003_a", "abc004_a", "abc005_a", "3999"]),
        ("?release=release_v6", ["abc001_a", "abc002_a", "abc003_a", "abc004_a", "abc005_a", "3999"]),
        ("?release=release_v2", ["abc001_a", "abc002_a"]),
        ("?release=v6", ["3999"]),
        ("?release=v4_v5", ["abc004_a", "abc005_a"]),
        ("?release=release_v6&from=2024-08-10", ["abc004_a", "abc005_a", "3999"]),
        ("?from=2023-12-02&until=2024-06-01", ["abc002_a", "abc003_a"]),  # both ends included
    ],
)
def test_problems_are_selected_by_release_and_contest_date(release, selection, ids):
    assert [t.task_id for t in load_tasks("livecodebench", f"{release}{selection}")] == ids


def test_private_tests_are_decoded_and_judged_with_the_public_ones(release):
    tasks = {t.task_id: t for t in load_tasks("livecodebench", str(release))}
    add, larger = tasks["abc001_a"], tasks["3999"]
    assert [c.input for c in add.public_test_cases] == ["1 2\n"]
    assert [c.input for c in add.test_cases] == ["1 2\n", "5 7\n", "40 2\n"]
    assert larger.test_type is TestType.FUNCTIONAL and larger.entry_point == "maxOfTwo"
    assert [c.output for c in larger.test_cases] == ["2", "7", "-5"]
    config = SandboxConfig()
    assert run_task_tests(add, "a, b = map(int, input().split())\nprint(a + b)\n", config).passed
    only_public = run_task_tests(add, "print(3)\n", config)
    assert not only_public.passed and only_public.first_failure["test"] == 1  # the first private test
    assert run_task_tests(larger, larger.prompt + "        return max(a, b)\n", config).passed
    assert not run_task_tests(larger, larger.prompt + "        return b\n", config).passed


def test_a_private_test_blob_that_carries_code_is_refused_and_never_run(release, tmp_path):
    import base64
    import os
    import pickle
    import zlib

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    row = json.loads((release / "test.jsonl").read_text())
    row["private_test_cases"] = base64.b64encode(zlib.compress(pickle.dumps(Payload()))).decode()
    (release / "test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(
        ValueError, match=r"test\.jsonl:1: private_test_cases does not decode .*names (posix|os)\.system"
    ):
        load_tasks("livecodebench", str(release))
    assert not marker.exists()


@pytest.mark.parametrize(
    "change, source, message",
    [
        (None, "?release=release_v9", r"unknown release 'release_v9'; known: release_v1, "),
        (
            None,
            "?release=release_v6&from=2030-01-01",
            r"no problem matches the selection \(release=release_v6&from=2030-01-01\)",
        ),
        (None, "?from=2024-13-01", r"from='2024-13-01' is not a date YYYY-MM-DD"),
        (None, "?version=6", r"'version=6' is not release=NAME"),
        ("garbage", "", r"test3\.jsonl:1"),
        ("blob", "", r"test3\.jsonl:1: private_test_cases does not decode"),
        ("missing", "?release=release_v6", r"release release_v6 needs test5\.jsonl, which it lacks"),
    ],
)
def test_bad_releases_and_rows_fail_before_any_work_naming_where(release, change, source, message):
    path = release / "test3.jsonl"
    if change == "garbage":
        path.write_text("{not json\n")
    elif change == "blob":
        row = json.loads(path.read_text())
        path.write_text(json.dumps({**row, "private_test_cases": "bm90IHpsaWI="}) + "\n")  # base64, not zlib
    elif change == "missing":
        (release / "test5.jsonl").unlink()
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_tasks("livecodebench", f"{release}{source}")


def test_a_release_of_one_file_is_refused():
    from empower.tasks import split_selection

    base, selection = split_selection("x.jsonl?release=release_v6")
    assert base == "x.jsonl" and selection.release == "release_v6"
    with pytest.raises(ValueError, match=r"release=release_v6 selects among the official files"):
        load_tasks("livecodebench", f"{__file__}?release=release_v6")


def test_the_hub_release_is_read_as_jsonl_files_without_the_dataset_script(release, tmp_path, monkeypatch):
    """hf:livecodebench/code_generation_lite, from a hub cache laid out as huggingface_hub keeps it
    (offline here); without the files, the error names the URL it could not get."""
    import shutil

    import huggingface_hub.constants as hub

    repo = tmp_path / "hub" / "datasets--livecodebench--code_generation_lite"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copytree(release, repo / "snapshots" / "0123abcd")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    tasks = load_tasks("livecodebench", "hf:livecodebench/code_generation_lite?release=release_v3")
    assert [t.task_id for t in tasks] == ["abc001_a", "abc002_a", "abc003_a"]
    assert len(tasks[0].test_cases) == 3
    (repo / "snapshots" / "0123abcd" / "test2.jsonl").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"https://huggingface.co/datasets/livecodebench/code_generation_lite/resolve/main/test2\.jsonl",
    ):
        load_tasks("livecodebench", "hf:livecodebench/code_generation_lite?release=release_v3")
