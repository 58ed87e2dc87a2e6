"""Simulated humans behind one interface: shown a state and a suggestion, they decide and write.

Each turn a human returns a :class:`HumanTurn`: ACCEPT (the suggestion is appended, then
``written``), REJECT (only ``written`` is appended) or FINISH (the episode ends after ``written``).

- ``reference``: deterministic and fast. It intends the task's reference program and accepts a
  suggestion that agrees with what it intends to write next (exactly at tolerance 0; near misses at
  tolerance > 0, so it can take in a bug), then writes the next chunk of at most ``human_max_tokens``
  tokens of its intent. The rule is in docs/assistants-and-humans.md.
- ``llm``: the paper's human, two LLM calls per turn: an *acceptor* (problem, code, suggestion and
  a unified diff; accept unless it adds a bug; one word) and an *appender* that writes the next at
  most ``human_max_tokens`` tokens of its own solution. The model runs locally with ``transformers``
  (batched over episodes) or behind any OpenAI-compatible server (``human_url``).

Example::

    human = build_human(HumanConfig(human="reference"))
    [turn] = human.respond([HumanView(task=task, state=task.prompt, suggestion="    return a + b\\n")])
"""

from __future__ import annotations

import codeop
import difflib
import enum
import logging
import os
import re
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from transformers import LogitsProcessor

from empower import models
from empower.assistant import cap_tokens, extract_addition
from empower.configs import option
from empower.engines import Finish, GenerateRequest, encode
from empower.engines.local import LocalEngine, eos_token_ids

if TYPE_CHECKING:
    from empower.tasks import Task

log = logging.getLogger(__name__)


class Decision(str, enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"
    FINISH = "finish"


class HumanKind(str, enum.Enum):
    REFERENCE = "reference"
    LLM = "llm"


@dataclass
class HumanView:
    task: Task
    state: str
    suggestion: str


@dataclass
class HumanTurn:
    decision: Decision
    written: str = ""
    malformed: bool = False  # the model's answer could not be parsed (logged; a default was used)
    raw: dict | None = None  # llm: the model's answers {"acceptor": ..., "appender": ...}, saved in the trace


class Human(Protocol):
    name: str

    def respond(self, views: list[HumanView]) -> list[HumanTurn]: ...


class HumanServerError(ConnectionError):
    """The simulated human's server could not be reached (or refused the request) after retries."""


@dataclass
class HumanConfig:
    human: HumanKind = option(HumanKind.REFERENCE, "simulated human: reference | llm")
    human_model: str = option(
        models.HUMAN_MODEL, "llm: local model spec, or the URL of an OpenAI-compatible server (http...)"
    )
    human_url: str = option(
        "",
        "llm: base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1 (then human_model "
        "names the served model; the server's first model when it serves no such name)",
    )
    human_tolerance: float = option(
        0.0, "reference: largest normalized edit distance of an accepted suggestion (0 = exact agreement)"
    )
    human_max_tokens: int = option(10, "K_H: most tokens the human writes per turn")
    human_tokenizer: str = option(models.DEFAULT_MODEL, "tokenizer counting the human's K_H tokens")
    human_max_new_tokens: int = option(48, "llm: generation budget of the appender (cut to K_H afterwards)")
    human_temperature: float = option(0.0, "llm: sampling temperature (0 = greedy)")
    human_batch_size: int = option(8, "llm (local): prompts per generate() call", resumable=True)
    human_prefix_cache: int = option(
        64,
        "llm (local): prompts whose key/value states are kept for the next turn's prompts (0: off)",
        resumable=True,
    )
    human_concurrency: int = option(8, "llm (server): requests in flight at once", resumable=True)
    human_timeout_s: float = option(120.0, "llm (server): timeout of one request (seconds)", resumable=True)
    human_retries: int = option(
        3, "llm (server): retries with exponential backoff before giving up", resumable=True
    )
    human_device: str = option(
        "", "llm (local): torch device (empty: CUDA when present, else CPU)", resumable=True
    )

    def __post_init__(self):
        self.human = HumanKind(self.human)
        if not 0.0 <= self.human_tolerance <= 1.0:
            raise ValueError(f"human_tolerance must be in [0, 1], got {self.human_tolerance}")
        for name in ("human_max_tokens", "human_max_new_tokens", "human_batch_size", "human_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.human_prefix_cache < 0:
            raise ValueError(f"human_prefix_cache must be >= 0, got {self.human_prefix_cache}")
        if self.human_retries < 0 or self.human_timeout_s <= 0 or self.human_temperature < 0:
            raise ValueError(
                f"need human_retries >= 0, human_timeout_s > 0, human_temperature >= 0; got "
                f"{self.human_retries}, {self.human_timeout_s}, {self.human_temperature}"
            )
        if self.human_url and not self.human_url.startswith(("http://", "https://")):
            raise ValueError(f"human_url must start with http:// or https://, got {self.human_url!r}")


# ---------------------------------------------------------------------------------------------
# The reference human


def align(state: str, intent: str) -> int:
    """Where in ``intent`` the ``state`` ends: the human's position in its own plan.

    1. After the longest common prefix (cut back to a line start), whole lines are matched with
       difflib (blank lines cannot anchor a match); the last matched line is an anchor.
    2. The state's tail after the anchor is aligned against the start of the intent after it: the
       intent prefix with the smallest edit distance to the tail (ties: the length closest to the
       tail's). A tail within edit distance a third of its non-blank length is a near miss of that
       intent text, which
       the human then counts as written; a less similar tail is text the intent lacks, and the human
       goes on from the anchor.
    """
    if intent.startswith(state):
        return len(state)
    common = len(os.path.commonprefix([state, intent]))
    common = state.rfind("\n", 0, common) + 1  # a line start (0 if none)
    state_lines = state[common:].splitlines(keepends=True)
    intent_lines = intent[common:].splitlines(keepends=True)
    matcher = difflib.SequenceMatcher(
        lambda line: not line.strip(), state_lines, intent_lines, autojunk=False
    )
    blocks = [b for b in matcher.get_matching_blocks() if b.size]
    a_end, b_end = (blocks[-1].a + blocks[-1].size, blocks[-1].b + blocks[-1].size) if blocks else (0, 0)
    anchor = common + sum(map(len, intent_lines[:b_end]))
    tail = "".join(state_lines[a_end:])
    if not tail:
        return anchor
    window = intent[anchor : anchor + 2 * len(tail) + 16]
    length, distance = _closest_prefix(tail, window)
    return anchor + length if distance <= len(tail.strip()) / 3 else anchor


def _last_row(a: str, b: str) -> list[int]:
    """Last row of the Levenshtein table: entry ``j`` is the edit distance from ``a`` to ``b[:j]``."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous


def _closest_prefix(text: str, target: str) -> tuple[int, int]:
    """``(j, d)``: the prefix ``target[:j]`` at the smallest edit distance ``d`` from ``text``."""
    row = _last_row(text, target)
    best = min(row)
    return min((j for j, d in enumerate(row) if d == best), key=lambda j: abs(j - len(text))), best


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    return _last_row(a, b)[-1]


def agrees(suggestion: str, remaining: str, tolerance: float) -> bool:
    """Whether a suggestion agrees with the intended continuation ``remaining``.

    Exact agreement: the suggestion is a prefix of ``remaining`` (or all of it). With tolerance t > 0
    also ``edit_distance(suggestion, remaining[:len(suggestion)]) / len(suggestion) <= t``.
    """
    if remaining.startswith(suggestion):
        return True
    if tolerance <= 0:
        return False
    budget = tolerance * len(suggestion)
    target = remaining[: len(suggestion)]
    if len(suggestion) - len(target) > budget:
        return False
    return edit_distance(suggestion, target) <= budget


class ReferenceHuman:
    """Writes the task's reference program; accepts suggestions that agree with it (see :func:`agrees`)."""

    def __init__(self, config: HumanConfig, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer or models.load_tokenizer(config.human_tokenizer)
        tolerance = config.human_tolerance
        self.name = "reference" if tolerance == 0 else f"reference-tol{tolerance:g}"

    def respond(self, views: list[HumanView]) -> list[HumanTurn]:
        return [self._respond(view) for view in views]

    def _respond(self, view: HumanView) -> HumanTurn:
        intent = view.task.reference
        if intent is None:
            raise ValueError(
                f"task {view.task.task_id} has no reference solution; the reference human needs one "
                "(use --human llm, or a problem set with solutions)"
            )
        remaining = intent[align(view.state, intent) :]
        if not remaining.strip():
            return HumanTurn(Decision.FINISH)
        accept = agrees(view.suggestion, remaining, self.config.human_tolerance)
        if accept and view.suggestion:
            state = view.state + view.suggestion
            remaining = intent[align(state, intent) :]
        written = self._chunk(remaining) if remaining.strip() else ""
        return HumanTurn(Decision.ACCEPT if accept else Decision.REJECT, written)

    def _chunk(self, text: str) -> str:
        return cap_tokens(text, self.tokenizer, self.config.human_max_tokens)[0]


# ---------------------------------------------------------------------------------------------
# The LLM human: prompts, parsing, backends

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


@dataclass
class ChatRequest:
    messages: list[dict]
    max_tokens: int
    prefill: str = ""  # the start of the reply, where the backend supports it (local)
    # local: while this holds for the text added after the prefill, the reply may not end
    hold_end: Callable[[str], bool] | None = None


def incomplete(code: str) -> bool:
    """Whether ``code`` stops mid-construct (an open bracket, a block with no body): text appended
    could complete it, unlike invalid code. Only compiled, never run."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return codeop.compile_command(code, symbol="exec") is None
    except (SyntaxError, ValueError, OverflowError):
        return False


def ending_tokens(model, tokenizer) -> list[int]:
    """Tokens that end an appender's reply: end-of-sequence, and any token with a backtick (the
    closing fence starts with one)."""
    return eos_token_ids(model, tokenizer) + [i for token, i in tokenizer.get_vocab().items() if "`" in token]


class HoldEnd(LogitsProcessor):
    """Logits processor: a row whose ``hold`` is true of its reply so far cannot end it yet."""

    def __init__(self, tokenizer, holds: list[Callable[[str], bool] | None], ending: list[int]):
        self.tokenizer, self.holds, self.ending, self.step = tokenizer, holds, ending, 0

    def __call__(self, input_ids, scores):
        for row, hold in enumerate(self.holds):
            if hold is None:
                continue
            reply = (
                self.tokenizer.decode(input_ids[row, input_ids.shape[1] - self.step :]) if self.step else ""
            )
            if hold(reply):
                scores[row, self.ending] = float("-inf")
        self.step += 1
        return scores


@dataclass
class ChatReply:
    text: str  # the whole reply, prefill included
    closed: bool  # ended on its own (end-of-sequence or closing fence), not cut by max_tokens


class LocalChat:
    """Chat completions from a local model, through the in-process engine (batched)."""

    supports_prefill = True

    def __init__(self, spec: str, config: HumanConfig, model=None, tokenizer=None):
        if model is None:
            model, tokenizer = models.load_model(spec, device=config.human_device or None)
        self.config = config
        self.engine = LocalEngine(
            model,
            tokenizer,
            batch_size=config.human_batch_size,
            prefix_cache=config.human_prefix_cache,
            name=spec,
        )
        self.tokenizer = tokenizer
        self.label = spec
        self._ending = ending_tokens(model, tokenizer)  # once: it walks the whole vocabulary

    def complete(self, requests: list[ChatRequest]) -> list[ChatReply]:
        replies = []
        for begin in range(0, len(requests), self.config.human_batch_size):
            batch = requests[begin : begin + self.config.human_batch_size]
            texts = [
                self.tokenizer.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)
                + r.prefill
                for r in batch
            ]
            # The chat template already holds the special tokens.
            prompts = encode(self.tokenizer, texts, add_special_tokens=False)
            holds = [r.hold_end for r in batch]
            gens = self.engine.generate(
                [
                    GenerateRequest(p, r.max_tokens, ("```",), temperature=self.config.human_temperature)
                    for p, r in zip(prompts, batch, strict=True)
                ],
                logits_processors=[HoldEnd(self.tokenizer, holds, self._ending)] if any(holds) else [],
            )
            for r, g in zip(batch, gens, strict=True):
                replies.append(ChatReply(r.prefill + g.text, g.finish in (Finish.EOS, Finish.STOP)))
        return replies


class ServerChat:
    """Chat completions from an OpenAI-compatible server (vLLM, llama.cpp, ...), requests in parallel.

    The ``openai`` client retries connection errors, timeouts, 429 and 5xx with exponential backoff
    (``human_retries`` times); after that a :class:`HumanServerError` names the URL.
    """

    supports_prefill = False

    def __init__(self, url: str, model: str, config: HumanConfig):
        import openai

        self.url, self.config = url, config
        key = os.environ.get("EMPOWER_HUMAN_API_KEY") or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.client = openai.OpenAI(
            base_url=url, api_key=key, timeout=config.human_timeout_s, max_retries=config.human_retries
        )
        served = [m.id for m in self._call(self.client.models.list).data]
        if not served:
            raise HumanServerError(f"simulated human server {url} serves no model")
        self.model = model if model in served else served[0]
        self.label = f"{url}#{self.model}"

    def _call(self, fn, *args, **kwargs):
        import openai

        try:
            return fn(*args, **kwargs)
        except (openai.APIConnectionError, openai.APITimeoutError) as err:
            raise HumanServerError(
                f"simulated human server {self.url} unreachable after {self.config.human_retries} retries "
                f"(timeout {self.config.human_timeout_s:g}s): {err}. Start it or fix --human-url; the run "
                "can be resumed with --resume"
            ) from err
        except openai.APIStatusError as err:
            raise HumanServerError(
                f"simulated human server {self.url} answered HTTP {err.status_code}: {err.message}"
            ) from err

    def _one(self, request: ChatRequest) -> ChatReply:
        response = self._call(
            self.client.chat.completions.create,
            model=self.model,
            messages=request.messages,
            max_tokens=request.max_tokens,
            temperature=self.config.human_temperature,
        )
        choice = response.choices[0]
        return ChatReply(choice.message.content or "", choice.finish_reason == "stop")

    def complete(self, requests: list[ChatRequest]) -> list[ChatReply]:
        with ThreadPoolExecutor(max_workers=self.config.human_concurrency) as pool:
            return list(pool.map(self._one, requests))


def _messages(template: str, **fields) -> list[dict]:
    return [
        {"role": "system", "content": HUMAN_SYSTEM},
        {"role": "user", "content": template.format(**fields)},
    ]


class LLMHuman:
    """The paper's simulated human: an acceptor call, then an appender call, both batched."""

    def __init__(self, config: HumanConfig, backend, tokenizer=None):
        self.config, self.backend = config, backend
        self.tokenizer = tokenizer or models.load_tokenizer(config.human_tokenizer)
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
            turns[i] = HumanTurn(decision, written, malformed, raw)
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


def build_human(config: HumanConfig, *, model=None, tokenizer=None) -> Human:
    """The simulated human of ``config`` (``model``/``tokenizer``: an already loaded local LLM).

    Raises HumanServerError when a server URL is unreachable after retries.
    """
    if config.human is HumanKind.REFERENCE:
        return ReferenceHuman(config)
    url = config.human_url or (
        config.human_model if config.human_model.startswith(("http://", "https://")) else ""
    )
    if url:
        backend = ServerChat(url, "" if url == config.human_model else config.human_model, config)
    else:
        backend = LocalChat(config.human_model, config, model, tokenizer)
    return LLMHuman(config, backend)
