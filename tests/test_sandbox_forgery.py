"""Hostile programs that try to forge a pass of function-style tests; none may pass.

Every program here computes wrong answers (``add`` returns 0, or nothing honest) and then attacks
the judging: the result must be a failure or an error, never PASSED. The tests run in a separate,
confined judge process and see only the plain data the program returns. Real processes, no mocks.
"""

from __future__ import annotations

import secrets

import pytest

from empower.sandbox import SandboxConfig, Status, run_task_tests
from empower.tasks import Task, TestType

TOKEN = "secret-" + secrets.token_hex(6)  # appears only in the test code, which the program must not see
ADD = Task(
    task_id="toy/add",
    statement="Add two numbers.",
    prompt="def double(x):\n    return 2 * x\n\n\ndef add(a, b):\n",
    test_type=TestType.HUMANEVAL,
    test_code=(
        f"# {TOKEN}\ndef check(candidate):\n    assert candidate(2, 3) == 5\n"
        "    assert abs(candidate(-1, 1) - 0) < 1e-9\n    assert candidate(double(2), 0) == 4\n\ncheck(add)\n"
    ),
    entry_point="add",
)
WRONG = "def add(a, b):\n    return 0\n"
GUARDS = [pytest.param(True, id="guard"), pytest.param(False, id="os-only")]


def run(program: str, guard: bool = True, task: Task = ADD, **overrides):
    values = dict(sandbox_timeout_s=5.0, sandbox_memory_mb=256, sandbox_guard=guard)
    return run_task_tests(task, program, SandboxConfig(**(values | overrides)))


def test_the_honest_program_passes_and_the_wrong_one_fails():
    """The baseline every attack below starts from."""
    assert (
        run("def double(x):\n    return 2 * x\n\n\ndef add(a, b):\n    return a + b\n").status
        is Status.PASSED
    )
    assert run(WRONG).status is Status.FAILED


ATTACKS = {
    "patch builtins.AssertionError": "import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n"
    + WRONG,
    "patch assert machinery in a call": WRONG.replace(
        "return 0", "import builtins\n    builtins.AssertionError = SystemExit\n    return 0"
    ),
    "SystemExit(0) at import": WRONG + "raise SystemExit(0)\n",
    "os._exit(0) at import": "import os\nos._exit(0)\n",
    "SystemExit(0) in the call": "def add(a, b):\n    raise SystemExit(0)\n",
    "os._exit(0) in the call": "def add(a, b):\n    import os\n    os._exit(0)\n",
    "KeyboardInterrupt in the call": "def add(a, b):\n    raise KeyboardInterrupt\n",
    "fake result line on every fd at import": (
        'import os\nfor fd in range(0, 64):\n    try:\n        os.write(fd, b\'{"status": "ok"}\\n\')\n'
        "    except OSError:\n        pass\n" + WRONG
    ),
    "fake result line on every fd in the call": (
        "import os\ndef add(a, b):\n    for fd in range(0, 64):\n        try:\n"
        '            os.write(fd, b\'{"status": "ok", "isolation": []}\\n\')\n        except OSError:\n'
        "            pass\n    return 0\n"
    ),
    "print a forged JSON verdict": 'print(\'{"status": "ok"}\')\ndef add(a, b):\n    print(\'{"status": "ok"}\')\n    return 0\n',
    "object equal to anything": "class Liar:\n    def __eq__(self, other):\n        return True\n    __lt__ = __eq__\n    def __sub__(self, other):\n        return 0\n    __abs__ = __sub__\n\ndef add(a, b):\n    return Liar()\n",
    "int subclass equal to anything": "class Liar(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n\ndef add(a, b):\n    return Liar(7)\n",
    "str subclass equal to anything": "class Liar(str):\n    def __eq__(self, other):\n        return True\n\ndef add(a, b):\n    return Liar('x')\n",
    "shadow the builtin abs": "def abs(x):\n    return 0\n" + WRONG,
    "override the task's trusted helper": "def double(x):\n    return 0\n" + WRONG,
    "patch sys.modules json and the harness": (
        "import sys, json\nfake = type(sys)('json')\nfake.dumps = lambda *a, **k: '{\"status\": \"ok\"}'\n"
        "fake.loads = json.loads\nsys.modules['json'] = fake\nsys.modules['__main__'].json = fake\n" + WRONG
    ),
    "call the harness's report": "import sys\nsys.modules['__main__'].report(status='ok')\n" + WRONG,
    "exec into the harness's globals": (
        "import sys\nharness = sys.modules['__main__'].__dict__\n"
        "exec(\"report(status='ok', outputs=[])\", harness)\n" + WRONG
    ),
    "harness report from inside the call": (
        "import sys\ndef add(a, b):\n    sys.modules['__main__'].report(status='ok')\n"
    ),
    "signal every other process": (
        "import os, signal\nfor name in os.listdir('/proc'):\n    if name.isdigit() and int(name) != os.getpid():\n"
        "        for sig in (signal.SIGSTOP, signal.SIGKILL):\n            try:\n                os.kill(int(name), sig)\n"
        "            except OSError:\n                pass\n" + WRONG
    ),
    "exhaust the reply channel at import": (
        "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'x' * (3 << 20))\n"
        "    except OSError:\n        pass\n" + WRONG
    ),
    "exhaust the reply channel with a value": "def add(a, b):\n    return 'x' * (3 << 20)\n",
}


# The status each attack earns, the same with the guard on and off: FAILED where the judge's tests
# ran on the program's honest (wrong) answers, ERROR where the program broke or bypassed the channel.
EARNS = {
    "patch builtins.AssertionError": Status.FAILED,
    "patch assert machinery in a call": Status.FAILED,
    "SystemExit(0) at import": Status.FAILED,
    "os._exit(0) at import": Status.ERROR,
    "SystemExit(0) in the call": Status.ERROR,
    "os._exit(0) in the call": Status.ERROR,
    "KeyboardInterrupt in the call": Status.ERROR,
    "fake result line on every fd at import": Status.ERROR,
    "fake result line on every fd in the call": Status.ERROR,
    "print a forged JSON verdict": Status.FAILED,
    "object equal to anything": Status.ERROR,
    "int subclass equal to anything": Status.FAILED,
    "str subclass equal to anything": Status.FAILED,
    "shadow the builtin abs": Status.FAILED,
    "override the task's trusted helper": Status.FAILED,
    "patch sys.modules json and the harness": Status.ERROR,
    "call the harness's report": Status.ERROR,
    "exec into the harness's globals": Status.ERROR,
    "harness report from inside the call": Status.ERROR,
    "signal every other process": Status.FAILED,
    "exhaust the reply channel at import": Status.ERROR,
    "exhaust the reply channel with a value": Status.ERROR,
}


@pytest.mark.parametrize("guard", GUARDS)
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attack_does_not_forge_a_pass(attack, guard):
    result = run(ATTACKS[attack], guard, sandbox_max_file_mb=2)
    assert (result.status, bool(result.message)) == (EARNS[attack], True), result.message


def test_a_verdict_sent_by_the_program_is_named_as_such():
    result = run(ATTACKS["call the harness's report"])
    assert "sent a verdict of its own ('ok')" in result.message


def test_object_equal_to_anything_fails_with_a_clear_message():
    result = run(ATTACKS["object equal to anything"])
    assert result.status is Status.ERROR and "not plain data" in result.message


@pytest.mark.parametrize("guard", GUARDS)
def test_program_cannot_read_the_test_code(guard):
    """It looks for the test code in every file of /tmp and every other process's /proc entries."""
    program = (
        "import os\nfound = []\n"
        "def look(path):\n    try:\n        with open(path, 'rb') as handle:\n"
        f"            if {TOKEN!r}.encode() in handle.read(1 << 22):\n                found.append(path)\n"
        "    except OSError:\n        pass\n"
        "for pid in os.listdir('/proc'):\n    if pid.isdigit() and int(pid) != os.getpid():\n"
        "        for name in ('cmdline', 'environ', 'fd/0', 'fd/1', 'fd/3', 'fd/4'):\n"
        "            look(f'/proc/{pid}/{name}')\n"
        "for root in ('/tmp', '/dev/shm', '/var/tmp', os.path.dirname(os.getcwd())):\n"
        "    for folder, _, files in os.walk(root):\n        for name in files:\n"
        "            look(os.path.join(folder, name))\n"
        "raise RuntimeError(f'found {found}')\n"
    )
    result = run(program, guard)
    assert (result.status, result.message) == (Status.ERROR, "RuntimeError: found []")


def test_data_crosses_exactly():
    """Tuples, sets, float specials, big ints, bytes and nesting arrive as the same values and types."""
    values = (
        "(1, 'a'), {2, 3}, frozenset({(4,)}), float('inf'), -0.0, 10 ** 40, -(10 ** 30), b'\\x00y', "
        "bytearray(b'z'), 1 + 2j, {'k': [None, True]}, range(1, 9, 2), [[1], [2, [3]]]"
    )
    task = Task(
        "toy/data",
        "s",
        "def f(*args):\n",
        TestType.HUMANEVAL,
        entry_point="f",
        test_code=(
            f"import math\nexpected = [{values}]\nactual = f()\n"
            "assert actual == expected and [type(v) for v in actual] == [type(v) for v in expected]\n"
            "assert math.copysign(1, actual[4]) == -1 and math.isnan(f(float('nan')))\n"
            "assert f((1, 2)) == (1, 2) and type(f({1: (2,)})[1]) is tuple\n"
        ),
    )
    program = f"import math\ndef f(*args):\n    return args[0] if args else [{values}]\n"
    assert run(program, task=task).status is Status.PASSED


def test_mutated_arguments_reach_the_tests():
    task = Task(
        "toy/sort",
        "s",
        "def f(x):\n",
        TestType.HUMANEVAL,
        entry_point="f",
        test_code="x = [3, 1, 2]\nd = {}\nassert f(x, d) is None\nassert (x, d) == ([1, 2, 3], {'n': 3})\n",
    )
    assert run("def f(x, d):\n    x.sort()\n    d['n'] = len(x)\n", task=task).status is Status.PASSED
    assert run("def f(x, d):\n    pass\n", task=task).status is Status.FAILED


def test_generators_arrive_as_iterators_and_objects_stay_in_the_program():
    task = Task(
        "toy/gen",
        "s",
        "",
        TestType.HUMANEVAL,
        test_code=(
            "assert list(evens(5)) == [0, 2, 4]\nc = Counter()\nc.add(2)\nc.add(3)\nassert c.total() == 5\n"
        ),
    )
    program = (
        "def evens(n):\n    return (i for i in range(n) if i % 2 == 0)\n\n"
        "class Counter:\n    def __init__(self):\n        self.n = 0\n    def add(self, k):\n        self.n += k\n"
        "    def total(self):\n        return self.n\n"
    )
    assert run(program, task=task).status is Status.PASSED


def test_linked_lists_with_a_cycle_cross_both_ways():
    prompt = "class ListNode:\n    def __init__(self, val=0, next=None):\n        self.val = val\n        self.next = next\n\n\nclass Solution:\n    def hasCycle(self, head):\n"
    task = Task(
        "toy/cycle",
        "s",
        prompt,
        TestType.HUMANEVAL,
        entry_point="hasCycle",
        test_code=(
            "a = ListNode(1, ListNode(2, ListNode(3)))\na.next.next.next = a\n"
            "assert Solution().hasCycle(a) is True\nassert Solution().hasCycle(ListNode(1)) is False\n"
            "assert Solution().loop(a).next.next.next is not None\n"
        ),
    )
    program = prompt + (
        "        seen = set()\n        while head and id(head) not in seen:\n            seen.add(id(head))\n"
        "            head = head.next\n        return head is not None\n\n"
        "    def loop(self, head):\n        return head\n"
    )
    assert run(program, task=task).status is Status.PASSED


def test_entry_point_may_share_a_builtins_name_but_other_names_may_not():
    """MBPP's `sum` task tests a function named like a builtin; a program's `abs` never replaces the tests'."""
    task = Task(
        "toy/sum",
        "s",
        "def sum(a, b):\n",
        TestType.HUMANEVAL,
        entry_point="sum",
        test_code="assert sum(2, 3) == 1\nassert abs(sum(1, 1)) == 4\n",
    )
    assert run("def sum(a, b):\n    return a * b - 5\n", task=task).status is Status.PASSED
    assert (
        run("def abs(x):\n    return 4\n\ndef sum(a, b):\n    return 1\n", task=task).status is Status.FAILED
    )


@pytest.mark.integration
@pytest.mark.parametrize("name, path", [("humaneval", None), ("mbpp", "mbpp/mbpp.jsonl")])
def test_every_reference_still_passes_under_the_judge(request, name, path):
    """All 164 HumanEval references and MBPP's 500 evaluation tasks (ids 11-510) pass, judged apart."""
    from empower.sandbox import run_many
    from empower.tasks import load_tasks

    tasks = load_tasks(name, request.getfixturevalue("shared_data") / path if path else None)
    assert len(tasks) == {"humaneval": 164, "mbpp": 500}[name]
    results = run_many([(t, t.reference) for t in tasks], SandboxConfig())
    assert [
        (t.task_id, r.status, r.message)
        for t, r in zip(tasks, results, strict=True)
        if r.status is not Status.PASSED
    ] == []
