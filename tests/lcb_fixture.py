"""A small LiveCodeBench release in the official layout (test.jsonl ... test6.jsonl), written by tests.

Rows carry every field the hub's files do; private tests are encoded as the release files encode
them: a JSON string, pickled, zlib-compressed, base64.
"""

from __future__ import annotations

import base64
import json
import pickle
import zlib
from pathlib import Path


def encode_private(tests: list[dict]) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def stdin_row(number: int, date: str, public: list[tuple[str, str]], private: list[tuple[str, str]]) -> dict:
    return {
        "question_title": f"Add {number}",
        "question_content": "Read two integers and print their sum.",
        "platform": "atcoder",
        "question_id": f"abc{number:03d}_a",
        "contest_id": f"abc{number:03d}",
        "contest_date": date,
        "starter_code": "",
        "difficulty": "easy",
        "public_test_cases": json.dumps([{"input": i, "output": o, "testtype": "stdin"} for i, o in public]),
        "private_test_cases": encode_private(
            [{"input": i, "output": o, "testtype": "stdin"} for i, o in private]
        ),
        "metadata": "{}",
    }


def functional_row(date: str) -> dict:
    starter = "class Solution:\n    def maxOfTwo(self, a: int, b: int) -> int:\n        "
    case = lambda a, b: {"input": f"{a}\n{b}", "output": json.dumps(max(a, b)), "testtype": "functional"}  # noqa: E731
    return {
        "question_title": "Max of two",
        "question_content": "Return the larger of a and b.",
        "platform": "leetcode",
        "question_id": "3999",
        "contest_id": "weekly-contest-450",
        "contest_date": date,
        "starter_code": starter,
        "difficulty": "easy",
        "public_test_cases": json.dumps([case(1, 2)]),
        "private_test_cases": encode_private([case(7, -3), case(-5, -9)]),
        "metadata": json.dumps({"func_name": "maxOfTwo"}),
    }


# One problem per file, contest dates rising with the release, as in the real files.
DATES = ["2023-05-07T00:00:00", "2023-12-02T00:00:00", "2024-06-01T00:00:00", "2024-08-10T00:00:00",
         "2024-11-16T00:00:00", "2025-02-01T00:00:00"]  # fmt: skip


def write_release(folder: Path) -> Path:
    """Six files: five stdin problems (test.jsonl ... test5.jsonl) and a functional one (test6.jsonl)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["test.jsonl", *(f"test{i}.jsonl" for i in range(2, 7))]
    for number, (name, date) in enumerate(zip(names, DATES, strict=True), start=1):
        if number == 6:
            row = functional_row(date)
        else:
            row = stdin_row(number, date, [("1 2\n", "3\n")], [("5 7\n", "12\n"), ("40 2\n", "42\n")])
        (folder / name).write_text(json.dumps(row) + "\n")
    return folder
