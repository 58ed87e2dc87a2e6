"""The paper's simulated human: an *acceptor* call (problem, code, suggestion and a unified diff;
accept unless it adds a bug; one word) and an *appender* call that writes the next at most
``human_max_tokens`` tokens of its own solution. Its prompts and the parsing of its answers live
here; where the completions come from is :mod:`empower.humans.backends`.
"""

from __future__ import annotations

import codeop
import difflib
import logging
import re
import warnings

from empower import models
from empower.assistant import cap_tokens, extract_addition
from empower.humans.backends import ChatRequest
from empower.humans.base import Decision, HumanConfig, HumanTurn, HumanView

log = logging.getLogger(__name__)

HUMAN_SYSTEM = "You are a programmer solving a coding problem in an editor with an AI code assistant."

ACCEPTOR_PROMPT = """Problem:
{statement}

Your code so far:
```python
{state}
```

The assistant suggests appending this text at the end of your code:
```python
{suggestion}
```

Your code if you accept, as a diff:
```diff
{diff}```

Accept the suggestion unless it adds a bug or leads away from a correct solution. Do not reject a \
suggestion for being short or unfinished: you can keep writing after it. \
Answer with one word: ACCEPT or REJECT."""

APPENDER_PROMPT = """Problem:
{statement}

Your code so far:
```python
{state}
```

Write the next few tokens of your solution (at most {k} tokens, about one line), continuing exactly \
where the code stops. Reply with only the new code in a ```python block, without repeating the code \
so far. If the code is already a complete solution, reply DONE."""


def parse_decision(answer: str) -> Decision | None:
    """ACCEPT or REJECT from a free-form answer ("Accept.", "REJECTED", "I accept"); None if it says
    neither or both."""
    kinds = {
        Decision.ACCEPT if word.startswith("accept") else Decision.REJECT
        for word in re.findall(r"[a-z]+", answer.lower())
        if word.startswith(("accept", "reject"))
    }
    return kinds.pop() if len(kinds) == 1 else None


# A DONE the appender wrote as code: a reply held open (the code stops mid-construct) cannot end, so
# the model writes its "DONE" into the block, where it would become part of the program.
_DONE_IN_CODE = re.compile(r"(?<![\w.])[ \t]*DONE[.!\s`]*\Z")


def parse_appended(code: str, reply: str, closed: bool) -> tuple[str | None, bool]:
    """``(addition, done)`` from the appender's reply; ``(None, False)`` when malformed.

    DONE (alone) or a reply that ended adding nothing (e.g. the code retyped unchanged) means the
    programmer considers the code complete; a reply cut off before adding anything is malformed. A
    DONE that ends the added code is removed from it, so only the code before it is written.
    """
    if re.fullmatch(r"[`\s]*done[.!\s`]*", reply, re.IGNORECASE):
        return "", True
    addition = _DONE_IN_CODE.sub("", extract_addition(code, reply))
    if addition.strip():
        return addition, False
    return ("", True) if closed else (None, False)


def incomplete(code: str) -> bool:
    """Whether ``code`` stops mid-construct (an open bracket, a block with no body): text appended
    could complete it, unlike invalid code. Only compiled, never run."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return codeop.compile_command(code, symbol="exec") is None
    except (SyntaxError, ValueError, OverflowError):
        return False


def _messages(template: str, **fields) -> list[dict]:
    return [
        {"role": "system", "content": HUMAN_SYSTEM},
        {"role": "user", "content": template.format(**fields)},
    ]


class LLMHuman:
    """The paper's simulated human: an acceptor call, then an appender call, both batched."""

    def __init__(self, config: HumanConfig, backend, tokenizer=None):
        self.config, self.backend = config, backend
        self.tokenizer = tokenizer or models.load_tokenizer(models.DEFAULT_MODEL)  # counts K_H
        self.name = f"llm:{backend.label}"
        self.malformed = 0  # answers that could not be parsed, over this human's life
        self._complete: set[tuple[str, str]] = set()  # (task_id, code) the appender called complete

    def respond(self, views: list[HumanView]) -> list[HumanTurn]:
        turns: list[HumanTurn | None] = [None] * len(views)
        live = []
        for i, view in enumerate(views):
            if (view.task.task_id, view.state) in self._complete:
                turns[i] = HumanTurn(Decision.FINISH)  # said so last turn and nothing changed since
            else:
                live.append(i)
        asked = [i for i in live if views[i].suggestion]
        answers = dict(
            zip(asked, self.backend.complete([self._acceptor(views[i]) for i in asked]), strict=True)
        )
        decisions, codes = {}, {}
        for i in live:
            view = views[i]
            decision = parse_decision(answers[i].text) if i in answers else Decision.ACCEPT
            decisions[i] = decision
            codes[i] = view.state + (view.suggestion if decision is Decision.ACCEPT else "")
        appended = dict(
            zip(live, self.backend.complete([self._appender(views[i], codes[i]) for i in live]), strict=True)
        )
        for i in live:
            view, reply = views[i], appended[i]
            decision = decisions[i]
            addition, done = parse_appended(codes[i], reply.text, reply.closed)
            if done and codes[i].strip() == view.task.prompt.strip():
                addition, done = None, False  # "complete" before writing anything: not a real answer
            malformed = decision is None or addition is None
            if malformed:
                self.malformed += 1
                log.warning(
                    "simulated human (%s) malformed answer on %s: acceptor %r, appender %r",
                    self.name,
                    view.task.task_id,
                    answers[i].text[:80] if i in answers else "",
                    reply.text[:80],
                )
            decision = decision or Decision.REJECT  # never let an unreadable answer insert assistant text
            written = cap_tokens(addition or "", self.tokenizer, self.config.human_max_tokens)[0]
            if done:
                self._complete.add((view.task.task_id, codes[i]))
                if decision is not Decision.ACCEPT or not view.suggestion:
                    decision = Decision.FINISH
            raw = {"acceptor": answers[i].text if i in answers else None, "appender": reply.text}
            turns[i] = HumanTurn(decision, written, malformed=malformed, raw=raw)
        return turns

    def _acceptor(self, view: HumanView) -> ChatRequest:
        after = view.state + view.suggestion
        diff = "".join(
            difflib.unified_diff(
                view.state.splitlines(keepends=True), after.splitlines(keepends=True), "current", "accepted"
            )
        )
        fields = dict(statement=view.task.statement, state=view.state, suggestion=view.suggestion, diff=diff)
        return ChatRequest(_messages(ACCEPTOR_PROMPT, **fields), max_tokens=4)

    def _appender(self, view: HumanView, code: str) -> ChatRequest:
        messages = _messages(
            APPENDER_PROMPT, statement=view.task.statement, state=code, k=self.config.human_max_tokens
        )
        # Locally the reply is started with the code itself, so the model only writes what comes next.
        if self.backend.supports_prefill:  # then K_H tokens (plus a margin for tokenizer differences) suffice
            budget = min(self.config.human_max_new_tokens, self.config.human_max_tokens + 8)
            # A programmer does not stop in the middle of an expression: small models close the code
            # block right after an unfinished line (e.g. a suggestion cut at "range(n") and would end
            # the episode on code that cannot run.
            hold = (lambda added: incomplete(code + added)) if incomplete(code) else None
            return ChatRequest(messages, budget, "```python\n" + code, hold)
        return ChatRequest(messages, self.config.human_max_new_tokens)
