"""The LLM human's rule that a reply may not end on incomplete code, on each kind of backend.

States: HumanEval reference solutions cut right after their first ``(`` (code that stops
mid-expression, which ``incomplete`` calls unfinished). For each state the appender is asked to
continue, by the same model (SmolLM2-135M) behind three backends:

- in-process with the hold (``generate_held``: a step where a held reply ends is retaken with the
  ending tokens banned);
- ``empower serve`` through the completions API (token ids, prefilled, the same hold, the bans sent
  as ``logit_bias``: what a vLLM human does; tests/test_vllm.py checks vLLM's replies equal the
  in-process ones);
- in-process without the hold (what the model does unconstrained);
- llama.cpp's server through its chat API (``--human-server-api chat``: no prefill, no hold).

Reported per backend: replies that ended on their own while the code was still incomplete (the rule
broken), replies that could not be parsed, and how many of the additions differ from the held
in-process human's, and how many steps were retaken. Run: ``python -m bench human_server``.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from empower import models
from empower.humans import (
    HumanConfig,
    HumanServerApi,
    HumanView,
    LLMHuman,
    LocalChat,
    build_human,
    incomplete,
)
from empower.humans.llm import parse_appended
from empower.tasks import load_tasks

TASKS = 40


def _states() -> list[tuple]:
    out = []
    for task in load_tasks("humaneval", limit=TASKS):
        body = task.reference[len(task.prompt) :]
        cut = body.find("(")
        if cut >= 0 and incomplete(task.prompt + body[: cut + 1]):
            out.append((task, task.prompt + body[: cut + 1]))
    return out


def _server(command: list[str], port: int, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [*command, "--port", str(port)], stdout=open(log, "w"), stderr=subprocess.STDOUT
    )
    _wait(process, port, log)
    return process


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(process: subprocess.Popen, port: int, log: Path) -> None:
    while True:  # readiness, not a time limit
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-1000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)


def _measure(label: str, human: LLMHuman, states, hold: bool) -> dict:
    requests = []
    for task, code in states:
        request = human._appender(HumanView(task, code, ""), code)
        if not hold:
            request.hold_end = None
        requests.append(request)
    stats = getattr(human.backend, "hold_stats", None)
    before = stats.held if stats else 0
    start = time.perf_counter()
    replies = human.backend.complete(requests)
    seconds = time.perf_counter() - start
    additions, broken, malformed = [], 0, 0
    for (_, code), reply in zip(states, replies, strict=True):
        addition, _ = parse_appended(code, reply.text, reply.closed)
        additions.append(addition)
        if addition is None:
            malformed += 1
        elif reply.closed and incomplete(code + addition):
            broken += 1
    print(
        f"{label}: {broken} ended on incomplete code, {malformed} malformed, {seconds:.1f} s, {stats}",
        flush=True,
    )
    retaken = stats.held - before if stats else "-"
    return dict(label=label, broken=broken, malformed=malformed, additions=additions, retaken=retaken)


def main() -> str:
    states = _states()
    config = HumanConfig(human="llm", human_model=models.DEFAULT_MODEL, human_batch_size=8)
    local = LLMHuman(config, LocalChat(models.DEFAULT_MODEL, config))
    rows = [_measure("in-process, held", local, states, True)]
    port, log = _port(), Path(tempfile.gettempdir()) / "bench-serve.log"
    process = _server([sys.executable, "-m", "empower", "serve", "--assistant", models.DEFAULT_MODEL,
                       "--model-name", "smollm2"], port, log)  # fmt: skip
    try:
        served = HumanConfig(
            human="llm", human_model=models.DEFAULT_MODEL, human_url=f"http://127.0.0.1:{port}/v1"
        )
        rows.append(_measure("empower serve, completions API, held", build_human(served), states, True))
    finally:
        process.terminate()
        process.wait()
    rows.append(_measure("in-process, not held", local, states, False))
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        print("llama-cpp-python not installed (make install-servers): no chat-API row")
    else:
        port, log = _port(), Path(tempfile.gettempdir()) / "bench-llama.log"
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(models.embedded_gguf("smollm2-135m")),
                   "--host", "127.0.0.1", "--n_ctx", "2048", "--model_alias", "smollm2"]  # fmt: skip
        process = _server(command, port, log)
        try:
            chat = HumanConfig(human="llm", human_model="smollm2-135m", human_url=f"http://127.0.0.1:{port}/v1",
                               human_server_api=HumanServerApi.CHAT)  # fmt: skip
            rows.append(_measure("llama.cpp, chat API", build_human(chat), states, True))
        finally:
            process.terminate()
            process.wait()
    held = rows[0]["additions"]
    lines = [
        "## The LLM human's hold on incomplete code, per backend",
        "",
        f"{len(states)} HumanEval references (of the first {TASKS}) cut right after their first `(`; the",
        "appender (SmolLM2-135M, greedy, K_H = 10) continues each. *Broken*: the reply ended on its own",
        "while the code was still incomplete. *Differs*: its addition is not the held in-process one.",
        "",
        "| backend | broken | malformed | differs | steps retaken |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        differs = sum(a != b for a, b in zip(row["additions"], held, strict=True))
        lines.append(
            f"| {row['label']} | {row['broken']}/{len(states)} | {row['malformed']}/{len(states)} | "
            f"{differs}/{len(states)} | {row['retaken']} |"
        )
    return "\n".join(lines)
