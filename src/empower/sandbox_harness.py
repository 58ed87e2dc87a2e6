"""The child side of :mod:`empower.sandbox`: confine this process, then run one program's tests.

Started by the evaluator as ``python -I -S -B sandbox_harness.py`` with a JSON spec on stdin; uses
the standard library only (it runs without site-packages). Before it compiles the program it
(1) enters a new network namespace when permitted, (2) sets rlimits, (3) drops to the given uid/gid
and (4) installs an audit-hook guard; then it runs the tests and writes one JSON line to a private
duplicate of its stdout (the program's own stdout goes to /dev/null, or is captured for stdin tests).

The evaluator, not this file, compares outputs of stdin and functional tests, and enforces the
wall-clock limit. Not meant to be imported.
"""

import io
import json
import os
import sys

CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWUSER = 0x00020000, 0x40000000, 0x10000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
BLOCKED_EVENTS = frozenset({
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
    "os.spawn", "os.fork", "os.forkpty", "pty.spawn", "os.startfile", "resource.setrlimit", "resource.prlimit",
    "sys.remote_exec", "os.chroot",
})
# audit event -> how many leading arguments are paths the program may only touch inside its folder
PATH_EVENTS = {
    "os.remove": 1, "os.rmdir": 1, "os.rename": 2, "os.replace": 2, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1,
    "os.link": 2, "os.symlink": 2, "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1, "os.mkfifo": 1,
    "os.mknod": 1, "sqlite3.connect": 1,
}
_result = None
_isolation = []


def report(**fields):
    """Write the result line and exit at once (no atexit handlers of the program run)."""
    fields["isolation"] = _isolation
    _result.write(json.dumps(fields) + "\n")
    _result.flush()
    os._exit(0)


def cut(text, limit=2000):
    return text if len(text) <= limit else text[:limit] + "..."


def describe(err):
    return cut(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)


def private_tmp(libc, workdir, size_mb):
    """A new mount namespace with fresh, size-capped tmpfs on the world-writable folders, so that
    what a program leaves in /tmp (even with the guard off) vanishes with it. Root only."""
    if libc.unshare(CLONE_NEWNS) != 0 or libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    options = f"size={size_mb}m,mode=1777".encode()
    for folder in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
        if os.path.isdir(folder) and not os.path.islink(folder):
            if libc.mount(b"tmpfs", folder.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) != 0:
                return False
    if not os.path.isdir(workdir):  # the working folder was under a folder now covered: bind it back
        os.makedirs(workdir, mode=0o700)
        if libc.mount(b"/proc/self/cwd", workdir.encode(), None, MS_BIND, None) != 0:
            report(status="error", message="sandbox: could not bind the working folder into the private /tmp")
        os.chdir(workdir)
    return True


def confine(spec):
    """Namespaces, rlimits, unprivileged uid: the OS layers, in the order that needs root."""
    if spec["netns"]:
        import ctypes  # Python 3.11 has no os.unshare

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET | (0 if os.geteuid() == 0 else CLONE_NEWUSER)) == 0:
            _isolation.append("netns")
        if os.geteuid() == 0 and private_tmp(libc, spec["workdir"], spec["tmp_mb"]):
            _isolation.append("tmpfs")
    import resource

    for name, (soft, hard) in spec["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    _isolation.append("rlimits")
    if spec["uid"] is not None:
        try:
            os.setgroups([])
            os.setgid(spec["uid"])
            os.setuid(spec["uid"])
        except OSError as err:  # never run the program with more rights than were asked for
            report(status="error", message=f"sandbox: could not drop privileges: {err}")
        _isolation.append("uid")


def install_guard(workdir):
    """Refuse network, process creation, signals to others, ctypes and writes outside ``workdir``.

    Defence in depth only: it runs in the program's own interpreter, so a determined program can
    evade it; the OS layers of :func:`confine` do not depend on it.
    """
    root = os.path.realpath(workdir)
    pid = os.getpid()
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep

    def inside(path):
        if isinstance(path, int):
            return True  # an already open descriptor
        try:
            full = realpath(fsdecode(path))
        except (TypeError, ValueError):
            return False
        return full == root or full.startswith(root + sep)

    def guard(event, args):
        if event in BLOCKED_EVENTS or event.startswith("ctypes."):
            raise PermissionError(f"blocked by sandbox: {event}")
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS
            if path is not None and writing and not inside(path):
                raise PermissionError(f"blocked by sandbox: writing {path!r} outside the working directory")
        elif event in PATH_EVENTS:
            for path in args[: PATH_EVENTS[event]]:
                if not inside(path):
                    raise PermissionError(f"blocked by sandbox: {event} {path!r} outside the working directory")
        elif event in ("os.kill", "os.killpg") and args[0] not in (pid, 0):
            raise PermissionError(f"blocked by sandbox: {event} of pid {args[0]}")

    sys.addaudithook(guard)
    _isolation.append("guard")


def fresh_namespace():
    return {"__name__": "__main__", "__builtins__": __builtins__}


def execute(code, namespace):
    """None when ``code`` ran (or exited), else (status, message) of what it raised."""
    try:
        exec(code, namespace)
    except SystemExit:
        return None
    except MemoryError:
        return "memory", "MemoryError"
    except BaseException as err:  # anything the program raises is a result, not a harness failure
        return "error", describe(err)
    return None


def run_humaneval(spec, program):
    """Program, then the test code (or the public ``expression == expected`` examples)."""
    namespace = fresh_namespace()
    problem = execute(program, namespace)
    if problem:
        report(status=problem[0], message=problem[1])
    if spec["public"]:
        for index, (expression, expected) in enumerate(spec["inputs"]):
            try:
                actual, wanted = eval(expression, namespace), eval(expected, namespace)
            except MemoryError:
                report(status="memory", message="MemoryError", failed_index=index)
            except BaseException as err:
                report(status="error", message=describe(err), failed_index=index)
            if actual != wanted:
                report(status="failed", message="wrong answer", failed_index=index, actual=cut(repr(actual)))
        report(status="ok")
    try:
        exec(compile(spec["test_code"], "<tests>", "exec"), namespace)
    except BaseException as err:
        import traceback

        lines = [f.lineno for f in traceback.extract_tb(err.__traceback__) if f.filename == "<tests>"]
        line = spec["test_code"].splitlines()[lines[-1] - 1].strip() if lines else ""
        status = "failed" if isinstance(err, AssertionError) else "memory" if isinstance(err, MemoryError) else "error"
        report(status=status, message=describe(err), test_line=cut(line))
    report(status="ok")


def run_functional(spec, program, preamble):
    """``Solution().<entry_point>(*args)`` per test, args one JSON value per line; returns values."""
    namespace = fresh_namespace()
    problem = execute(preamble, namespace) or execute(program, namespace)
    if problem:
        report(status=problem[0], message=problem[1])
    if not isinstance(namespace.get("Solution"), type):
        report(status="error", message="the program defines no class Solution")
    outputs = []
    for index, text in enumerate(spec["inputs"]):
        args = [json.loads(line) for line in text.split("\n") if line.strip()]
        try:
            value = getattr(namespace["Solution"](), spec["entry_point"])(*args)
        except MemoryError:
            report(status="memory", message="MemoryError", failed_index=index)
        except BaseException as err:
            report(status="error", message=describe(err), failed_index=index)
        try:
            outputs.append(["json", json.dumps(value)])
        except (TypeError, ValueError):
            outputs.append(["repr", cut(repr(value))])
    report(status="ok", outputs=outputs)


def run_stdin(spec, program, preamble):
    """The program once per test with the input on fd 0 and ``sys.stdin``; returns what it printed."""
    real_stdin, real_stdout = sys.stdin, sys.stdout
    outputs = []
    for index, text in enumerate(spec["inputs"]):
        path = f".stdin-{index}"
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        fd = os.open(path, os.O_RDONLY)
        if fd != 0:  # 0 itself is free when the previous run closed it, e.g. with open(0).read()
            os.dup2(fd, 0)  # so open(0) and os.read(0, ...) see the input too
            os.close(fd)
        captured = io.BytesIO()
        sys.stdin = io.TextIOWrapper(io.FileIO(0, closefd=False), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(captured, encoding="utf-8", write_through=True)
        namespace = fresh_namespace()
        problem = execute(preamble, namespace) or execute(program, namespace)
        sys.stdout.flush()
        output = captured.getvalue().decode("utf-8", "replace")
        sys.stdin, sys.stdout = real_stdin, real_stdout
        if problem:
            report(status=problem[0], message=problem[1], failed_index=index, actual=cut(output))
        outputs.append(output)
    report(status="ok", outputs=outputs)


def main():
    global _result
    spec = json.loads(sys.stdin.read())
    _result = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.chdir(spec["workdir"])  # before dropping privileges: the folder's parents may be closed to the uid
    confine(spec)
    if spec["guard"]:
        install_guard(spec["workdir"])
    try:
        program = compile(spec["program"], "<program>", "exec")
        preamble = compile(spec["preamble"], "<preamble>", "exec")
    except (SyntaxError, ValueError) as err:
        report(status="error", message=describe(err))
    if spec["test_type"] == "humaneval":
        run_humaneval(spec, program)
    elif spec["test_type"] == "functional":
        run_functional(spec, program, preamble)
    else:
        run_stdin(spec, program, preamble)


if __name__ == "__main__":
    main()
