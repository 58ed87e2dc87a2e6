"""Suggestion policies behind one interface: given code states, propose text to append.

Policies (:class:`Policy`):

- ``model``: a (fine-tuned) assistant continues ``build_prompt(state)`` until its end-of-sequence
  token or ``max_new_tokens``;
- ``base``: an instruct model asked through its chat template to retype the current code and extend
  it, the way the paper prompted its assistants; the suggestion is what it added, after stripping
  markdown fences and prose as a completion plugin would;
- ``base-n``: ``base`` cut at ``n`` tokens;
- ``threshold``: training-free Empower decoding. The longest continuation whose cumulative
  negative log-likelihood (bits) under an estimator stays below ``eta`` -- the labeling rule
  applied at inference time. With the generating model as its own estimator, generation stops
  inside ``generate`` (:class:`ThresholdStopping`); another estimator scores the generated tokens
  in one forward pass and the text is cut afterwards.

Generation is batched over many requests (left padding), greedy unless ``assistant_temperature > 0``.

Pieces a streaming server reuses: :func:`threshold_length` (the rule), :class:`StepLogProbs` +
:class:`ThresholdStopping` (the rule as ``transformers`` logits processor + stopping criterion),
:func:`chat_prompt` (the ``base`` prompt), :func:`extract_addition` / :func:`extract_code`
(plugin-style cleanup), :func:`cap_tokens` (the ``base-n`` cap).

Example::

    assistant = build_assistant(AssistantConfig(assistant="smollm2-135m", policy="threshold", eta=4))
    [suggestion] = assistant.suggest([SuggestionRequest(state="def add(a, b):\\n")])
"""

from __future__ import annotations

import difflib
import enum
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import (
    StoppingCriteria,
)

from empower import models
from empower.configs import option
from empower.engines.base import (
    LN2,
    Engine,
    Finish,
    GenerateRequest,
    Generation,
    ScoreRequest,
    decode_continuation,
    encode,
)
from empower.engines.local import LocalEngine, StepLogProbs
from empower.labeling import empower_length
from empower.prompts import PromptTemplate, build_prompt

log = logging.getLogger(__name__)


class Policy(str, enum.Enum):
    MODEL = "model"
    BASE = "base"
    BASE_N = "base-n"
    THRESHOLD = "threshold"


class StopReason(str, enum.Enum):
    """Why a suggestion ended (stored as its string value in :attr:`Suggestion.stop_reason`)."""

    EOS = "eos"  # the model ended its answer (end-of-sequence token, or a closing code fence for base)
    CAP = "cap"  # base-n: cut at n tokens
    THRESHOLD = "threshold"  # the next token would have brought the cumulative bits to eta or above
    MAX_TOKENS = "max_tokens"  # generation budget exhausted
    EMPTY = "empty"  # nothing to suggest


@dataclass
class SuggestionRequest:
    state: str
    statement: str | None = None


@dataclass
class Suggestion:
    text: str
    tokens: int  # in the assistant's tokenizer
    stop_reason: str
    bits: float | None = None  # cumulative NLL of the suggestion (estimator for threshold, else the model)


class Assistant(Protocol):
    name: str

    def suggest(self, requests: list[SuggestionRequest]) -> list[Suggestion]: ...


@dataclass
class AssistantConfig:
    assistant: str = option(
        models.DEFAULT_MODEL, "assistant model spec: embedded name, folder, .gguf or hub id"
    )
    policy: Policy = option(Policy.MODEL, "model | base | base-n | threshold")
    n: int = option(10, "base-n: suggestions are cut at this many tokens")
    eta: float = option(4.0, "threshold: cumulative NLL budget in BITS of one suggestion")
    estimator: str = option("", "threshold: model spec scoring the tokens (empty: the assistant itself)")
    max_new_tokens: int = option(64, "generation budget per suggestion (tokens added to the code)")
    assistant_temperature: float = option(0.0, "0 = greedy; > 0 samples at this temperature")
    assistant_seed: int = option(0, "random seed when sampling")
    prompt_template: PromptTemplate | None = option(
        None,
        "model/threshold: how the state becomes input (plain | statement); default: the template the "
        "model folder was trained with (its empower-model.json), else plain",
    )
    assistant_batch_size: int = option(8, "requests per generate() call", resumable=True)
    base_prefill: bool = option(
        True,
        "base: start the model's reply with a code fence and the current code, so it retypes nothing "
        "(same text as asking it to retype, without generating the retyped part)",
    )
    assistant_device: str = option("", "torch device (empty: CUDA when present, else CPU)", resumable=True)
    assistant_prefix_cache: int = option(
        64,
        "prompts whose key/value states are kept, so a turn encodes only what is new since the last (0: off)",
        resumable=True,
    )

    def __post_init__(self):
        self.policy = Policy(self.policy)
        self.prompt_template = trained_template(self.assistant, self.prompt_template)
        for name in ("n", "max_new_tokens", "assistant_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.assistant_prefix_cache < 0:
            raise ValueError(f"assistant_prefix_cache must be >= 0, got {self.assistant_prefix_cache}")
        if not self.eta > 0:
            raise ValueError(f"eta must be > 0 bits, got {self.eta}")
        if self.assistant_temperature < 0:
            raise ValueError(f"assistant_temperature must be >= 0, got {self.assistant_temperature}")
        if self.estimator and self.policy is not Policy.THRESHOLD:
            raise ValueError(
                f"estimator={self.estimator!r} only applies to policy threshold, not {self.policy.value}"
            )


def trained_template(assistant: str, configured: PromptTemplate | str | None) -> PromptTemplate:
    """The prompt template to use with ``assistant``: the one its folder was trained with.

    A trained model only knows the input it was trained on, so the folder's ``prompt_template`` is
    used when none is configured, and a configured one that differs is an error naming the file
    (rather than a silent mismatch between training and inference prompts).
    """
    configured = PromptTemplate(configured) if configured is not None else None
    trained = models.model_meta(assistant).get("prompt_template")
    if trained is None:
        return configured or PromptTemplate.PLAIN
    trained = PromptTemplate(trained)
    if configured is not None and configured is not trained:
        meta = Path(str(assistant)).expanduser() / "empower-model.json"
        raise ValueError(
            f"prompt_template={configured.value!r}, but {assistant} was trained with {trained.value!r} "
            f"({meta}); leave prompt_template unset to use the trained one"
        )
    return trained


# ---------------------------------------------------------------------------------------------
# The threshold rule and its transformers pieces (reused by the streaming server)


def threshold_length(bits: Sequence[float], eta_bits: float) -> int:
    """Length of the longest prefix whose cumulative bits stay strictly below ``eta_bits``.

    The labeling rule itself (:func:`empower.labeling.empower_length`), so training pairs and
    inference-time decoding cannot disagree.

    >>> threshold_length([0.1, 0.2, 5.0, 0.1], 1.0)
    2
    """
    return empower_length(np.asarray(bits, dtype=np.float64), eta_bits)


class ThresholdStopping(StoppingCriteria):
    """Stops each row once the cumulative bits of its generated tokens reach ``eta_bits``.

    Records the bits of every generated token (``bits(row)``), so with ``eta_bits=inf`` it is a
    tracker. The token that crosses eta is generated (its probability is only known then) and must be
    dropped: keep ``threshold_length(bits(row), eta)`` tokens. End-of-sequence tokens carry no bits.

    Use::

        stop = ThresholdStopping(eta, eos_token_ids)
        model.generate(..., logits_processor=[stop.recorder], stopping_criteria=[stop])
    """

    def __init__(self, eta_bits: float = math.inf, eos_token_ids: Sequence[int] = ()):
        self.eta_bits = eta_bits
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
        self.recorder = StepLogProbs()
        self.done: torch.Tensor | None = None
        self.cum_bits: torch.Tensor | None = None
        self.eos_hit: torch.Tensor | None = None
        self._steps: list[torch.Tensor] = []
        self._counted: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tokens = input_ids[:, -1]
        if self.done is None:
            self.done = torch.zeros_like(tokens, dtype=torch.bool)
            self.eos_hit = torch.zeros_like(self.done)
            self.cum_bits = torch.zeros(tokens.shape, dtype=torch.float64, device=tokens.device)
        step_bits = -self.recorder.last.gather(1, tokens[:, None]).squeeze(1).double() / LN2
        is_eos = torch.isin(tokens, self.eos.to(tokens.device))
        counted = ~self.done & ~is_eos
        self.cum_bits += torch.where(counted, step_bits, 0.0)
        self._steps.append(step_bits.cpu())
        self._counted.append(counted.cpu())
        self.eos_hit |= ~self.done & is_eos
        self.done |= is_eos | (counted & (self.cum_bits >= self.eta_bits))
        return self.done.clone()

    def bits(self, row: int) -> list[float]:
        """Bits of the tokens generated for ``row`` before it stopped (excluding end-of-sequence)."""
        return [float(s[row]) for s, c in zip(self._steps, self._counted, strict=True) if c[row]]


# ---------------------------------------------------------------------------------------------
# Cleanup of chat-model output, as a completion plugin does it

_FENCE_OPEN = re.compile(r"```[^\n`]*\n?")
_PROSE = re.compile(
    r"^(sure|here|certainly|of course|this |the |below|i |i'|note|explanation|okay|ok\b|in this|that )",
    re.IGNORECASE,
)


def extract_code(reply: str) -> str:
    """The code in a chat reply: the first fenced block (unclosed when generation was cut), else
    the reply without leading prose lines ("Here is the code:") and trailing explanation paragraphs."""
    opening = _FENCE_OPEN.search(reply)
    if opening:
        body = reply[opening.end() :]
        end = body.find("```")
        return body if end < 0 else body[:end]
    lines = reply.splitlines(keepends=True)
    start, prose_seen = 0, False
    while start < len(lines) and (
        _PROSE.match(lines[start].strip()) or (prose_seen and not lines[start].strip())
    ):
        prose_seen = True
        start += 1
    for end in range(start + 1, len(lines)):
        if _PROSE.match(lines[end].strip()) and not lines[end - 1].strip():
            return "".join(lines[start:end]).rstrip() + "\n"
    return "".join(lines[start:])


def strip_retyped(state: str, code: str) -> str:
    """What ``code`` adds to ``state`` when the model retyped (part of) the state first.

    In order: an exact retype; a partial retype (nothing added); a retype without the state's trailing whitespace; an approximate
    retype (difflib, >= 80% similar), cut where the state's end aligns; a retype of only the last
    lines of the state; otherwise the whole ``code`` is new.
    """
    if not state.strip():
        return code
    if code.startswith(state):
        return code[len(state) :]
    if state.startswith(code):  # a retype cut off before it got past the state: nothing added
        return ""
    core = state.rstrip()
    if code.startswith(core):
        rest = code[len(core) :]
        return rest[len(_common_prefix(state[len(core) :], rest)) :]
    head = code[: len(core)]
    if len(core) >= 20 and difflib.SequenceMatcher(None, core, head, autojunk=False).ratio() >= 0.8:
        matcher = difflib.SequenceMatcher(None, state, code, autojunk=False)
        last = [b for b in matcher.get_matching_blocks() if b.size][-1]
        # An unmatched tail of the state stands in for as many characters of the retype.
        return code[last.b + last.size + (len(state) - last.a - last.size) :]
    line_starts = [m.end() for m in re.finditer("\n", state)][-5:]
    for begin in [0, *line_starts]:
        tail = state[begin:]
        if tail.strip() and code.startswith(tail):
            return code[len(tail) :]
    return code


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def extract_addition(state: str, reply: str) -> str:
    """The suggestion in a chat model's reply to "retype the code and extend it".

    Small models often start over after the code ("# Original code" and the function again): when
    the addition repeats a long stretch of the state (>= 48 characters over a line break), only
    what follows the repeated state counts (nothing, if the repeat was cut short).
    """
    addition = strip_retyped(state, extract_code(reply))
    match = difflib.SequenceMatcher(None, state, addition, autojunk=False).find_longest_match(
        0, len(state), 0, len(addition)
    )
    if match.size >= 48 and "\n" in state[match.a : match.a + match.size]:
        return strip_retyped(state[match.a :], addition[match.b :])
    return addition


def cap_tokens(text: str, tokenizer, n: int) -> tuple[str, bool]:
    """``text`` cut at ``n`` tokens of ``tokenizer`` (on a character boundary); True when cut."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) <= n:
        return text, False
    return text[: offsets[n][0]], True


def count_tokens(text: str, tokenizer) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


BASE_SYSTEM = "You are a code completion engine inside a programmer's editor. You only write code."


def chat_prompt(tokenizer, state: str, statement: str | None = None, prefill: bool = True) -> str:
    """The ``base`` policy's input: the paper's "retype the current code and extend it" request.

    With ``prefill`` the reply is started with a fence and the code itself, so the model's output is
    the extension directly.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"policy base needs a chat (instruct) model; {tokenizer.name_or_path!r} has no chat template "
            "(use policy model or threshold for plain language models)"
        )
    problem = f"Problem:\n{statement.strip()}\n\n" if statement else ""
    user = (
        f"{problem}Current code:\n```python\n{state}\n```\n"
        "Retype the current code exactly and extend it with the code that comes next. Reply with code only."
    )
    messages = [{"role": "system", "content": BASE_SYSTEM}, {"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + ("```python\n" + state if prefill else "")


# ---------------------------------------------------------------------------------------------
# Policies over an engine

FENCE = "```"


class PolicyAssistant:
    """Every policy over an engine (and, for threshold, optionally a separate estimator engine).

    The one place where a suggestion is made from a state: ``empower eval`` and ``empower serve``
    both call :meth:`suggest`.
    """

    def __init__(self, config: AssistantConfig, engine: Engine, estimator: Engine | None = None):
        self.config = config
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.estimator = estimator
        self.name = assistant_name(config)
        if estimator is not None:
            self._same_vocab = estimator.tokenizer.get_vocab() == self.tokenizer.get_vocab()

    def suggest(self, requests: list[SuggestionRequest]) -> list[Suggestion]:
        """Suggestions for many states at once, in order (the engine batches them)."""
        if self.config.policy in (Policy.BASE, Policy.BASE_N):
            return self._suggest_base(requests)
        return self._suggest_plain(requests)

    def _suggest_plain(self, requests: list[SuggestionRequest]) -> list[Suggestion]:
        cfg = self.config
        threshold = cfg.policy is Policy.THRESHOLD
        prompts = encode(
            self.tokenizer, [build_prompt(r.state, r.statement, cfg.prompt_template) for r in requests]
        )
        # With the assistant as its own estimator the budget ends generation; another estimator
        # scores the free generation, and the same rule cuts it below.
        budget = cfg.eta if threshold and self.estimator is None else math.inf
        # An untuned model may close a markdown fence and explain its code: the fence ends it like EOS.
        gens = self.engine.generate(
            [
                GenerateRequest(p, cfg.max_new_tokens, (FENCE,), budget, cfg.assistant_temperature)
                for p in prompts
            ]
        )
        if threshold and self.estimator is not None and not self._same_vocab:
            return self._cut_by_foreign_estimator(requests, gens)
        bits_rows = [g.bits for g in gens]
        if threshold and self.estimator is not None:
            contexts = encode(self.estimator.tokenizer, [r.state for r in requests])
            scored = self.estimator.score(
                [ScoreRequest(c, g.ids) for c, g in zip(contexts, gens, strict=True)]
            )
            bits_rows = [[-lp / LN2 for lp in row] for row in scored]
        out = []
        for g, bits in zip(gens, bits_rows, strict=True):
            kept = threshold_length(bits, cfg.eta) if threshold else len(g.ids)
            text = (
                g.text if kept == len(g.ids) else decode_continuation(self.tokenizer, g.prompt, g.ids[:kept])
            )
            out.append(_suggestion(text, kept, _reason(kept, g), sum(bits[:kept])))
        return out

    def _cut_by_foreign_estimator(self, requests, gens: list[Generation]) -> list[Suggestion]:
        """Threshold under an estimator with another tokenizer: score the text, cut at a character."""
        est_tok = self.estimator.tokenizer
        scoring, spans = [], []
        for r, g in zip(requests, gens, strict=True):
            enc = est_tok(r.state + g.text, add_special_tokens=True, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
            # The first token that reaches into the generated text starts the continuation.
            first = next((i for i, (_, end) in enumerate(offsets) if end > len(r.state)), len(ids))
            first = max(first, 1)
            scoring.append(ScoreRequest(ids[:first], ids[first:]))
            spans.append(offsets[first:])
        out = []
        for r, g, logprobs, span in zip(requests, gens, self.estimator.score(scoring), spans, strict=True):
            bits = [-lp / LN2 for lp in logprobs]
            kept = threshold_length(bits, self.config.eta)
            end = span[kept - 1][1] - len(r.state) if kept else 0
            cut = g.text if kept == len(bits) else g.text[: max(0, end)]
            reason = StopReason.THRESHOLD if kept < len(bits) else _reason(len(g.ids), g)
            out.append(_suggestion(cut, count_tokens(cut, self.tokenizer), reason, sum(bits[:kept])))
        return out

    def _suggest_base(self, requests: list[SuggestionRequest]) -> list[Suggestion]:
        cfg = self.config
        texts = [chat_prompt(self.tokenizer, r.state, r.statement, cfg.base_prefill) for r in requests]
        # The chat template already holds the special tokens.
        prompts = encode(self.tokenizer, texts, add_special_tokens=False)
        budget = cfg.max_new_tokens if cfg.policy is Policy.BASE else min(cfg.max_new_tokens, cfg.n + 8)
        budgets = [budget] * len(requests)
        if not cfg.base_prefill:  # the model retypes the code (and fences it) before extending it
            budgets = [budget + count_tokens(r.state, self.tokenizer) + 16 for r in requests]
        gens = self.engine.generate(
            [
                GenerateRequest(p, b, (FENCE,), temperature=cfg.assistant_temperature)
                for p, b in zip(prompts, budgets, strict=True)
            ]
        )
        out = []
        for r, g in zip(requests, gens, strict=True):
            reply = ("```python\n" + r.state if cfg.base_prefill else "") + g.text
            addition = extract_addition(r.state, reply)
            capped = False
            if cfg.policy is Policy.BASE_N:
                addition, capped = cap_tokens(addition, self.tokenizer, cfg.n)
            ended = g.finish in (Finish.EOS, Finish.STOP)
            reason = StopReason.CAP if capped else StopReason.EOS if ended else StopReason.MAX_TOKENS
            out.append(_suggestion(addition, count_tokens(addition, self.tokenizer), reason, None))
        return out


def _reason(kept: int, g: Generation) -> StopReason:
    """Why a plain or threshold suggestion of ``kept`` of ``g``'s tokens ended."""
    if kept < len(g.ids) or g.finish is Finish.BUDGET:
        return StopReason.THRESHOLD
    return StopReason.EOS if g.finish in (Finish.EOS, Finish.STOP) else StopReason.MAX_TOKENS


def _suggestion(text: str, tokens: int, reason: StopReason, bits: float | None) -> Suggestion:
    if not text:
        return Suggestion("", 0, StopReason.EMPTY.value, 0.0 if bits is not None else None)
    return Suggestion(text, tokens, reason.value, bits)


def assistant_name(config: AssistantConfig) -> str:
    """A short readable name for traces and tables, e.g. ``smollm2-135m:threshold-eta4``."""
    policy = config.policy.value
    if config.policy is Policy.BASE_N:
        policy = f"base-{config.n}"
    elif config.policy is Policy.THRESHOLD:
        policy = f"threshold-eta{config.eta:g}" + (
            f"@{Path(config.estimator).name}" if config.estimator else ""
        )
    return f"{Path(config.assistant.rstrip('/')).name}:{policy}"


def build_assistant(config: AssistantConfig, *, model=None, tokenizer=None) -> Assistant:
    """The assistant of ``config`` (pass ``model``/``tokenizer`` to share an already loaded model).

    The prompt template comes from the model folder (:func:`trained_template`). Raises ValueError for
    a model spec that does not resolve, a template that contradicts the folder's, or policy base on a
    model without a chat template.
    """
    # Again here: the folder may have been trained after ``config`` was made.
    trained_template(config.assistant, config.prompt_template)
    meta = models.model_meta(config.assistant)
    if "prompt_template" in meta:
        log.info(
            "%s: trained on %s pairs (eta %s bits, estimator %s, tokens counted by %s), prompt template %s",
            config.assistant, meta.get("method"), meta.get("eta_bits"), meta.get("estimator"),
            meta.get("count_tokenizer"), meta["prompt_template"],
        )  # fmt: skip
    device = config.assistant_device or None
    if model is None:
        model, tokenizer = models.load_model(config.assistant, device=device)
    if config.policy in (Policy.BASE, Policy.BASE_N):
        chat_prompt(tokenizer, "")  # fails early, naming the model, when there is no chat template
    engine = LocalEngine(
        model,
        tokenizer,
        batch_size=config.assistant_batch_size,
        prefix_cache=config.assistant_prefix_cache,
        name=config.assistant,
    )
    estimator = None
    if config.policy is Policy.THRESHOLD and config.estimator and config.estimator != config.assistant:
        est_model, est_tokenizer = models.load_model(config.estimator, device=device)
        estimator = LocalEngine(
            est_model,
            est_tokenizer,
            batch_size=config.assistant_batch_size,
            prefix_cache=0,
            name=config.estimator,
        )
    if config.assistant_temperature > 0:
        torch.manual_seed(config.assistant_seed)
    return PolicyAssistant(config, engine, estimator)
