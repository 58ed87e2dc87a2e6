"""The engine interface: the two verbs every role asks of a language model.

- :meth:`Engine.generate` continues token-id prompts under stop rules (stop strings, end-of-sequence,
  a token budget and an optional cumulative-NLL budget) and returns the tokens, their text and each
  token's log-probability;
- :meth:`Engine.score` returns the log-probability of every token of a continuation given a context.

Both are batched: callers hand over every request they have and the engine chooses how to group
them. Log-probabilities are natural logs (as OpenAI-compatible servers report them) of the model's
own distribution, before any sampling temperature; budgets are in bits, like ``eta`` everywhere in
the project. The NLL budget applies the labeling rule (:func:`empower.rule.empower_length`) to
generation, so a threshold suggestion and a training completion are cut by the same code.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

LN2 = math.log(2.0)


class Finish(str, enum.Enum):
    """Why a generation ended."""

    EOS = "eos"  # the model's end-of-sequence token (not part of the generation)
    STOP = "stop"  # one of the request's stop strings (the text ends before it)
    LENGTH = "length"  # ``max_tokens`` reached
    BUDGET = "budget"  # the next token would have brought the cumulative bits to the budget or above
    CANCELLED = "cancelled"  # the caller went away


@dataclass(frozen=True)
class GenerateRequest:
    """One continuation to generate.

    ``prompt`` is token ids (the caller's tokenizer is the engine's, :attr:`Engine.tokenizer`).
    Generation ends at end-of-sequence, after ``max_tokens`` tokens, where the text first contains one
    of ``stop`` (the text ends before it), or before the token that would bring the cumulative NLL of
    the generated tokens to ``budget_bits`` or above. ``temperature`` 0 is greedy; ``top_p`` < 1 samples
    from the smallest set of tokens that holds that much probability. ``top_logprobs``: how many most
    likely alternatives to report per token. ``banned`` tokens are never generated (a server gets them
    as ``logit_bias`` -100); their log-probabilities still come from the model's own distribution.
    """

    prompt: tuple[int, ...]
    max_tokens: int
    stop: tuple[str, ...] = ()
    budget_bits: float = math.inf
    temperature: float = 0.0
    top_p: float = 1.0
    top_logprobs: int = 0
    banned: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "prompt", tuple(self.prompt))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "banned", tuple(self.banned))
        if not self.prompt:
            raise ValueError("a generate request needs at least one prompt token")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.budget_bits > 0:
            raise ValueError(f"budget_bits must be > 0, got {self.budget_bits}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1 or self.top_logprobs < 0:
            raise ValueError(
                f"need 0 < top_p <= 1 and top_logprobs >= 0, got {self.top_p}, {self.top_logprobs}"
            )
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass
class Generation:
    """What a request produced.

    ``ids`` are the generated tokens whose text is (at least partly) in ``text``: a stop string that
    begins inside a token keeps that token and cuts the text in it; end-of-sequence is never included.
    ``logprobs[i]`` is the natural log-probability of ``ids[i]``; ``top_logprobs[i]`` maps the most
    likely alternatives at that step (token id -> log-probability), when the request asked for them.
    """

    ids: list[int]
    text: str
    logprobs: list[float]
    finish: Finish
    stop: str = ""  # the stop string that ended it (finish STOP)
    prompt: tuple[int, ...] = field(default=(), repr=False)
    top_logprobs: list[dict[int, float]] = field(default_factory=list, repr=False)

    @property
    def bits(self) -> list[float]:
        """Negative log2-probability of each token: what eta budgets."""
        return [-lp / LN2 for lp in self.logprobs]


@dataclass(frozen=True)
class ScoreRequest:
    """Score ``continuation`` given ``context`` (at least one token: the first prediction needs it)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "context", tuple(self.context))
        object.__setattr__(self, "continuation", tuple(self.continuation))
        if not self.context:
            raise ValueError("a score request needs at least one context token")


class ServerEngineError(ConnectionError):
    """A server could not be reached, or refused a request, after the retries (the message names it)."""


class Retryable(Exception):
    """A failure worth another try: the connection was lost, the server is busy (429) or failing (5xx)."""


class Engine(Protocol):
    """A language model behind the two verbs. ``tokenizer`` encodes prompts and decodes generations."""

    name: str
    tokenizer: object

    def generate(self, requests: Sequence[GenerateRequest]) -> list[Generation]: ...

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]: ...


def end_ids(tokenizer, configured: int | Sequence[int] | None) -> list[int]:
    """Every token that ends a reply: the tokenizer's EOS and a generation config's ``eos_token_id``."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    ids.update([configured] if isinstance(configured, int) else configured or [])
    return sorted(ids)


def decode_continuation(tokenizer, prompt_ids: Sequence[int], ids: Sequence[int]) -> str:
    """Text of ``ids`` as it continues the prompt (keeps a leading space some tokenizers drop alone)."""
    if not ids:
        return ""
    prefix = tokenizer.decode(list(prompt_ids))
    full = tokenizer.decode(list(prompt_ids) + list(ids))
    return full[len(prefix) :] if full.startswith(prefix) else tokenizer.decode(list(ids))


def encode(tokenizer, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids per text; an empty text (a stdin task's empty first state) becomes one start token."""
    ids = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [row or [start] for row in ids]
