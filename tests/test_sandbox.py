"""Sandbox properties, one per test, with real child processes (no mocks).

Hostile programs run with the audit-hook guard on and, where the OS layers alone must hold, off.
Run: ``.venv/bin/pytest tests/test_sandbox.py``.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from empower.sandbox import (
    SandboxConfig,
    Status,
    outputs_match,
    run_many,
    run_task_tests,
    validate_references,
)
from empower.tasks import Task, TestCase, TestType

ROOT = os.geteuid() == 0
ADD = Task(
    task_id="toy/add",
    statement="Add two numbers.",
    prompt="def add(a, b):\n",
    test_type=TestType.HUMANEVAL,
    test_code="def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\ncheck(add)\n",
    entry_point="add",
    public_test_cases=(TestCase("add(1, 1)", "2"),),
    reference="def add(a, b):\n    return a + b\n",
)
ECHO_SUM = Task(
    task_id="toy/sum",
    statement="Print the sum of the numbers on the line.",
    prompt="",
    test_type=TestType.STDIN,
    test_cases=(TestCase("1 2 3\n", "6\n"), TestCase("10 -4\n", "6\n")),
)
TWICE = Task(
    task_id="toy/twice",
    statement="Return the list doubled.",
    prompt="class Solution:\n    def twice(self, nums: List[int]) -> List[int]:\n",
    test_type=TestType.FUNCTIONAL,
    entry_point="twice",
    test_cases=(TestCase("[1, 2]", "[2, 4]"), TestCase("[]", "[]")),
)


def config(**overrides) -> SandboxConfig:
    values = dict(sandbox_timeout_s=3.0, sandbox_memory_mb=256, sandbox_workers=2)
    return SandboxConfig(**(values | overrides))


def run(program: str, guard: bool = True, task: Task = ADD, **overrides):
    return run_task_tests(task, program, config(sandbox_guard=guard, **overrides))


CASES = [
    (ADD, "def add(a, b):\n    return a + b\n", Status.PASSED),
    (ADD, "def add(a, b):\n    return a - b\n", Status.FAILED),
    (ADD, "def add(a, b)\n    return a + b\n", Status.ERROR),
    (ADD, "def add(a, b):\n    return a + b\nraise RuntimeError('boom')\n", Status.ERROR),
    (ECHO_SUM, "print(sum(map(int, input().split())))", Status.PASSED),
    (ECHO_SUM, "import sys\nprint(sum(map(int, sys.stdin.read().split())))", Status.PASSED),
    (ECHO_SUM, "print(sum(map(int, open(0).read().split())))", Status.PASSED),
    (ECHO_SUM, "print(6.0)", Status.PASSED),  # equal as Decimals
    (ECHO_SUM, "print(6.0000000001)", Status.FAILED),  # LiveCodeBench has no float tolerance
    (ECHO_SUM, "print(7)", Status.FAILED),
    (ECHO_SUM, "print(1/0)", Status.ERROR),
    (TWICE, TWICE.prompt + "        return [2 * x for x in nums]\n", Status.PASSED),
    (TWICE, TWICE.prompt + "        return tuple(2 * x for x in nums)\n", Status.PASSED),
    (TWICE, TWICE.prompt + "        return nums\n", Status.FAILED),
    (TWICE, TWICE.prompt + "        return [2 * x + 1e-9 for x in nums]\n", Status.FAILED),
    (TWICE, TWICE.prompt + "        return nums[5]\n", Status.ERROR),
    (TWICE, "def twice(nums):\n    return nums\n", Status.ERROR),
]


@pytest.mark.parametrize(("task", "program", "status"), CASES, ids=lambda v: getattr(v, "task_id", None))
def test_status_of_program(task, program, status):
    assert run(program, task=task).status is status


def test_wrong_answer_reports_truncated_first_failure():
    result = run("print('x' * 5000)", task=ECHO_SUM)
    failure = result.first_failure
    assert (failure["test"], failure["input"], failure["expected"]) == (0, "1 2 3\n", "6\n")
    assert failure["actual"].startswith("xxx") and len(failure["actual"]) < 400


def test_humaneval_failure_names_the_failing_assert():
    result = run("def add(a, b):\n    return 5\n")
    assert result.first_failure["input"] == "assert candidate(-1, 1) == 0"


def test_syntax_error_message_says_so():
    assert "SyntaxError" in run("def add(:\n").message


@pytest.mark.parametrize(
    ("program", "status"),
    [
        ("def add(a, b):\n    return a + b\n", Status.PASSED),
        ("def add(a, b):\n    return 0\n", Status.FAILED),
    ],
)
def test_public_tests_only(program, status):
    assert run_task_tests(ADD, program, config(), public_only=True).status is status


def test_public_only_without_public_tests_just_runs_the_program():
    task = Task("toy/none", "s", "", TestType.HUMANEVAL, test_code="assert False\n")
    assert run_task_tests(task, "x = 1\n", config(), public_only=True).status is Status.PASSED


@pytest.mark.parametrize(
    ("actual", "expected", "same"),
    [
        ("1 2\n3\n", "  1 2\n3", True),  # lines and the whole text are stripped
        ("1  2", "1 2", True),  # unequal lines compare token by token
        ("1.0 2.50", "1 2.5", True),  # as Decimals
        ("1 2\n3", "1 2 3", False),  # the line count must match
        ("0.3333333", "0.33333333", False),  # no float tolerance
        ("50000000000000001", "50000000000000000", False),  # LiveCodeBench's comment: np.isclose says yes
        ("1000000001", "1000000000", False),
        ("YES", "yes", False),
        ("1 2", "1 2 3", False),
        ("nan", "nan", True),  # equal as text
        ("nan 1", "nan  1", False),  # Decimal NaNs are never equal
    ],
)
def test_stdin_outputs_compare_by_livecodebench_rules(actual, expected, same):
    """grade_stdio in LiveCodeBench's lcb_runner/evaluation/testing_util.py (commit 8610ffb2)."""
    assert outputs_match(actual, expected) is same


# --------------------------------------------------------------------------- hostile programs

GUARDS = [pytest.param(True, id="guard"), pytest.param(False, id="os-only")]


@pytest.mark.parametrize("guard", GUARDS)
def test_infinite_loop_times_out(guard):
    assert run("while True:\n    pass\n", guard, sandbox_timeout_s=1.0).status is Status.TIMEOUT


@pytest.mark.parametrize("guard", GUARDS)
@pytest.mark.parametrize(
    "program",
    ["x = bytearray(2 * 1024 ** 3)\n", "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))\n"],
)
def test_memory_bomb_hits_the_memory_limit(guard, program):
    assert run(program, guard).status is Status.MEMORY


def _processes_in(token: str) -> list[int]:
    """Live pids whose working directory contains ``token``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (
                    token in os.readlink(entry / "cwd")
                    and "Z" not in (entry / "stat").read_text().rsplit(")", 1)[1][:3]
                ):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.parametrize("guard", GUARDS)
def test_fork_bomb_is_contained_and_cleaned_up(guard):
    if not guard and not ROOT:
        pytest.skip(
            "without root there is no per-program uid, so RLIMIT_NPROC would count the tester's processes"
        )
    token = "bomb-" + secrets.token_hex(4)
    program = (
        f"import os\nos.mkdir({token!r})\nos.chdir({token!r})\n"
        "while True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n    except OSError:\n        pass\n"
    )
    result = run(program, guard, sandbox_timeout_s=2.0)
    assert result.status in (Status.ERROR, Status.TIMEOUT)
    assert _processes_in(token) == []


def test_fork_bomb_blocked_by_guard_says_so():
    assert "os.fork" in run("import os\nos.fork()\n").message


WRITES = {
    "open": "open({target!r}, 'w').write('x')\n",
    "os.open": "import os\nos.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))\n",
    "mkdir": "import os\nos.mkdir({target!r})\n",
    "sqlite": "import sqlite3\nsqlite3.connect({target!r}).execute('create table t (x)')\n",
}


@pytest.mark.parametrize("how", list(WRITES))
@pytest.mark.parametrize(("guard", "where"), [(True, "tmp"), (True, "private"), (False, "private")])
def test_cannot_write_outside_its_directory(guard, where, how, tmp_path):
    if not guard and not ROOT:
        pytest.skip("without root the program writes with the tester's own rights")
    folder = Path("/tmp") if where == "tmp" else tmp_path  # pytest's tmp_path is a root-only folder
    target = folder / f"escape-{secrets.token_hex(4)}"
    result = run(WRITES[how].format(target=str(target)), guard)
    assert (result.status, target.exists()) == (Status.ERROR, False)


@pytest.mark.parametrize("folder", ["/tmp", "/dev/shm"])
def test_unguarded_writes_to_shared_tmp_stay_private(folder):
    target = Path(folder) / f"escape-{secrets.token_hex(4)}"
    result = run(f"open({str(target)!r}, 'w').write('x')\n" + ADD.reference, guard=False)
    if "tmpfs" not in result.isolation:
        pytest.skip("no private /tmp here (needs root for a mount namespace)")
    assert (result.status, target.exists()) == (Status.PASSED, False)


def test_may_write_inside_its_directory():
    program = (
        "import os, tempfile\nopen('scratch.txt', 'w').write('x')\ntempfile.mkstemp()\n"
        "open(os.path.join(os.getcwd(), 'by-absolute-path'), 'w').write('x')\n" + ADD.reference
    )
    assert run(program).status is Status.PASSED


@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1 recording whether anything connected to it."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    connected = []

    def accept():
        try:
            connected.append(server.accept())
        except OSError:
            pass

    thread = threading.Thread(target=accept)
    thread.start()
    yield server.getsockname()[1], connected
    thread.join()
    server.close()


@pytest.mark.parametrize("guard", GUARDS)
def test_cannot_open_a_network_connection(guard, listener):
    port, connected = listener
    result = run(
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')\n", guard
    )
    if not guard and "netns" not in result.isolation:
        pytest.skip("no network namespace available here; only the guard blocks sockets")
    assert (result.status, connected) == (Status.ERROR, [])


@pytest.mark.parametrize("guard", GUARDS)
def test_cannot_kill_the_evaluator_or_other_processes(guard):
    if not guard and not ROOT:
        pytest.skip("without root the program has the tester's uid and could signal it")
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        program = f"import os, signal\nos.kill({decoy.pid}, signal.SIGKILL)\nos.kill(os.getppid(), signal.SIGKILL)\n"
        result = run(program, guard)
        assert (result.status, decoy.poll()) == (Status.ERROR, None)
    finally:
        decoy.kill()
        decoy.wait()


@pytest.mark.parametrize("guard", GUARDS)
def test_cannot_read_environment_secrets(guard, monkeypatch):
    secret = "sk-" + secrets.token_hex(8)
    monkeypatch.setenv("EMPOWER_TEST_SECRET", secret)
    result = run("import os\nraise RuntimeError(str(dict(os.environ)))\n", guard)
    assert result.status is Status.ERROR and "PATH" in result.message and secret not in result.message


@pytest.mark.parametrize("guard", GUARDS)
def test_cannot_read_another_processes_environment_through_proc(guard):
    if not ROOT:
        pytest.skip("without root the program has the tester's uid and may read its processes' /proc entries")
    secret = "sk-" + secrets.token_hex(8)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**os.environ, "EMPOWER_TEST_SECRET": secret},
    )
    try:
        result = run(f"raise RuntimeError(open('/proc/{holder.pid}/environ', 'rb').read())\n", guard)
        assert result.status is Status.ERROR and secret not in result.message
    finally:
        holder.kill()
        holder.wait()


def test_evaluator_and_machine_unharmed_after_hostile_programs():
    hostile = [
        "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)\n",
        "import os\nwhile True:\n    os.fork()\n",
        "while True:\n    pass\n",
    ]
    # As root the OS layers alone must hold; otherwise the program would have the tester's uid.
    results = run_many([(ADD, p) for p in hostile], config(sandbox_timeout_s=1.0, sandbox_guard=not ROOT))
    assert all(r.status is not Status.PASSED for r in results)
    assert os.getpgid(0) == os.getpgrp() and subprocess.run(["true"]).returncode == 0
    assert run_task_tests(ADD, ADD.reference, config()).status is Status.PASSED


@pytest.mark.parametrize(
    "forged",
    [
        '{"status": "ok", "outputs": 5}',
        '{"status": "died"}',
        '{"status": "failed"}',
        "[1, 2]",
        '{"status": "ok", "outputs": [["json", "{"], ["json", "1"]]}',
    ],
)
@pytest.mark.parametrize("task", [ECHO_SUM, TWICE], ids=["stdin", "functional"])
def test_forged_harness_report_is_an_error_not_a_crash(task, forged):
    program = f"import os\nfor fd in range(3, 8):\n    try:\n        os.write(fd, {forged!r}.encode() + b'\\n')\n    except OSError:\n        pass\nos._exit(0)\n"
    result = run(program, task=task)
    assert (result.status, result.message.startswith("malformed harness report")) == (Status.ERROR, True)


def test_isolation_layers_are_reported():
    layers = run(ADD.reference).isolation
    assert {"rlimits", "guard"} <= set(layers) and (not ROOT or "uid" in layers)


def test_run_many_keeps_the_order_of_items():
    programs = ["def add(a, b):\n    return a + b\n", "def add(a, b):\n    return 0\n"] * 3
    statuses = [r.status for r in run_many([(ADD, p) for p in programs], config())]
    assert statuses == [Status.PASSED, Status.FAILED] * 3


def test_validate_references_excludes_tasks_failing_their_own_reference():
    broken = Task(
        "toy/broken",
        "s",
        "def add(a, b):\n",
        TestType.HUMANEVAL,
        test_code=ADD.test_code,
        reference="def add(a, b):\n    return a * b\n",
    )
    good, excluded = validate_references([ADD, broken, ECHO_SUM], config())
    assert ([t.task_id for t in good], [t.task_id for t, _ in excluded]) == (
        ["toy/add", "toy/sum"],
        ["toy/broken"],
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sandbox_timeout_s", 0),
        ("sandbox_memory_mb", 8),
        ("sandbox_workers", -1),
        ("sandbox_python", "no-such-python"),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        SandboxConfig(**{field: value})
