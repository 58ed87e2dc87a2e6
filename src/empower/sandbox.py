"""Run untrusted programs (assistant and human output) against a task's tests, with limits.

Each program runs in its own Python process (``python -I -S -B``, started with
``start_new_session=True``) in a fresh temporary directory with a scrubbed environment. A small
harness, passed on the command line, confines its own process before it reads the program:

1. ``unshare(CLONE_NEWNET)``: a network namespace with no interfaces (no network at all, not even
   the host's 127.0.0.1). Needs root or unprivileged user namespaces; otherwise skipped. As root,
   also a mount namespace with private, size-capped tmpfs on /tmp, /var/tmp, /dev/shm, /run/lock.
2. rlimits: CPU seconds, address space, file size (also caps the captured output), processes
   (counted per user, so it only bites with step 3), open files, no core dumps.
3. When the evaluator runs as root: drop to a fresh random uid/gid with no supplementary groups,
   so the program cannot signal the evaluator or other processes, cannot read root-only files
   (``/root``, other processes' ``/proc/<pid>/environ``), and its process count is its own.
4. A ``sys.addaudithook`` guard (defence in depth, ``sandbox_guard``): refuses sockets, process
   creation, ``os.kill`` of other pids, ctypes, and writes outside the working directory.

Who decides a pass. Function-style tests (``humaneval`` type: HumanEval, MBPP, LeetCode) run in a
second confined process, the judge (same four layers, its own fresh uid, non-dumpable). The judge
runs the task's trusted code only: its tests and its starter code's helpers (``poly``,
``TreeNode``, ...). Each name the program defines, and that trusted code and the builtins do not,
is a stand-in whose calls cross two pipes to the program's process, arguments and results as
plain data (tagged JSON: None, bool, int, float with NaN/inf, str, bytes, list, tuple, set, dict,
range, deque, instances of the task's own classes by their attributes; never pickle). A returned
generator arrives drained, as an iterator; any other object stays in the program and arrives as
a handle whose methods can be called but which refuses comparison (a clear error, never equality).
The judge writes the only verdict, to a file the program cannot reach; if the program's process
dies, floods or garbles the channel, the result is an error. So nothing the program does in its
own process yields a pass: it controls only the values it returns. Stdin and functional
(LiveCodeBench) programs run alone and return only their outputs; expected outputs never reach
them and are compared here, in the evaluator.

The evaluator enforces the wall-clock limit: on timeout it kills the whole process group and, when a
uid was dropped, every process of that uid (so a fork bomb that called ``setsid`` dies too), then
deletes the directory.

What it does NOT protect against: kernel exploits and CPU side channels (this is not a VM or a
container); filling the disk with many files within the time limit (``RLIMIT_FSIZE`` caps each
file); reads of world-readable files (the program can read ``/etc``, the Python stdlib, any
file others may read, including a benchmark's own data if it is world-readable: that is reading
the answer key, which only file permissions prevent); as a non-root user, with no uid drop, the
program shares the evaluator's uid and may signal or tamper with the evaluator itself, including
the judge's verdict file (the judge is non-dumpable, so not its memory or /proc files): the
no-forgery guarantee needs the ``uid`` layer, i.e. an evaluator running as root; and with the
guard off, writes anywhere that user may write. Without root, steps 1 and 3 may be unavailable: the result's ``isolation`` field
and a log warning say which layers were on.

Example::

    result = run_task_tests(task, task.reference, SandboxConfig(sandbox_timeout_s=5))
    result.status  # Status.PASSED
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import random
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from enum import Enum
from functools import cache
from pathlib import Path

from empower.configs import option
from empower.tasks import Task, TestCase, TestType, load_tasks

logger = logging.getLogger(__name__)

HARNESS = Path(__file__).with_name("sandbox_harness.py")  # runs in the child, stdlib only
TRUNCATE = 300  # characters kept of a failing test's input / expected / actual, as LiveCodeBench does
ISOLATION_LAYERS = ("netns", "tmpfs", "rlimits", "uid", "guard")

# LiveCodeBench's evaluation runs programs after imports like these; its starter code relies on them.
PROGRAM_PREAMBLE = (
    "from typing import *\nfrom collections import *\nfrom functools import *\nfrom itertools import *\n"
    "from heapq import *\nfrom bisect import *\nfrom math import *\nfrom string import *\n"
    "import bisect, collections, copy, functools, heapq, itertools, math, random, re, string, sys\n"
)


class Status(str, Enum):
    PASSED = "passed"
    FAILED = "failed"  # ran, but a test's answer was wrong
    TIMEOUT = "timeout"  # wall-clock or CPU limit
    ERROR = "error"  # syntax error, exception, or blocked by the sandbox
    MEMORY = "memory"  # address-space limit


@dataclass
class SandboxConfig:
    """Limits for running one program (and all its tests), and the size of the worker pool."""

    sandbox_timeout_s: float = option(
        10.0, "wall-clock limit for one program and all its tests (seconds); CPU time is capped the same"
    )
    sandbox_memory_mb: int = option(1024, "address-space limit of a program (MB)")
    sandbox_max_processes: int = option(
        16,
        "processes and threads (RLIMIT_NPROC, counted per uid: a program's own when the evaluator is "
        "root, else all of the user's)",
    )
    sandbox_max_file_mb: int = option(
        16, "largest file a program may write, including its captured output (MB)"
    )
    sandbox_max_open_files: int = option(64, "open file descriptors of a program")
    sandbox_workers: int = option(
        0,
        "programs run in parallel by run_many (0: two per CPU core, as each waits on process start-up "
        "more than it computes)",
        resumable=True,
    )
    sandbox_guard: bool = option(
        True, "audit-hook guard inside the program (defence in depth; the OS limits hold without it)"
    )
    sandbox_python: str = option(
        "",
        "Python for programs (default: this one if an unprivileged user can read it, else python3 on PATH)",
    )

    def __post_init__(self):
        for name in (
            "sandbox_timeout_s",
            "sandbox_memory_mb",
            "sandbox_max_processes",
            "sandbox_max_file_mb",
            "sandbox_max_open_files",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.sandbox_memory_mb < 64:
            raise ValueError(
                f"sandbox_memory_mb={self.sandbox_memory_mb} is too small for a Python interpreter (>= 64)"
            )
        if self.sandbox_workers < 0:
            raise ValueError(f"sandbox_workers must be >= 0 (0: two per core), got {self.sandbox_workers}")
        if self.sandbox_python and not shutil.which(self.sandbox_python):
            raise ValueError(f"sandbox_python={self.sandbox_python!r} is not an executable")


@dataclass
class ExecutionResult:
    """The outcome of running one program against one task's tests."""

    status: Status
    message: str
    duration_s: float
    first_failure: dict | None = None  # test index, truncated input / expected / actual, error
    isolation: tuple[str, ...] = field(default=())  # the layers that were on (see ISOLATION_LAYERS)

    @property
    def passed(self) -> bool:
        return self.status is Status.PASSED


# --------------------------------------------------------------------------- evaluator side


def _world_readable(path: str) -> bool:
    """Whether a user with no rights but "other" can reach and read ``path``."""
    current = Path(path)
    try:
        if not current.stat().st_mode & stat.S_IROTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in current.parents)
    except OSError:
        return False


@cache
def _interpreter(requested: str) -> tuple[str, bool]:
    """(interpreter, whether programs may drop to a fresh uid with it).

    The program imports the stdlib after the harness dropped privileges, so the dropped uid must be
    able to read it: a pyenv Python under a 0700 /root cannot serve, the system python3 can.
    """
    candidates = [shutil.which(requested) or requested] if requested else [os.path.realpath(sys.executable)]
    if os.geteuid() != 0:
        return candidates[0], False
    if not requested:
        candidates += [p for p in (shutil.which("python3"), "/usr/bin/python3") if p]
    ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
    script = "import os, sys; print(os.__file__, f'{sys.version_info[0]}.{sys.version_info[1]}')"
    for candidate in candidates:
        probe = subprocess.run(
            [candidate, "-I", "-S", "-c", script], capture_output=True, text=True
        ).stdout.split()
        if len(probe) == 2 and _world_readable(candidate) and _world_readable(probe[0]):
            if probe[1] != ours:
                logger.warning(
                    "programs run on Python %s (%s), not this interpreter's %s, which the sandbox user "
                    "cannot read",
                    probe[1],
                    candidate,
                    ours,
                )
            return candidate, True
    logger.warning(
        "no Python interpreter whose stdlib an unprivileged user can read: programs keep root's "
        "uid (set sandbox_python to a world-readable interpreter to fix this)"
    )
    return candidates[0], False


@cache
def _warn_isolation(layers: tuple[str, ...]) -> None:
    missing = [layer for layer in ISOLATION_LAYERS if layer not in layers]
    if missing:
        logger.warning(
            "sandbox runs without %s (see empower.sandbox docs for what that allows)", ", ".join(missing)
        )


def _sandbox_uid() -> int:
    """A fresh uid (and gid) per program, so that its processes, and only they, are that uid's."""
    return random.SystemRandom().randrange(1_000_000, 2_000_000_000)


def _kill_all(proc: subprocess.Popen, uids: list[int], python: str) -> None:
    """SIGKILL the process group and, for each dropped uid, every process of that uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for uid in uids:
        if not _uid_lingers(uid):
            continue
        # kill(-1) from inside the uid reaches every process of that uid, including ones that left the
        # group with setsid(), atomically enough to stop a fork bomb.
        for _ in range(5):
            subprocess.run(
                [python, "-I", "-S", "-c", "import os; os.kill(-1, 9)"],
                user=uid,
                group=uid,
                extra_groups=[],
                env={},
                cwd="/",
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if not _uid_has_processes(uid):
                break
            time.sleep(0.05)
        else:
            logger.error("processes of sandbox uid %d survived SIGKILL", uid)


def _uid_lingers(uid: int, grace_s: float = 0.05) -> bool:
    """Whether a process of ``uid`` is still alive after ``grace_s``. The judge's program process is
    the harness's child, not ours: it may take a moment to die of the group kill, and waiting for
    that is cheaper than starting the kill(-1) helper."""
    deadline = time.monotonic() + grace_s
    while _uid_has_processes(uid):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.001)
    return False


def _uid_has_processes(uid: int) -> bool:
    """Whether a live (not zombie) process of ``uid`` exists."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        return True
            except (OSError, IndexError):
                continue
    return False


def _confined(spec: dict, config: SandboxConfig, can_drop: bool) -> dict:
    """``spec`` with what the harness needs to confine its process: a fresh folder (owned by a fresh
    uid when privileges can be dropped), rlimits, the guard and the reply limit."""
    uid = _sandbox_uid() if can_drop else None
    workdir = tempfile.mkdtemp(prefix="empower-sandbox-")
    if uid is not None:
        os.chown(workdir, uid, uid)
    megabyte = 1 << 20
    cpu = math.ceil(config.sandbox_timeout_s) + 1
    return spec | {
        "workdir": workdir,
        "uid": uid,
        "netns": True,
        "tmp_mb": config.sandbox_max_file_mb,
        "guard": config.sandbox_guard,
        "reply_limit": config.sandbox_max_file_mb * megabyte,
        "rlimits": {
            "RLIMIT_CPU": [cpu, cpu + 1],
            "RLIMIT_AS": [config.sandbox_memory_mb * megabyte] * 2,
            "RLIMIT_FSIZE": [config.sandbox_max_file_mb * megabyte] * 2,
            "RLIMIT_NPROC": [config.sandbox_max_processes] * 2,
            "RLIMIT_NOFILE": [config.sandbox_max_open_files] * 2,
            "RLIMIT_CORE": [0, 0],
        },
    }


def _exited(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``proc`` to end; whether it did. A pidfd wakes us the moment
    it ends: ``Popen.wait(timeout)`` polls with sleeps doubling up to 50 ms, which added up to 30 ms to
    a run that ends just after one of its checks."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (not Linux 5.3+): the polling wait
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def _frame(spec: dict) -> bytes:
    """A spec as the harness reads it: its length, a newline, the JSON."""
    data = json.dumps(spec).encode()
    return b"%d\n" % len(data) + data


def _execute(
    spec: dict, config: SandboxConfig, program_spec: dict | None = None
) -> tuple[dict | None, bool, int, str, float, str]:
    """Run the harness on ``spec``; with ``program_spec`` (a judge), the harness first forks a second
    confined process for the program, joined to the judge by two pipes. Returns (report, timed_out,
    returncode, stderr tail, seconds, the program process's stderr tail)."""
    python, can_drop = _interpreter(config.sandbox_python)
    private = tempfile.mkdtemp(prefix="empower-sandbox-io-")  # root-only: the programs cannot reach it
    confined, files = [], {}
    start = time.monotonic()
    try:
        files = {name: open(Path(private) / name, "w+b") for name in ("out", "err", "program.err")}
        pass_fds = ()
        if (
            program_spec is not None
        ):  # its frame goes first: the harness forks it off before reading the tests
            confined.append(
                _confined(program_spec | {"stderr_fd": files["program.err"].fileno()}, config, can_drop)
            )
            pass_fds = (files["program.err"].fileno(),)
        confined.append(_confined(spec, config, can_drop))
        workdir = confined[-1]["workdir"]
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
        }
        proc = subprocess.Popen(
            [python, "-I", "-S", "-B", str(HARNESS)],
            stdin=subprocess.PIPE,
            stdout=files["out"],
            stderr=files["err"],
            cwd=workdir,
            env=env,
            start_new_session=True,
            pass_fds=pass_fds,
        )
        try:
            try:
                proc.stdin.write(b"".join(_frame(c) for c in confined))
                proc.stdin.close()
            except BrokenPipeError:
                pass
            timed_out = not _exited(proc, max(0.0, config.sandbox_timeout_s - (time.monotonic() - start)))
        finally:
            _kill_all(proc, [c["uid"] for c in confined if c["uid"] is not None], python)
        duration = time.monotonic() - start
        files["out"].seek(0)
        first_line = files["out"].readline(config.sandbox_max_file_mb * (1 << 20)).decode("utf-8", "replace")
        tails = []
        for name in ("err", "program.err"):
            handle = files[name]
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 2000))
            tails.append(handle.read().decode("utf-8", "replace"))
    finally:
        for handle in files.values():
            handle.close()
        for c in confined:
            shutil.rmtree(c["workdir"], ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)
    try:
        report = json.loads(first_line) if first_line.strip() else None
    except json.JSONDecodeError:
        report = None
    return report, timed_out, proc.returncode, tails[0], duration, tails[1]


@cache
def _trusted_prelude(prompt: str, entry_point: str) -> str:
    """The task's starter code without the definition the program completes (its last ``def`` or
    ``class``, the entry point, ``Solution``): helpers such as HumanEval's ``poly`` or LeetCode's
    ``TreeNode`` that the judge runs itself, so the tests use them and not the program's versions."""
    lines = prompt.rstrip().splitlines()
    indent = len(lines[-1]) - len(lines[-1].lstrip()) + 4 if lines else 0
    for suffix in ("", " " * indent + "pass\n"):
        try:
            tree = ast.parse(prompt + "\n" + suffix)
            break
        except SyntaxError:
            continue
    else:
        return ""
    body = tree.body
    if body and isinstance(body[-1], ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        body = body[:-1]
    kept = [
        node
        for node in body
        if not (
            isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and node.name in (entry_point, "Solution")
        )
    ]
    return ast.unparse(ast.Module(body=kept, type_ignores=[]))


def _cut(text: str) -> str:
    return text if len(text) <= TRUNCATE else text[:TRUNCATE] + "..."


def outputs_match(actual: str, expected: str) -> bool:
    """LiveCodeBench's stdin rule (``grade_stdio`` in lcb_runner/evaluation/testing_util.py,
    LiveCodeBench/LiveCodeBench at 8610ffb2): both outputs stripped and split into lines, each line
    stripped; the same number of lines, and each pair equal as text or, split on whitespace, equal
    as ``Decimal`` numbers. So ``1.0`` matches ``1``, but there is no float tolerance: ``0.3333333``
    does not match ``0.33333333``, nor ``50000000000000001`` ``50000000000000000``."""
    got, want = _stripped_lines(actual), _stripped_lines(expected)
    if len(got) != len(want):
        return False
    for a, b in zip(got, want, strict=True):
        if a == b:
            continue
        numbers_a, numbers_b = _decimals(a), _decimals(b)
        if numbers_a is None or numbers_b is None or numbers_a != numbers_b:
            return False
    return True


def _stripped_lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _decimals(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(token) for token in line.split()]
    except InvalidOperation:
        return None


def _values_match(actual, expected) -> bool:
    """LiveCodeBench's functional rule (``grade_call_based``, same file): the returned value equals
    the expected JSON value under Python's ``==``, with no float tolerance. The value crosses from
    the program as JSON, so every tuple arrives as a list (LiveCodeBench converts a top-level tuple
    only) and dict keys as strings."""
    return actual == expected


def _failure(index: int | None, case: TestCase | None, actual: str | None, error: str | None) -> dict:
    return {
        "test": index,
        "input": _cut(case.input) if case else None,
        "expected": _cut(case.output) if case else None,
        "actual": _cut(actual) if actual is not None else None,
        "error": error,
    }


def _compare(task: Task, cases: tuple[TestCase, ...], outputs: list) -> tuple[int, str] | None:
    """(index, actual) of the first wrong output, or None when all match."""
    for index, (case, output) in enumerate(zip(cases, outputs, strict=True)):
        if task.test_type is TestType.STDIN:
            if not outputs_match(output, case.output):
                return index, output
            continue
        kind, text = output
        try:
            expected = json.loads(case.output)
        except json.JSONDecodeError:
            expected = case.output
        if kind != "json" or not _values_match(json.loads(text), expected):
            return index, text
    return None


def run_task_tests(
    task: Task, program: str, config: SandboxConfig | None = None, public_only: bool = False
) -> ExecutionResult:
    """Run ``program`` against the task's tests (or only its public ones, for the editor's run button).

    Args:
        task: the problem; its ``test_type`` picks the harness.
        program: the whole program text (for humaneval-type tasks, the tests run after it).
        config: limits; default ``SandboxConfig()``.
        public_only: run ``task.public_test_cases`` only. With none, the program just runs.

    Returns:
        ExecutionResult: PASSED / FAILED / TIMEOUT / ERROR / MEMORY, a message, the wall time, and the
        first failing test (truncated input, expected and actual output) when there is one.

    Example::

        run_task_tests(task, "def add(a, b):\\n    return a + b\\n").status  # Status.PASSED
    """
    config = config or SandboxConfig()
    cases = task.public_test_cases if public_only else task.test_cases
    humaneval = task.test_type is TestType.HUMANEVAL
    if humaneval:
        spec = {
            "role": "judge",
            "test_code": task.test_code,
            "public": public_only,
            "prelude": _trusted_prelude(task.prompt, task.entry_point),
            "entry_point": task.entry_point,
            "inputs": [[c.input, c.output] for c in cases],
        }
        program_spec = {"role": "program", "program": program, "preamble": ""}
    else:
        spec = {
            "role": task.test_type.value,
            "program": program,
            "entry_point": task.entry_point,
            "inputs": [c.input for c in cases],
            "preamble": PROGRAM_PREAMBLE,
        }
        program_spec = None
    report, timed_out, returncode, stderr_tail, duration, program_stderr = _execute(
        spec, config, program_spec
    )
    well_formed = report is not None and _well_formed(report, task.test_type, len(cases))
    layers = tuple(str(layer) for layer in report.get("isolation", ())) if well_formed else ()
    if well_formed:
        _warn_isolation(layers)

    def result(status: Status, message: str, failure: dict | None = None) -> ExecutionResult:
        return ExecutionResult(status, message, round(duration, 4), failure, layers)

    if timed_out:
        return result(Status.TIMEOUT, f"killed after the {config.sandbox_timeout_s:g}s wall-clock limit")
    if report is None:
        return _crash_result(returncode, stderr_tail, result)
    if well_formed and report["status"] == "died":  # the program's process ended while the judge waited
        return _crash_result(report["returncode"], program_stderr, result)
    if not well_formed:
        return result(
            Status.ERROR, "malformed harness report (did the program write to the harness's channel?)"
        )
    index = report.get("failed_index")
    case = cases[index] if index is not None and index < len(cases) else None
    status = report["status"]
    if status in ("error", "memory", "failed"):
        failure = None
        if case is not None or report.get("test_line"):
            failure = _failure(index, case, report.get("actual"), report["message"])
            if report.get("test_line"):
                failure["input"] = report["test_line"]
        kind = {"error": Status.ERROR, "memory": Status.MEMORY, "failed": Status.FAILED}[status]
        where = (
            f" on test {index}"
            if index is not None
            else f" at `{_cut(report['test_line'])}`"
            if report.get("test_line")
            else ""
        )
        return result(kind, report["message"] + where, failure)
    if humaneval:
        if public_only and not cases:
            return result(Status.PASSED, "ran without error; this task has no public tests")
        return result(
            Status.PASSED, f"passed {len(cases)} public tests" if public_only else "passed the tests"
        )
    wrong = _compare(task, cases, report["outputs"])
    if wrong is not None:
        index, actual = wrong
        return result(
            Status.FAILED, f"wrong answer on test {index}", _failure(index, cases[index], actual, None)
        )
    return result(Status.PASSED, f"passed {len(cases)} test{'s' if len(cases) != 1 else ''}")


def _well_formed(report, test_type: TestType, n_cases: int) -> bool:
    """Whether a report has the harness's shape. Stdin and functional programs share the harness's
    process and could write to its channel, so nothing in a report may crash the evaluator."""
    if not isinstance(report, dict) or report.get("status") not in (
        "ok",
        "error",
        "memory",
        "failed",
        "died",
    ):
        return False
    if report["status"] == "died" and (
        test_type is not TestType.HUMANEVAL  # only a judge reports the program's end
        or type(report.get("returncode")) is not int
    ):
        return False
    if not isinstance(report.get("isolation", []), list):
        return False
    if report["status"] not in ("ok", "died") and not isinstance(report.get("message"), str):
        return False
    index = report.get("failed_index")
    if index is not None and not (isinstance(index, int) and 0 <= index < max(n_cases, 1)):
        return False
    if report["status"] != "ok" or test_type is TestType.HUMANEVAL:
        return all(isinstance(report.get(k, ""), str) for k in ("actual", "test_line"))
    outputs = report.get("outputs")
    if not isinstance(outputs, list) or len(outputs) != n_cases:
        return False
    if test_type is TestType.STDIN:
        return all(isinstance(o, str) for o in outputs)
    return all(
        isinstance(o, list) and len(o) == 2 and o[0] in ("json", "repr") and isinstance(o[1], str)
        for o in outputs
    ) and all(_is_json(o[1]) for o in outputs if o[0] == "json")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _crash_result(returncode: int, stderr_tail: str, result) -> ExecutionResult:
    """The process died without a report: a resource limit's signal, or a crash of the interpreter."""
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return result(Status.TIMEOUT, "killed at the CPU time limit")
    if returncode == -signal.SIGXFSZ:
        return result(Status.ERROR, "exceeded the file size limit")
    if "MemoryError" in stderr_tail:
        return result(Status.MEMORY, f"died at the memory limit: {stderr_tail[-300:]}")
    if returncode == -signal.SIGSEGV:
        return result(
            Status.ERROR, "the interpreter crashed (SIGSEGV: e.g. a C stack overflow or a broken extension)"
        )
    return result(
        Status.ERROR, f"the program's interpreter exited with {returncode}: {stderr_tail[-300:]}".strip()
    )


def worker_count(config: SandboxConfig) -> int:
    """Programs run at once: ``sandbox_workers``, or two per core."""
    return config.sandbox_workers or 2 * (os.cpu_count() or 1)


def run_many(
    items: list[tuple[Task, str]], config: SandboxConfig | None = None, public_only: bool = False
) -> list[ExecutionResult]:
    """Run many (task, program) pairs with a pool of ``sandbox_workers`` threads, each driving one
    child process; results come back in the order of ``items``."""
    config = config or SandboxConfig()
    with ThreadPoolExecutor(max_workers=worker_count(config)) as pool:
        return list(pool.map(lambda item: run_task_tests(item[0], item[1], config, public_only), items))


def validate_references(
    tasks: list[Task], config: SandboxConfig | None = None
) -> tuple[list[Task], list[tuple[Task, ExecutionResult]]]:
    """Run each task's reference against its tests; tasks whose own reference fails are excluded.

    Returns:
        (good, excluded): tasks that pass (and tasks without a reference, which cannot be checked),
        and (task, result) for each excluded task, so callers can report the count and the reasons.
    """
    checked = [t for t in tasks if t.reference is not None]
    results = dict(
        zip((t.task_id for t in checked), run_many([(t, t.reference) for t in checked], config), strict=True)
    )
    good = [t for t in tasks if t.task_id not in results or results[t.task_id].passed]
    excluded = [(t, results[t.task_id]) for t in checked if not results[t.task_id].passed]
    if excluded:
        logger.warning(
            "excluded %d of %d tasks whose tests fail on their own reference: %s",
            len(excluded),
            len(tasks),
            ", ".join(f"{t.task_id} ({r.status.value})" for t, r in excluded[:10]),
        )
    return good, excluded


@dataclass
class TaskCheckConfig(SandboxConfig):
    """A problem set to check before evaluating on it: does it load, and do its references pass?"""

    tasks: str = option("humaneval", "problem set format: humaneval, mbpp, livecodebench or leetcode")
    tasks_path: str | None = option(None, "file or folder of the problem set, or hf:DATASET[:SPLIT]")
    limit: int | None = option(None, "check only the first N tasks")

    def __post_init__(self):
        super().__post_init__()
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


def check_tasks(config: TaskCheckConfig) -> tuple[list[Task], list[Task], list[tuple[Task, ExecutionResult]]]:
    """Load a problem set and run its references: (all tasks, good tasks, excluded with results)."""
    tasks = load_tasks(config.tasks, config.tasks_path, config.limit)
    sandbox = SandboxConfig(**{f.name: getattr(config, f.name) for f in fields(SandboxConfig)})
    good, excluded = validate_references(tasks, sandbox)
    return tasks, good, excluded
