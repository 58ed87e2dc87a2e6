"""Simulated humans: the reference human's rule on hand-made cases, the LLM human's parsing, its local
backend on the tiny model, and its server backend against a real llama.cpp server (integration).

Run: .venv/bin/pytest tests/test_humans.py  (add -m integration for the server test only)
"""

from __future__ import annotations

import copy
import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import LogitsProcessor

from empower import models
from empower.engines import GenerateRequest
from empower.engines.local import LocalEngine
from empower.humans import (
    ChatAPI,
    ChatReply,
    ChatRequest,
    Decision,
    HoldStats,
    HumanConfig,
    HumanServerError,
    HumanView,
    LLMHuman,
    LocalChat,
    PlausibleHuman,
    ReferenceHuman,
    accept_chance,
    agrees,
    align,
    build_human,
    edit_distance,
    generate_held,
    incomplete,
    parse_appended,
    parse_decision,
)
from empower.humans.plausible import Plausibility
from empower.humans.study import PAPER_STUDY, logit
from empower.tasks import Task, TestType

PROMPT = 'def add(a, b):\n    """Return the sum of a and b."""\n'
REFERENCE = PROMPT + "    total = a + b\n    return total\n"


def make_task(reference: str | None = REFERENCE, task_id: str = "toy/add") -> Task:
    return Task(
        task_id=task_id,
        statement="Return the sum of a and b.",
        prompt=PROMPT,
        test_type=TestType.HUMANEVAL,
        test_code="def check(candidate):\n    assert candidate(1, 2) == 3\n",
        entry_point="add",
        reference=reference,
    )


@pytest.fixture(scope="module")
def counter():
    return models.load_tokenizer(models.DEFAULT_MODEL)


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture
def reference_human(counter):
    """Builds reference humans sharing one loaded counting tokenizer."""

    def build(tolerance=0.0, k=10, repair=0.0) -> ReferenceHuman:
        config = HumanConfig(
            human="reference", human_tolerance=tolerance, human_max_tokens=k, human_repair=repair
        )
        return ReferenceHuman(config, counter)

    return build


def respond(human, state, suggestion, task=None):
    [turn] = human.respond([HumanView(task=task or make_task(), state=state, suggestion=suggestion)])
    return turn


# ---------------------------------------------------------------------------------- pure pieces


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [("", "", 0), ("abc", "abc", 0), ("abc", "abd", 1), ("ab", "abc", 1), ("kitten", "sitting", 3)],
)
def test_edit_distance(a, b, distance):
    assert edit_distance(a, b) == distance


def test_agrees_exactly_only_with_prefixes_at_tolerance_zero():
    assert agrees("    total", "    total = a + b\n", 0.0)
    assert agrees("    total = a + b\n", "    total = a + b\n", 0.0)
    assert not agrees("    total = a - b\n", "    total = a + b\n", 0.0)
    assert not agrees("    total = a + b\n\n", "    total = a + b\n", 0.0)  # runs past the intent


def test_agrees_with_near_misses_within_tolerance():
    suggestion, remaining = (
        "    total = a - b\n",
        "    total = a + b\n    return total\n",
    )  # 1 edit in 18 chars
    assert agrees(suggestion, remaining, 0.1)
    assert not agrees(suggestion, remaining, 0.05)


def test_align_finds_the_end_of_a_prefix():
    assert align(PROMPT + "    to", REFERENCE) == len(PROMPT) + 6


def test_align_maps_a_near_miss_tail_onto_the_intent_text_it_replaced():
    state = PROMPT + "    total = a - b"  # '-' stands where the intent has '+'
    assert REFERENCE[align(state, REFERENCE) :] == "\n    return total\n"


def test_align_skips_nothing_for_text_the_intent_lacks():
    state = PROMPT + "    total = a + b\n    # extra\n"  # nothing in the intent corresponds to the comment
    assert REFERENCE[align(state, REFERENCE) :] == "    return total\n"


# ---------------------------------------------------------------------------------- reference human


def test_reference_accepts_a_prefix_of_its_intent_and_writes_on_after_it(reference_human):
    turn = respond(reference_human(), PROMPT, "    total")
    assert turn.decision is Decision.ACCEPT
    assert REFERENCE.startswith(PROMPT + "    total" + turn.written)
    assert turn.written


def test_reference_accepts_the_whole_remaining_intent_and_writes_nothing(reference_human):
    turn = respond(reference_human(), PROMPT, REFERENCE[len(PROMPT) :])
    assert (turn.decision, turn.written) == (Decision.ACCEPT, "")


def test_reference_rejects_a_wrong_suggestion_and_writes_its_own_chunk(reference_human):
    turn = respond(reference_human(), PROMPT, "    return a * b\n")
    assert turn.decision is Decision.REJECT
    assert REFERENCE.startswith(PROMPT + turn.written) and turn.written


def test_reference_chunk_is_at_most_k_tokens(counter, reference_human):
    turn = respond(reference_human(k=3), PROMPT, "")
    assert n_tokens(counter, turn.written) == 3
    assert REFERENCE.startswith(PROMPT + turn.written)


def test_reference_takes_in_a_near_miss_at_tolerance_and_continues_after_it(reference_human):
    suggestion = "    total = a - b\n"
    assert respond(reference_human(0.0), PROMPT, suggestion).decision is Decision.REJECT
    turn = respond(reference_human(0.1), PROMPT, suggestion)
    assert turn.decision is Decision.ACCEPT
    assert turn.written == "    return total\n"  # re-aligned: the bug stays, the intent goes on after it


def test_a_repairing_human_deletes_a_near_miss_it_accepted_from_where_it_differs(reference_human):
    """Accepts the near miss like the fallible human, then deletes it from the first difference on and
    writes its intent from there: the bug does not stay."""
    suggestion = "    total = a - b\n"  # differs from the intent at the "-"
    turn = respond(reference_human(0.1, repair=1.0), PROMPT, suggestion)
    assert (turn.decision, turn.deleted) == (Decision.ACCEPT, len("- b\n"))
    kept = suggestion[: len(suggestion) - turn.deleted]
    assert kept == "    total = a " and REFERENCE.startswith(PROMPT + kept + turn.written)
    assert turn.written.startswith("+ b\n")


@pytest.mark.parametrize(
    ("suggestion", "decision"),
    [("    total", Decision.ACCEPT), ("    return a * b\n", Decision.REJECT), ("", Decision.ACCEPT)],
)
def test_a_repairing_human_deletes_nothing_it_had_no_reason_to(reference_human, suggestion, decision):
    """Exact agreement, a rejection and an empty suggestion: the fallible human's turn, nothing deleted."""
    turn = respond(reference_human(0.1, repair=1.0), PROMPT, suggestion)
    assert turn == respond(reference_human(0.1), PROMPT, suggestion)
    assert (turn.decision, turn.deleted) == (decision, 0)


def test_a_repairing_human_finishes_like_the_others(reference_human):
    assert respond(reference_human(0.1, repair=1.0), REFERENCE, "    x = 1\n").decision is Decision.FINISH


def test_repair_is_a_chance_drawn_the_same_way_every_run(reference_human):
    """At repair 0.5 some near misses are repaired and some kept, and a second human draws the same."""
    states = [PROMPT + "    total = a + b\n" + "\n" * k for k in range(40)]
    suggestions = ["    return totl\n"] * len(states)

    def deleted(human):
        return [respond(human, state, s).deleted for state, s in zip(states, suggestions, strict=True)]

    first = deleted(reference_human(0.2, repair=0.5))
    assert first == deleted(reference_human(0.2, repair=0.5))
    assert 0 < sum(d > 0 for d in first) < len(first)
    assert sum(deleted(reference_human(0.2, repair=0.0))) == 0


def test_align_re_anchors_on_lines_written_after_a_difference():
    intent = "def f(x):\n    y = x + 1\n    z = y * 2\n    w = z - 3\n    return w\n"
    state = "def f(x):\n    y = x + 2\n    z = y * 2\n    w ="
    assert intent[align(state, intent) :] == " z - 3\n    return w\n"


def test_reference_treats_an_empty_suggestion_as_a_no_op_accept(reference_human):
    turn = respond(reference_human(), PROMPT, "")
    assert turn.decision is Decision.ACCEPT
    assert REFERENCE.startswith(PROMPT + turn.written) and turn.written


def test_reference_finishes_when_its_intent_is_written(reference_human):
    assert respond(reference_human(), REFERENCE, "    print(1)\n").decision is Decision.FINISH


def test_reference_alone_writes_exactly_its_reference_then_finishes(reference_human):
    human, state = reference_human(k=4), PROMPT
    for _ in range(50):
        turn = respond(human, state, "")
        if turn.decision is Decision.FINISH:
            break
        state += turn.written
    assert turn.decision is Decision.FINISH
    assert state == REFERENCE


def test_reference_without_a_reference_solution_is_a_clear_error(reference_human):
    with pytest.raises(ValueError, match="toy/none has no reference"):
        respond(reference_human(), PROMPT, "", task=make_task(reference=None, task_id="toy/none"))


def test_config_rejects_a_tolerance_outside_zero_one():
    with pytest.raises(ValueError, match="human_tolerance"):
        HumanConfig(human_tolerance=1.5)
    with pytest.raises(ValueError, match="human_repair"):
        HumanConfig(human_repair=-0.1)


# ---------------------------------------------------------------------------------- LLM human: parsing


@pytest.mark.parametrize(
    ("answer", "decision"),
    [
        ("ACCEPT", Decision.ACCEPT),
        ("Reject.", Decision.REJECT),
        (" accepted\n", Decision.ACCEPT),
        ("I ACCEPT it", Decision.ACCEPT),
        ("maybe", None),
        ("", None),
        ("accept or reject", None),
    ],
)
def test_parse_decision(answer, decision):
    assert parse_decision(answer) is decision


def test_parse_appended_strips_the_fence_and_the_retyped_code():
    reply = "Sure! Here it is:\n```python\n" + PROMPT + "    total = a + b\n```\nThis adds."
    assert parse_appended(PROMPT, reply, closed=True) == ("    total = a + b\n", False)


def test_parse_appended_reads_done_as_finished():
    assert parse_appended(REFERENCE, "DONE", closed=True) == ("", True)


@pytest.mark.parametrize(
    "added, expected",
    [
        ("DONE```", ("", True)),  # "for i in range(a):DONE" compiles, so the hold let it through
        ("\n        DONE\n```", ("", True)),
        ("\n        return a\n    DONE.\n```", ("\n        return a\n", False)),
        ("\n        flag = DONE_FLAG\n```", ("\n        flag = DONE_FLAG\n", False)),  # a name, not the word
    ],
)
def test_parse_appended_strips_a_done_written_into_the_code(added, expected):
    code = PROMPT + "    for i in range(a):"
    assert parse_appended(code, "```python\n" + code + added, closed=True) == expected


class DoneInCodeChat:
    """A backend that, held on unfinished code, writes its DONE into the block (what small models do)."""

    supports_prefill, label = True, "done-in-code"

    def complete(self, requests):
        return [ChatReply(r.prefill + ("DONE```" if r.hold_end else "```"), True) for r in requests]


def test_held_llm_human_never_writes_its_done_into_the_program(counter):
    human = LLMHuman(HumanConfig(human="llm"), DoneInCodeChat(), counter)
    unfinished = PROMPT + "    for i in range(a):"
    [turn] = human.respond([HumanView(make_task(), unfinished, "")])
    assert (turn.decision, turn.written, turn.malformed) == (Decision.FINISH, "", False)
    assert turn.raw == {"acceptor": None, "appender": "```python\n" + unfinished + "DONE```"}


def test_parse_appended_calls_a_cut_off_retype_malformed():
    assert parse_appended(PROMPT, "```python\n" + PROMPT[:20], closed=False) == (None, False)


# ---------------------------------------------------------------------------------- LLM human: backends


def test_local_llm_human_counts_malformed_answers_without_crashing(tiny, tiny_model_path, counter):
    """The random tiny model cannot answer ACCEPT/REJECT: every such answer is counted, none crashes."""
    config = HumanConfig(human="llm", human_model=tiny_model_path, human_max_tokens=5)
    human = LLMHuman(config, LocalChat(tiny_model_path, config, *tiny))
    views = [HumanView(make_task(), PROMPT, "    total = a + b\n"), HumanView(make_task(), PROMPT, "")]
    turns = human.respond(views)
    assert len(turns) == 2
    assert turns[0].malformed and human.malformed == sum(t.malformed for t in turns)
    assert turns[0].decision in (Decision.REJECT, Decision.FINISH)  # unreadable: never accepted
    assert all(n_tokens(counter, t.written) <= 5 for t in turns)
    assert turns[0].raw["acceptor"] is not None


def test_local_llm_human_answers_the_same_from_cached_prompt_prefixes(tiny, tiny_model_path):
    """Turn after turn the state grows; reusing the prompts' key/value states changes no reply."""
    replies = {}
    for size in (0, 32):
        config = HumanConfig(
            human="llm", human_model=tiny_model_path, human_max_tokens=5, human_prefix_cache=size
        )
        backend = LocalChat(tiny_model_path, config, *tiny)
        human, state, seen = LLMHuman(config, backend), PROMPT, []
        for suggestion in ("    total = a + b\n", "    return total\n", ""):
            [turn] = human.respond([HumanView(make_task(), state, suggestion)])
            seen.append(turn.raw)
            state += suggestion or "# done\n"
        replies[size] = seen, backend.engine.prefix_cache
    assert replies[32][0] == replies[0][0]
    assert replies[0][1] is None and replies[32][1].reused_tokens > 0


def test_local_llm_human_asks_a_reasoning_model_not_to_think(tiny, tiny_model_path):
    """Thinking would use up a one-word acceptor reply: the template renders only without it."""
    from test_assistant import THINKING_TEMPLATE

    tokenizer = copy.deepcopy(tiny[1])
    tokenizer.chat_template = THINKING_TEMPLATE
    config = HumanConfig(human="llm", human_model=tiny_model_path, human_max_tokens=3)
    human = LLMHuman(config, LocalChat(tiny_model_path, config, tiny[0], tokenizer))
    [turn] = human.respond([HumanView(make_task(), PROMPT, "    total = a + b\n")])
    assert turn.raw["acceptor"] is not None


class _ChatServer(BaseHTTPRequestHandler):
    """An OpenAI-style chat server that refuses ``chat_template_kwargs`` by name, as OpenAI's API does."""

    bodies: list[dict] = []

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "judge", "object": "model", "owned_by": "me"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        if "chat_template_kwargs" in body:
            message = "Unrecognized request argument supplied: chat_template_kwargs"
            self._send(400, {"error": {"message": message, "type": "invalid_request_error"}})
            return
        reply = {"role": "assistant", "content": "ACCEPT"}
        self._send(200, {"id": "1", "object": "chat.completion", "created": 0, "model": "judge",
                         "choices": [{"index": 0, "message": reply, "finish_reason": "stop"}]})  # fmt: skip

    def log_message(self, *args):
        pass


def test_chat_api_asks_not_to_think_and_drops_the_request_where_it_is_refused_by_name():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _ChatServer.bodies = []
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        config = HumanConfig(human="llm", human_url=url, human_server_api="chat", human_retries=0)
        backend = ChatAPI(url, config)
        request = ChatRequest([{"role": "user", "content": "Accept?"}], max_tokens=4)
        assert [r.text for r in backend.complete([request])] == ["ACCEPT"]  # asked, refused, asked again
        assert [r.text for r in backend.complete([request])] == ["ACCEPT"]  # not asked any more
    finally:
        server.shutdown()
    assert [body.get("chat_template_kwargs") for body in _ChatServer.bodies] == [
        {"enable_thinking": False},
        None,
        None,
    ]


class ClosingChat:
    """A hand-made backend whose every reply closes the code block at once (\"the code is complete\")."""

    supports_prefill, label = True, "closing"

    def complete(self, requests):
        return [ChatReply(r.prefill + "```", True) for r in requests]


def test_llm_human_never_calls_the_bare_starter_code_complete(counter):
    human = LLMHuman(HumanConfig(human="llm"), ClosingChat(), counter)
    [turn] = human.respond([HumanView(make_task(), PROMPT, "")])
    assert (turn.decision, turn.written, turn.malformed) == (Decision.ACCEPT, "", True)
    [turn] = human.respond([HumanView(make_task(), REFERENCE, "")])
    assert turn.decision is Decision.FINISH and not turn.malformed


@pytest.mark.parametrize(
    "code, expected",
    [
        ("def f(n):\n    return sum(1 for i in range(n", True),
        ("def f():\n    for i in x:\n", True),
        ("x = [1,\n", True),
        ("def f():\n    return 1", False),
        ("def f():\n    return 1\n", False),
        ("- N = int(input())\n", False),  # invalid: nothing appended can fix it
    ],
)
def test_incomplete_tells_unfinished_code_from_finished_or_invalid(code, expected):
    assert incomplete(code) is expected


def test_the_appender_may_not_close_code_that_stops_mid_expression(counter):
    human = LLMHuman(HumanConfig(human="llm"), ClosingChat(), counter)
    unfinished = PROMPT + "    return sum(range(a"
    hold = human._appender(HumanView(make_task(), unfinished, ""), unfinished).hold_end
    assert hold is not None and hold("") and hold(", b") and not hold(", b))\n")
    assert human._appender(HumanView(make_task(), REFERENCE, ""), REFERENCE).hold_end is None


def test_local_chat_does_not_end_a_held_reply(tiny, tiny_model_path):
    """The tiny model writes blank lines here; made ending tokens, a held row must write past them."""
    model, tokenizer = tiny
    backend = LocalChat(
        tiny_model_path, HumanConfig(human="llm", human_model=tiny_model_path), model, tokenizer
    )
    messages, prefill = [{"role": "user", "content": "Continue the code."}], "```python\n" + PROMPT
    [free] = backend.complete([ChatRequest(messages, 4, prefill)])
    assert free.text[len(prefill) :].strip() == ""
    backend.ending = {
        i for t, i in tokenizer.get_vocab().items() if not tokenizer.convert_tokens_to_string([t]).strip()
    }
    seen = []
    held, once, unheld = backend.complete(
        [
            ChatRequest(messages, 4, prefill, lambda added: True),
            ChatRequest(messages, 4, prefill, lambda added: seen.append(added) or not added),
            ChatRequest(messages, 4, prefill),
        ]
    )
    assert unheld.text == free.text
    assert held.text[len(prefill) :].strip() and once.text[len(prefill) :].strip()
    added = once.text[len(prefill) :]
    assert seen[0] == "" and all(added.startswith(reply) for reply in seen)  # the reply so far
    assert backend.hold_stats.held >= 2


class BanWhileHeld(LogitsProcessor):
    """The rule as a logits processor: ending tokens banned at every step where the hold is true."""

    def __init__(self, tokenizer, hold, ending):
        self.tokenizer, self.hold, self.ending, self.start = tokenizer, hold, sorted(ending), None

    def __call__(self, input_ids, scores):
        self.start = input_ids.shape[1] if self.start is None else self.start
        if self.hold(self.tokenizer.decode(input_ids[0, self.start :])):
            scores[0, self.ending] = float("-inf")
        return scores


def test_held_generation_is_generation_with_ending_tokens_banned_while_held(tiny):
    """Free generation with a step retaken (ending tokens banned) where a held row ends is exact."""
    model, tokenizer = tiny
    engine = LocalEngine(model, tokenizer, prefix_cache=0)
    ending = {
        i for t, i in tokenizer.get_vocab().items() if not tokenizer.convert_tokens_to_string([t]).strip()
    }
    prompts = [tokenizer(text).input_ids for text in (PROMPT, "x = [", "import os\n", "def f():\n")]
    holds = [lambda added: True, lambda added: len(added) < 6, lambda added: not added.strip(), None]
    # A blank stop string too: a stop a held row may not take (its tokens are ending tokens), which
    # ends generation at a token boundary, past the kept ids.
    requests = [GenerateRequest(p, 8, ("```",) if k % 2 else ("```", "\n")) for k, p in enumerate(prompts)]
    stats = HoldStats()
    held = generate_held(engine, requests, holds, ending, stats)
    for request, hold, got in zip(requests, holds, held, strict=True):
        processors = [BanWhileHeld(tokenizer, hold, ending)] if hold else []
        [banned] = engine.generate([request], logits_processors=processors)
        assert (got.ids, got.text, got.finish) == (banned.ids, banned.text, banned.finish)
        assert got.logprobs == pytest.approx(banned.logprobs, abs=1e-5)
    assert stats.held > 0
    assert [g.text for g in engine.generate(requests)] != [g.text for g in held]  # the holds changed replies


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_a_clear_error_naming_the_url():
    url = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    with pytest.raises(HumanServerError, match=url.replace(".", r"\.")):
        build_human(HumanConfig(human="llm", human_url=url, human_retries=1, human_timeout_s=2))


@pytest.mark.integration
def test_llm_human_plays_turns_against_a_real_llama_cpp_server(llama_server, counter):
    human = build_human(
        HumanConfig(
            human="llm",
            human_url=llama_server,
            human_server_api="chat",
            human_model="smollm2",
            human_max_tokens=10,
        )
    )
    assert human.name.endswith("#smollm2")
    views = [HumanView(make_task(), PROMPT, "    total = a + b\n"), HumanView(make_task(), PROMPT, "")]
    turns = human.respond(views)
    assert len(turns) == 2
    for turn in turns:
        assert turn.raw["appender"] is not None  # the server answered both calls
        assert n_tokens(counter, turn.written) <= 10
    assert human.malformed == sum(t.malformed for t in turns)


@pytest.mark.integration
def test_evaluation_runs_whole_episodes_with_the_llm_human_behind_a_real_server(llama_server, tmp_path):
    """run_eval end to end with the server backend: the path the paper's GPU setup takes (vLLM human)."""
    from empower.env import EvalConfig, run_eval

    rows = [
        {
            "task_id": f"toy/{name}",
            "prompt": f'def {name}(a, b):\n    """{doc}"""\n',
            "entry_point": name,
            "canonical_solution": f"    return {body}\n",
            "test": f"def check(candidate):\n    {check}\n",
        }
        for name, doc, body, check in [
            ("add", "Sum of a and b.", "a + b", "assert candidate(1, 2) == 3"),
            ("mul", "Product of a and b.", "a * b", "assert candidate(2, 3) == 6"),
        ]
    ]
    tasks = tmp_path / "toy.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = EvalConfig(
        assistant=models.resolve(models.TINY_MODEL),
        policy="base-n",
        n=4,
        max_new_tokens=8,
        tasks="humaneval",
        tasks_path=str(tasks),
        human="llm",
        human_url=llama_server,
        human_server_api="chat",
        human_model="smollm2",
        human_max_tokens=10,
        sim_max_rounds=4,
        out=tmp_path / "run",
        metrics_resamples=100,
    )
    run = run_eval(config, progress=False)
    traces = [json.loads(line) for line in (run / "traces.jsonl").read_text().splitlines()]
    assert sorted(t["task_id"] for t in traces) == ["toy/add", "toy/mul"]
    for trace in traces:
        assert trace["human"].endswith("#smollm2") and trace["suggestions"] >= 1
        written = [e for e in trace["events"] if e["kind"] == "wrote"]
        assert written and all(e["tokens"] <= 10 for e in written)  # the server's text, cut to K_H
        assert trace["program"].startswith(
            rows[0]["prompt"] if trace["task_id"] == "toy/add" else rows[1]["prompt"]
        )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["episodes"] == 2 and summary["complete"] is True


# ---------------------------------------------------------------------------------- the plausible human


@pytest.fixture(scope="module")
def tiny_engine(tiny):
    return LocalEngine(*tiny, batch_size=4)


@pytest.fixture
def plausible(counter, tiny_engine):
    """Builds plausible humans scoring with the tiny random model (so surprise carries no meaning here:
    the branches are driven by the rate and the slopes)."""

    def build(rate=0.5, length=0.0, surprise=0.0, repair=0.0, k=10) -> PlausibleHuman:
        config = HumanConfig(
            human="plausible", human_accept_rate=rate, human_length_slope=length,
            human_surprise_slope=surprise, human_repair=repair, human_max_tokens=k,
        )  # fmt: skip
        return PlausibleHuman(config, tiny_engine, counter)

    return build


ALWAYS, NEVER = 1 - 1e-12, 1e-12


def test_the_default_plausible_human_accepts_as_the_papers_study_participants_did():
    """At the study's mean lengths, suggestions as plausible as its own code are accepted at the rates
    real programmers accepted Empower's (8.08%) and Base-20's (6.18%)."""
    config = HumanConfig(human="plausible")
    for arm in PAPER_STUDY:
        assert accept_chance(0.0, arm.mean_length, config) == pytest.approx(arm.acceptance, abs=2e-5)


def test_accept_chance_falls_by_its_slopes_with_length_and_surprise():
    config = HumanConfig(
        human="plausible", human_accept_rate=0.3, human_length_slope=0.5, human_surprise_slope=2.0
    )
    base = logit(accept_chance(0.0, 20, config))
    assert logit(accept_chance(0.0, 40, config)) == pytest.approx(base - 0.5)  # one doubling
    assert logit(accept_chance(1.5, 20, config)) == pytest.approx(base - 3.0)  # 1.5 bits/char more
    assert logit(accept_chance(-1.0, 20, config)) == pytest.approx(base + 2.0)  # less surprising: likelier


def test_bits_per_char_is_the_models_surprise_at_the_text_read_after_its_context(tiny, tiny_engine):
    """Context and text are read together: this tokenizer merges the context's last newline with the
    text's indent, so that token (and its newline) is scored as part of the text."""
    model, tokenizer = tiny
    context, text = "def add(a, b):\n", "    return a + b\n"
    ids = tokenizer(context + text, return_tensors="pt").input_ids
    n_context = len(tokenizer(context).input_ids) - 1  # its "\n" is merged into "\n   "
    assert tokenizer.decode(ids[0, n_context:]) == "\n" + text
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    bits = -sum(logp[j - 1, ids[0, j]].item() for j in range(n_context, ids.shape[1])) / math.log(2)
    [measured, empty] = Plausibility(tiny_engine).bits_per_char([(context, text), ("", text)])
    assert measured == pytest.approx(bits / len("\n" + text), rel=1e-4)
    assert empty > 0  # no context: read after the start token


def test_plausible_human_accepts_on_its_draw_and_writes_its_intent_on_from_there(plausible):
    turn = respond(plausible(ALWAYS), PROMPT, "    total = a + b\n")
    assert (turn.decision, turn.written) == (Decision.ACCEPT, "    return total\n")
    assert turn.raw["chance"] == pytest.approx(1.0) and turn.raw["bits_per_char"] > 0


def test_plausible_human_takes_in_what_its_intent_lacks_and_writes_on(plausible, reference_human):
    """It judges by plausibility, not by its intent: it can accept a bug, which stays."""
    turn = respond(plausible(ALWAYS), PROMPT, "    total = a - b\n")
    assert turn.decision is Decision.ACCEPT and turn.deleted == 0
    assert turn.written == respond(reference_human(0.1), PROMPT, "    total = a - b\n").written


def test_plausible_human_rejects_on_its_draw_and_writes_its_own_chunk(plausible, reference_human):
    turn = respond(plausible(NEVER), PROMPT, "    total = a + b\n")
    assert turn.decision is Decision.REJECT and turn.raw["chance"] < 1e-9
    assert turn.written == respond(reference_human(), PROMPT, "    x = 1\n").written


def test_plausible_human_repairs_what_it_accepted_from_where_it_differs(plausible):
    turn = respond(plausible(ALWAYS, repair=1.0), PROMPT, "    total = a - b\n")
    assert (turn.decision, turn.deleted, turn.written[:4]) == (Decision.ACCEPT, len("- b\n"), "+ b\n")


def test_plausible_human_finishes_and_takes_an_empty_suggestion_without_reading_it(plausible):
    finish = respond(plausible(NEVER), REFERENCE, "    x = 1\n")
    empty = respond(plausible(NEVER), PROMPT, "")
    assert (finish.decision, finish.raw) == (Decision.FINISH, None)
    assert (empty.decision, empty.raw) == (Decision.ACCEPT, None)


def test_plausible_decisions_are_draws_that_replay_and_fall_with_length(plausible):
    states = [PROMPT + "    total = a + b\n" + "\n" * k for k in range(60)]

    def accepted(human, suggestion):
        return [respond(human, state, suggestion).decision is Decision.ACCEPT for state in states]

    line = "    x = [i * i for i in range(100) if i % 3]\n"  # 45 characters: chance about 0.5
    short = accepted(plausible(0.5, length=1.0), line)
    assert 0.3 < sum(short) / len(short) < 0.7  # a chance, not a rule: some of each
    assert short == accepted(plausible(0.5, length=1.0), line)  # the same human draws the same
    long = accepted(plausible(0.5, length=1.0), line * 4)  # two doublings: chance about 0.12
    assert sum(long) < sum(short) / 2


@pytest.mark.integration
def test_plausible_human_finds_the_reference_more_plausible_than_garbage(counter, smol):
    """With a real model (SmolLM2) surprise means something: the intended next line reads as more
    plausible than a line of the same length that does not belong."""
    config = HumanConfig(human="plausible", human_accept_rate=0.5)
    human = PlausibleHuman(config, LocalEngine(*smol), counter)
    [right, wrong] = human.respond(
        [
            HumanView(make_task(), PROMPT, "    total = a + b\n"),
            HumanView(make_task(), PROMPT, "  ]]x) = (;\n=! %%\n"),
        ]
    )
    assert len("    total = a + b\n") == len("  ]]x) = (;\n=! %%\n")
    assert right.raw["bits_per_char"] + 1 < wrong.raw["bits_per_char"]
    assert right.raw["chance"] > wrong.raw["chance"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("human_accept_rate", 0.0), ("human_accept_rate", 1.0), ("human_length_slope", -0.1),
     ("human_surprise_slope", float("inf"))],
)  # fmt: skip
def test_config_rejects_plausible_parameters_out_of_range(field, value):
    with pytest.raises(ValueError, match=field):
        HumanConfig(human="plausible", **{field: value})


def test_a_plausible_human_behind_a_chat_api_is_refused_by_name():
    config = HumanConfig(human="plausible", human_url="http://127.0.0.1:9/v1", human_server_api="chat")
    with pytest.raises(ValueError, match="human-server-api completions"):
        build_human(config)
