"""The child side of :mod:`empower.sandbox`: confine this process, then judge or run one program.

Started by the evaluator as ``python -I -S -B sandbox_harness.py`` with one or two specs on stdin
(length-prefixed JSON: a ``program`` spec first means a judged pair, see :func:`main`); uses the
standard library only (it runs without site-packages). Before anything of the task or the
program runs it (1) enters a new network namespace when permitted, (2) sets rlimits, (3) drops to
the given uid/gid and (4) installs an audit-hook guard. Then, by the spec's ``role``:

- ``judge`` (function-style tests): runs the task's trusted starter code and tests; each name the
  program defines is a :class:`Remote` whose calls cross two pipes to the program's process as plain
  data (:func:`encode` / :func:`decode`, JSON, never pickle). It writes the one verdict line.
- ``program``: runs the program, then answers the judge's calls; it never sees the tests, and
  nothing it writes can be read as a verdict.
- ``stdin`` / ``functional``: runs the program and returns its outputs; the evaluator compares them
  with expected outputs the program never sees.

Not meant to be imported.
"""

import io
import json
import os
import sys

CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWUSER = 0x00020000, 0x40000000, 0x10000000
PR_SET_DUMPABLE = 4
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
BLOCKED_EVENTS = frozenset(
    {
        "socket.__new__",
        "socket.connect",
        "socket.bind",
        "socket.sendto",
        "socket.sendmsg",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyaddr",
        "subprocess.Popen",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "os.forkpty",
        "pty.spawn",
        "os.startfile",
        "resource.setrlimit",
        "resource.prlimit",
        "sys.remote_exec",
        "os.chroot",
    }
)
# audit event -> how many leading arguments are paths the program may only touch inside its folder
PATH_EVENTS = {
    "os.remove": 1,
    "os.rmdir": 1,
    "os.rename": 2,
    "os.replace": 2,
    "os.mkdir": 1,
    "os.chmod": 1,
    "os.chown": 1,
    "os.link": 2,
    "os.symlink": 2,
    "os.truncate": 1,
    "os.utime": 1,
    "shutil.rmtree": 1,
    "os.mkfifo": 1,
    "os.mknod": 1,
    "sqlite3.connect": 1,
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
    """Namespaces, rlimits, unprivileged uid: the OS layers, in the order that needs root. The judge
    also turns non-dumpable, so that no process of the same uid may ptrace it or open its /proc files."""
    import ctypes  # Python 3.11 has no os.unshare

    libc = ctypes.CDLL(None, use_errno=True)
    if spec["role"] == "judge":
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    if spec["netns"]:
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
                    raise PermissionError(
                        f"blocked by sandbox: {event} {path!r} outside the working directory"
                    )
        elif event in ("os.kill", "os.killpg") and args[0] not in (pid, 0):
            raise PermissionError(f"blocked by sandbox: {event} of pid {args[0]}")

    sys.addaudithook(guard)
    _isolation.append("guard")


# --------------------------------------------------------------------------- the wire: plain data only
#
# A message holds terms and a table. A term is a JSON scalar (None, bool, int, float including
# NaN/Infinity, str) or ``[index]``, a reference into the table, whose entries are ``[tag, payload]``.
# Sharing and cycles survive (a linked list with a loop), and neither side recurses on depth.


class WireError(ValueError):
    """A message that is not well-formed plain data."""


SEQUENCES = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}
_MISSING = object()


def encode(roots, shared=(), handles=None):
    """(terms of ``roots``, table). Instances of the classes named in ``shared`` travel as their
    attributes; other objects become handles when ``handles`` (the program's registry) is given."""
    table, index, keep, todo = [], {}, [], []

    def term(value):
        kind = type(value)
        if (
            value is None
            or kind is bool
            or kind is str
            or kind is float
            or (kind is int and -(2**63) < value < 2**63)
        ):
            return value
        if kind is not int and kind is not bool:
            for base in (str, float):  # a subclass travels as its plain value, without its methods
                if isinstance(value, base):
                    return base.__str__(value) if base is str else float.__float__(value)
        key = id(value)
        if key not in index:
            index[key] = len(table)
            table.append(None)
            keep.append(value)
            todo.append(value)
        return [index[key]]

    def entry(value):
        kind = type(value)
        if isinstance(value, int):
            return ["int", format(int.__index__(value), "x")]
        for tag, base in SEQUENCES.items():
            if isinstance(value, base):
                return [tag, [term(item) for item in base.__iter__(value)]]
        if isinstance(value, dict):
            return ["dict", [[term(k), term(v)] for k, v in dict.items(value)]]
        if isinstance(value, (bytes, bytearray)):
            return ["bytearray" if isinstance(value, bytearray) else "bytes", bytes(value).hex()]
        if isinstance(value, complex):
            return ["complex", [complex.__complex__(value).real, complex.__complex__(value).imag]]
        if kind is range:
            return ["range", [term(value.start), term(value.stop), term(value.step)]]
        if kind.__name__ == "deque" and kind.__module__ == "collections":
            return ["deque", [term(item) for item in value]]
        if kind.__name__ in shared and hasattr(value, "__dict__"):
            return ["obj", [kind.__name__, [[str(k), term(v)] for k, v in vars(value).items()]]]
        if kind is Remote:
            return ["handle", [value._handle, value._kind]]
        if handles is not None:
            if hasattr(kind, "__next__") and hasattr(kind, "__iter__"):  # a generator, map, zip...: drain it
                return ["iter", [term(item) for item in value]]
            handles[id(value)] = value
            return ["handle", [id(value), cut(kind.__name__, 100)]]
        raise WireError(f"a {kind.__name__} object cannot be sent to the program: only plain data crosses")

    terms = [term(root) for root in roots]
    while todo:
        value = todo.pop()
        table[index[id(value)]] = entry(value)
    return terms, table


def decode(terms, table, classes, handles=None, remote=None):
    """The values of ``terms``: builtin data, instances of ``classes`` (name -> class, created
    without running any of their code but ``__new__``), and handles (``handles`` resolves the
    program's own, ``remote`` makes the judge's stand-ins). Raises WireError on anything else."""
    if not isinstance(table, list) or not all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) for e in table
    ):
        raise WireError("the table is not a list of [tag, payload]")
    values = [_MISSING] * len(table)
    building = set()

    def value(term):
        if term is None or isinstance(term, (bool, int, float, str)):
            return term
        if not (
            isinstance(term, list) and len(term) == 1 and type(term[0]) is int and 0 <= term[0] < len(table)
        ):
            raise WireError(f"not a term: {cut(repr(term), 100)}")
        i = term[0]
        if (
            values[i] is _MISSING
        ):  # a tuple or frozenset, built from its items (it may hold a list, not itself)
            if table[i][0] not in ("tuple", "frozenset"):
                raise WireError("a range or iterator refers to a later range or iterator")
            if i in building:
                raise WireError("a tuple or frozenset that contains itself")
            building.add(i)
            values[i] = SEQUENCES[table[i][0]](value(t) for t in items(i))
        return values[i]

    def items(i):
        payload = table[i][1]
        if not isinstance(payload, list):
            raise WireError(f"the {table[i][0]} entry holds no list")
        return payload

    for i, (tag, payload) in enumerate(table):  # first every object that refers to nothing, so cycles resolve
        if tag == "obj":
            if not (isinstance(payload, list) and len(payload) == 2 and isinstance(payload[0], str)):
                raise WireError("an obj entry is not [class name, attributes]")
            cls = classes.get(payload[0])
            if not isinstance(cls, type):
                raise WireError(f"no class {cut(payload[0], 100)} on this side to rebuild the object with")
            values[i] = cls.__new__(cls)
        elif tag in ("list", "dict", "set", "deque"):
            values[i] = {"list": list, "dict": dict, "set": set, "deque": _deque}[tag]()
        elif tag == "int":
            values[i] = int(payload, 16)
        elif tag in ("bytes", "bytearray"):
            values[i] = (bytes if tag == "bytes" else bytearray).fromhex(payload)
        elif tag == "complex":
            values[i] = complex(float(payload[0]), float(payload[1]))
        elif tag == "handle":
            if not (isinstance(payload, list) and len(payload) == 2 and type(payload[0]) is int):
                raise WireError("a handle entry is not [id, type name]")
            if handles is not None:
                if payload[0] not in handles:
                    raise WireError(f"unknown handle {payload[0]}")
                values[i] = handles[payload[0]]
            else:
                values[i] = remote(payload[0], str(payload[1]))
        elif tag not in ("tuple", "frozenset", "range", "iter"):
            raise WireError(f"unknown tag {cut(tag, 50)!r}")
    for i, (tag, _) in enumerate(table):
        if tag == "range":
            values[i] = range(*[value(t) for t in items(i)])
        elif tag == "iter":
            values[i] = iter([value(t) for t in items(i)])
    for order in ("obj", "list", "deque", "set", "dict"):
        for i, (tag, payload) in enumerate(table):
            if tag != order:
                continue
            target = values[i]
            if tag == "obj":
                attributes = payload[1]
                if not all(isinstance(a, list) and len(a) == 2 and isinstance(a[0], str) for a in attributes):
                    raise WireError("object attributes are not [name, term] pairs")
                vars(target).update((name, value(t)) for name, t in attributes)
            elif tag == "dict":
                for pair in items(i):
                    if not (isinstance(pair, list) and len(pair) == 2):
                        raise WireError("a dict entry is not a [key, value] pair")
                    target[value(pair[0])] = value(pair[1])
            elif tag == "set":
                target.update(value(t) for t in items(i))
            else:
                target.extend(value(t) for t in items(i))
    return [value(t) for t in terms]


def _deque():
    import collections

    return collections.deque()


class Channel:
    """One side's ends of the two pipes between the judge and the program: one JSON line a message."""

    def __init__(self, fds, limit):
        self.reader, self.writer, self.limit = os.fdopen(fds[0], "rb"), os.fdopen(fds[1], "wb"), limit

    def send(self, message):
        self.writer.write(json.dumps(message).encode() + b"\n")
        self.writer.flush()

    def receive(self):
        """The next message (a dict), or raises EOFError / WireError."""
        line = self.reader.readline(self.limit + 1)
        if not line:
            raise EOFError
        if len(line) > self.limit or not line.endswith(b"\n"):
            raise WireError(f"a message longer than the {self.limit // (1 << 20)} MB limit")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise WireError("a message is not a JSON object")
        return message


# --------------------------------------------------------------------------- judge and program


class Remote:
    """The judge's stand-in for a program object that is not plain data (a function, a class, an
    instance of the program's own class): it can be called, its methods can be called, and it can
    be passed back to the program, but never compared or inspected, so it cannot claim a pass."""

    __slots__ = ("_handle", "_kind", "_attr")

    def __init__(self, handle, kind, attr=None):
        self._handle, self._kind, self._attr = handle, kind, attr

    def __call__(self, *args, **kwargs):
        return _judge_call(self._handle, self._attr, args, kwargs)

    def __getattr__(self, name):
        if name.startswith("__") or self._attr is not None:
            raise AttributeError(name)
        return Remote(self._handle, self._kind, name)

    def __repr__(self):
        return f"<the program's {self._kind}{'.' + self._attr if self._attr else ''}>"

    def _refuse(self, *args):
        raise TypeError(
            f"the program returned a {self._kind} object, which is not plain data: only None, bool, "
            "int, float, str, bytes, list, tuple, set, dict (and the task's own classes) cross the "
            "sandbox boundary, so the judge cannot compare or inspect it"
        )

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __len__ = __iter__ = _refuse
    __getitem__ = __contains__ = __add__ = __sub__ = __mul__ = __int__ = __float__ = __index__ = _refuse
    __hash__ = object.__hash__


_channel = None
_trusted = {}  # the judge's namespace


def _judge_fault(status, message):
    """The program broke the channel (died, wrote garbage, sent too much): report, never pass."""
    if status in ("error", "memory"):
        report(status=status, message=cut(message))
    report(
        status="error",
        message=f"the program's process sent a verdict of its own ({cut(repr(status), 40)}) "
        "instead of an answer: only the judge decides",
    )


def _judge_call(handle, attr, args, kwargs):
    """Call a program object with plain-data arguments; the value (and the arguments' new contents,
    written back into the judge's own containers) come back as plain data."""
    import builtins

    shared = sorted(k for k, v in _trusted.items() if isinstance(v, type) and k not in _program_names)
    terms, table = encode([list(args), dict(kwargs)], shared)
    try:
        _channel.send(
            {"call": handle, "attr": attr, "args": terms[0], "kwargs": terms[1], "t": table, "shared": shared}
        )
        reply = _channel.receive()
    except (EOFError, BrokenPipeError):
        program_died()
    except Exception as err:
        _judge_fault("error", f"unreadable reply from the program: {describe(err)}")
    if "status" in reply:
        _judge_fault(reply["status"], str(reply.get("message", "")))
    if "raised" in reply:
        names = reply["raised"] if isinstance(reply["raised"], list) else []
        for name in names:
            cls = getattr(builtins, str(name), None)
            if isinstance(cls, type) and issubclass(cls, Exception):
                try:
                    error = cls(str(reply.get("message", "")))
                except Exception:
                    error = RuntimeError(str(reply.get("message", "")))
                raise error
        _judge_fault("error", str(reply.get("message", "")))
    try:
        value, new_args, new_kwargs = decode(
            [reply["value"], reply["args"], reply["kwargs"]], reply["t"], _trusted, remote=Remote
        )
        originals = list(args) + [kwargs[k] for k in sorted(kwargs)]
        updated = list(new_args) + [new_kwargs[k] for k in sorted(kwargs)]
        for original, new in zip(originals, updated, strict=True):
            write_back(original, new)
    except Exception as err:
        _judge_fault("error", f"unreadable reply from the program: {describe(err)}")
    return value


def write_back(original, new):
    """Give a mutable argument the contents the program left in it (the top level keeps its identity)."""
    if type(original) is not type(new):
        return
    if isinstance(original, (list, bytearray)):
        original[:] = new
    elif isinstance(original, (dict, set)):
        original.clear()
        original.update(new)
    elif hasattr(original, "__dict__") and not isinstance(original, type):
        vars(original).clear()
        vars(original).update(vars(new))


_program_names = set()
_program_pid = None


def program_died():
    """The program's end of the channel closed: report how its process ended (the judge is its
    parent). One that closed the channel and lives on is waited for until the time limit."""
    _, status = os.waitpid(_program_pid, 0)
    report(status="died", returncode=os.waitstatus_to_exitcode(status))


def run_judge(spec):
    """Trusted side: the task's starter code and tests, with the program's names as Remote calls."""
    global _channel
    _channel = Channel(spec["channel"], spec["reply_limit"])
    try:
        hello = _channel.receive()  # written by the program's harness before the program ran
        ready = _channel.receive()
    except EOFError:
        program_died()
    except Exception as err:
        _judge_fault("error", f"unreadable message from the program: {describe(err)}")
    if "status" in hello:  # the program's harness could not confine it
        _judge_fault(hello["status"], str(hello.get("message", "")))
    layers = hello.get("hello") if isinstance(hello.get("hello"), list) else []
    _isolation[:] = [layer for layer in _isolation if layer in layers]
    if "status" in ready:
        _judge_fault(ready["status"], str(ready.get("message", "")))
    names = ready.get("names")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        _judge_fault("error", "unreadable message from the program: no list of names")
    import builtins

    namespace = _trusted
    namespace.update(fresh_namespace())
    try:
        exec(compile(spec["prelude"], "<starter code>", "exec"), namespace)
    except BaseException as err:
        report(status="error", message=f"the task's starter code failed in the judge: {describe(err)}")
    for name in (
        names
    ):  # the program supplies only names trusted code lacks, a builtin only as the entry point (MBPP's `sum`)
        if name not in namespace and (name == spec["entry_point"] or not hasattr(builtins, name)):
            namespace[name] = Remote(name, name)
            _program_names.add(name)
    if spec["public"]:
        for index, (expression, expected) in enumerate(spec["inputs"]):
            try:
                actual, wanted = eval(expression, namespace), eval(expected, namespace)
                same = actual == wanted
            except MemoryError:
                report(status="memory", message="MemoryError", failed_index=index)
            except BaseException as err:
                report(status="error", message=describe(err), failed_index=index)
            if not same:
                report(status="failed", message="wrong answer", failed_index=index, actual=cut(repr(actual)))
        report(status="ok")
    try:
        exec(compile(spec["test_code"], "<tests>", "exec"), namespace)
    except BaseException as err:
        import traceback

        lines = [f.lineno for f in traceback.extract_tb(err.__traceback__) if f.filename == "<tests>"]
        line = spec["test_code"].splitlines()[lines[-1] - 1].strip() if lines else ""
        status = (
            "failed"
            if isinstance(err, AssertionError)
            else "memory"
            if isinstance(err, MemoryError)
            else "error"
        )
        report(status=status, message=describe(err), test_line=cut(line))
    report(status="ok")


def serve_program(spec, program):
    """Untrusted side: run the program, then answer the judge's calls with plain data."""
    channel = Channel(spec["channel"], spec["reply_limit"])
    channel.send({"hello": _isolation})  # before the program runs, so the judge can trust it
    namespace = fresh_namespace()
    problem = execute(program, namespace)
    if problem:
        report(status=problem[0], message=problem[1])
    import types

    names = [
        k
        for k, v in namespace.items()
        if not k.startswith("__") and callable(v) and not isinstance(v, types.ModuleType)
    ]
    channel.send({"names": names})
    handles = {}
    while True:
        try:
            request = channel.receive()
        except EOFError:
            os._exit(0)
        classes = {k: v for k, v in namespace.items() if isinstance(v, type)}
        try:
            args, kwargs = decode([request["args"], request["kwargs"]], request["t"], classes, handles)
            target = (
                namespace[request["call"]] if isinstance(request["call"], str) else handles[request["call"]]
            )
            if request["attr"] is not None:
                target = getattr(target, request["attr"])
            value = target(*args, **kwargs)
            changed = [a for a in args] + [kwargs[k] for k in sorted(kwargs)]
            terms, table = encode(
                [value, changed[: len(args)], {k: kwargs[k] for k in kwargs}], request["shared"], handles
            )
            reply = {"value": terms[0], "args": terms[1], "kwargs": terms[2], "t": table}
        except MemoryError:
            report(status="memory", message="MemoryError")
        except Exception as err:
            reply = {"raised": [c.__name__ for c in type(err).__mro__], "message": describe(err)}
        except BaseException as err:  # SystemExit, KeyboardInterrupt inside a call: the program stopped
            report(status="error", message=describe(err))
        channel.send(reply)


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


def read_frame():
    """One spec from stdin: its length in digits and a newline, then that many bytes of JSON. Read
    unbuffered, so nothing past the frame is in this process's memory when it forks."""
    header = b""
    while not header.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            raise EOFError("the evaluator sent no spec")
        header += byte
    remaining, chunks = int(header), []
    while remaining:
        chunk = os.read(0, min(remaining, 1 << 20))
        if not chunk:
            raise EOFError("the evaluator's spec was cut short")
        chunks.append(chunk)
        remaining -= len(chunk)
    return json.loads(b"".join(chunks))


def main():
    """A ``program`` frame first means a judged pair: fork the program's process off before the
    judge's frame (with the tests) is read, so one interpreter start-up serves both."""
    global _program_pid
    spec = read_frame()
    if spec["role"] != "program":
        run(spec)
    import ctypes  # noqa: F401  (imported once here, used by both sides' confine)
    import resource  # noqa: F401

    to_program, to_judge = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(to_program[1])
        os.close(to_judge[0])
        os.dup2(spec["stderr_fd"], 2)
        os.close(spec["stderr_fd"])
        os.environ["HOME"] = os.environ["TMPDIR"] = spec["workdir"]
        run(spec | {"channel": [to_program[0], to_judge[1]]})
    os.close(to_program[0])
    os.close(to_judge[1])
    os.close(spec["stderr_fd"])
    _program_pid = pid
    run(read_frame() | {"channel": [to_judge[0], to_program[1]]})


def run(spec):
    """Confine this process, then act out the spec's role; never returns (``report`` exits)."""
    global _result
    out = spec["channel"][1] if spec["role"] == "program" else 1  # the program reports only to the judge
    _result = os.fdopen(os.dup(out), "w")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.chdir(spec["workdir"])  # before dropping privileges: the folder's parents may be closed to the uid
    confine(spec)
    if spec["guard"]:
        install_guard(spec["workdir"])
    if spec["role"] == "judge":
        run_judge(spec)
    try:
        program = compile(spec["program"], "<program>", "exec")
        preamble = compile(spec["preamble"], "<preamble>", "exec")
    except (SyntaxError, ValueError) as err:
        if spec["role"] == "program":
            Channel(spec["channel"], 0).send({"hello": _isolation})
        report(status="error", message=describe(err))
    if spec["role"] == "program":
        serve_program(spec, program)
    elif spec["role"] == "functional":
        run_functional(spec, program, preamble)
    else:
        run_stdin(spec, program, preamble)


if __name__ == "__main__":
    main()
