"""Suggestion policies behind one interface: given code states, propose text to append.

Policies (:class:`Policy`):

- ``model``: a (fine-tuned) assistant continues ``build_prompt(state)`` until its end-of-sequence
  token or ``max_new_tokens``;
- ``base``: an instruct model asked through its chat template to retype the current code and extend
  it, the way the paper prompted its assistants; the suggestion is what it added, after stripping
  markdown fences and prose as a completion plugin would;
- ``base-n``: ``base``, the cleaned reply cut at its first ``n`` tokens (:func:`cap_tokens`; default
  10, the paper's Base-10; its human study's Base-20 is ``n=20``);
- ``threshold``: training-free Empower decoding. The longest continuation whose cumulative
  negative log-likelihood (bits) under an estimator stays below ``eta`` -- the labeling rule
  applied at inference time. With the generating model as its own estimator, eta is the engine's
  NLL budget and generation stops there; another estimator scores the generated tokens in one
  forward pass and the same rule (:func:`empower.rule.empower_length`) cuts them.

Every policy runs over an engine (:mod:`empower.engines`), greedy unless ``assistant_temperature >
0``. :class:`PolicyAssistant` is the one place a suggestion is made: ``empower eval`` and ``empower
serve`` both build their requests with it and finish their generations with it.

Example::

    assistant = build_assistant(AssistantConfig(assistant="smollm2-135m", policy="threshold", eta=4))
    [suggestion] = assistant.suggest([SuggestionRequest(state="def add(a, b):\\n")])
"""

from __future__ import annotations

import difflib
import enum
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from empower import models
from empower.configs import check_url, option
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
from empower.engines.local import LocalEngine
from empower.engines.openai import served_model, server_engine
from empower.prompts import PromptTemplate, build_prompt, chat_text
from empower.rule import empower_length

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
    n: int = option(
        10, "base-n: suggestions are cut at this many tokens (the paper's Base-10; its human study used 20)"
    )
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
    assistant_url: str = option(
        "",
        "base URL of an OpenAI-compatible server (vLLM, llama.cpp, empower serve) running the assistant "
        "model; empty: in-process. The assistant spec still names the model (its tokenizer builds the "
        "token-id prompts)",
    )
    assistant_served_model: str = option(
        "", "with assistant_url: the model name on the server (a LoRA adapter's name; empty: its only model)"
    )
    assistant_batch_size: int = option(
        8, "requests per generate() call (with assistant_url: requests in flight at once)", resumable=True
    )
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
        check_url("assistant_url", self.assistant_url)
        if self.assistant_served_model and not self.assistant_url:
            raise ValueError("assistant_served_model names a model on a server: give assistant_url too")
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
    return chat_text(tokenizer, messages) + ("```python\n" + state if prefill else "")


# ---------------------------------------------------------------------------------------------
# Policies over an engine

FENCE = "```"


class PolicyAssistant:
    """Every policy over an engine (and, for threshold, optionally a separate estimator engine).

    The one place where a suggestion is made from a state. ``empower eval`` calls :meth:`suggest`;
    ``empower serve`` builds the same requests (:meth:`request_for`) and finishes them the same way
    (:meth:`finish`), streaming the text as it comes where the policy allows (:attr:`live`).
    """

    def __init__(self, config: AssistantConfig, engine: Engine, estimator: Engine | None = None):
        self.config = config
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.estimator = estimator
        self.name = assistant_name(config)
        if estimator is not None:
            self._same_vocab = estimator.tokenizer.get_vocab() == self.tokenizer.get_vocab()

    @property
    def chat(self) -> bool:
        """base and base-n ask an instruct model, through its chat template, to extend the code."""
        return self.config.policy in (Policy.BASE, Policy.BASE_N)

    @property
    def live(self) -> bool:
        """Whether the generated text is the suggestion as it comes (so it can be streamed): not for
        base (the reply is cleaned and capped once whole), nor for a separate estimator (it scores
        the whole generation)."""
        return not self.chat and self.estimator is None

    def model_input(self, state: str, statement: str | None = None) -> list[int]:
        """The token ids the model continues for ``state``."""
        cfg = self.config
        if self.chat:
            text = chat_prompt(self.tokenizer, state, statement, cfg.base_prefill)
            return encode(self.tokenizer, [text], add_special_tokens=False)[0]  # the template has them
        return encode(self.tokenizer, [build_prompt(state, statement, cfg.prompt_template)])[0]

    def request_for(
        self,
        r: SuggestionRequest,
        *,
        prompt_ids: Sequence[int] | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] = (),
        temperature: float | None = None,
        top_p: float = 1.0,
        top_logprobs: int = 0,
        banned: Sequence[int] = (),
    ) -> GenerateRequest:
        """What to ask the engine for ``r``: the policy's prompt (or ``prompt_ids`` as they are), its
        token budget (base-n generates a few tokens past ``n``, cut by :meth:`finish`), the closing
        code fence as a stop string, and for threshold eta as the NLL budget."""
        cfg = self.config
        budget = max_tokens or cfg.max_new_tokens
        if cfg.policy is Policy.BASE_N:
            budget = min(budget, cfg.n + 8)  # room for the cleanup to drop a few tokens
        if self.chat and not cfg.base_prefill:  # the model retypes the code (and fences it) first
            budget += count_tokens(r.state, self.tokenizer) + 16
        own_threshold = cfg.policy is Policy.THRESHOLD and self.estimator is None
        return GenerateRequest(
            tuple(prompt_ids) if prompt_ids is not None else self.model_input(r.state, r.statement),
            budget,
            # An untuned model closes a markdown fence and explains its code: the fence ends it like EOS.
            tuple(dict.fromkeys([FENCE, *stop])),
            cfg.eta if own_threshold else math.inf,
            cfg.assistant_temperature if temperature is None else temperature,
            top_p,
            top_logprobs,
            tuple(banned),
        )

    def finish(self, r: SuggestionRequest, g: Generation) -> Suggestion:
        """The suggestion a generation for ``r`` makes (for a separate estimator, see :meth:`suggest`)."""
        if not self.chat:
            return _suggestion(g.text, len(g.ids), _reason(len(g.ids), g), sum(g.bits))
        reply = ("```python\n" + r.state if self.config.base_prefill else "") + g.text
        addition = extract_addition(r.state, reply)
        capped = False
        if self.config.policy is Policy.BASE_N:
            addition, capped = cap_tokens(addition, self.tokenizer, self.config.n)
        ended = g.finish in (Finish.EOS, Finish.STOP)
        reason = StopReason.CAP if capped else StopReason.EOS if ended else StopReason.MAX_TOKENS
        return _suggestion(addition, count_tokens(addition, self.tokenizer), reason, None)

    def suggest(self, requests: list[SuggestionRequest]) -> list[Suggestion]:
        """Suggestions for many states at once, in order (the engine batches them)."""
        gens = self.engine.generate([self.request_for(r) for r in requests])
        if self.config.policy is Policy.THRESHOLD and self.estimator is not None:
            if not self._same_vocab:
                return self._cut_by_foreign_estimator(requests, gens)
            return self._cut_by_estimator(requests, gens)
        return [self.finish(r, g) for r, g in zip(requests, gens, strict=True)]

    def _cut_by_estimator(self, requests, gens: list[Generation]) -> list[Suggestion]:
        """Threshold under another estimator with the same vocabulary: it scores the generated tokens
        given the plain code state, and the rule cuts them."""
        contexts = encode(self.estimator.tokenizer, [r.state for r in requests])
        scored = self.estimator.score([ScoreRequest(c, g.ids) for c, g in zip(contexts, gens, strict=True)])
        out = []
        for g, logprobs in zip(gens, scored, strict=True):
            bits = [-lp / LN2 for lp in logprobs]
            kept = empower_length(bits, self.config.eta)
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
            kept = empower_length(bits, self.config.eta)
            end = span[kept - 1][1] - len(r.state) if kept else 0
            cut = g.text if kept == len(bits) else g.text[: max(0, end)]
            reason = StopReason.THRESHOLD if kept < len(bits) else _reason(len(g.ids), g)
            out.append(_suggestion(cut, count_tokens(cut, self.tokenizer), reason, sum(bits[:kept])))
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


def build_assistant(
    config: AssistantConfig, *, model=None, tokenizer=None, pool: models.ModelPool | None = None
) -> Assistant:
    """The assistant of ``config`` (pass ``model``/``tokenizer`` to share an already loaded model, or
    a ``pool`` to load through: roles that name the same model then share it).

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
    pool = pool if pool is not None else models.ModelPool()
    if config.assistant_url:
        url = config.assistant_url
        if models.is_adapter(config.assistant) and not config.assistant_served_model:
            raise ValueError(
                f"{config.assistant} is a LoRA adapter: name the model the server at {url} serves it as "
                "(--assistant-served-model; vLLM: --enable-lora --lora-modules NAME=FOLDER), or its suggestions "
                "could be the base model's"
            )
        tokenizer = models.load_tokenizer(config.assistant)
        engine = server_engine(
            url,
            served_model(url, config.assistant_served_model, os.environ.get("EMPOWER_ASSISTANT_API_KEY")),
            tokenizer,
            api_key=os.environ.get("EMPOWER_ASSISTANT_API_KEY"),
            concurrency=config.assistant_batch_size,
            eos_ids=models.eos_ids(config.assistant, tokenizer),
        )
    else:
        if model is None:
            model, tokenizer = pool.load(config.assistant, device=device)
        engine = LocalEngine(
            model,
            tokenizer,
            batch_size=config.assistant_batch_size,
            prefix_cache=config.assistant_prefix_cache,
            name=config.assistant,
        )
    if config.policy in (Policy.BASE, Policy.BASE_N):
        chat_prompt(tokenizer, "")  # fails early, naming the model, when there is no chat template
    estimator = None
    if config.policy is Policy.THRESHOLD and config.estimator and config.estimator != config.assistant:
        est_model, est_tokenizer = pool.load(config.estimator, device=device)
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
