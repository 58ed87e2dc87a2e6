"""The in-process engine: a ``transformers`` causal LM, batched, with the prompt prefix cache.

Requests are grouped by temperature, sorted by prompt length and run ``batch_size`` at a time in one
left-padded ``generate`` call. Every stop rule is per row, inside generation (:class:`RowStops`): a
row ends at its own stop strings, token budget or NLL budget while the others go on, and a finished
row costs nothing more than its padding.

Example::

    model, tokenizer = models.load_model("smollm2-135m")
    engine = LocalEngine(model, tokenizer)
    prompt = tokenizer("def add(a, b):\\n").input_ids
    [g] = engine.generate([GenerateRequest(prompt, max_tokens=32, stop=("\\n\\n",), budget_bits=4.0)])
    g.text, g.finish, g.bits
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from empower.engines.base import (
    LN2,
    Finish,
    GenerateRequest,
    Generation,
    ScoreRequest,
    decode_continuation,
    end_ids,
)
from empower.prefix_cache import PrefixCache, batch_inputs, prefix_cache_for, store_prompts
from empower.rule import empower_length


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a reply: the tokenizer's EOS and the model's generation-config EOS ids."""
    return end_ids(tokenizer, getattr(model.generation_config, "eos_token_id", None))


class Ban(LogitsProcessor):
    """Each row's banned tokens (:attr:`GenerateRequest.banned`) are never sampled."""

    def __init__(self, banned: list[tuple[int, ...]]):
        self.rows = [(row, list(ids)) for row, ids in enumerate(banned) if ids]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, ids in self.rows:
            scores[row, ids] = float("-inf")
        return scores


class StepLogProbs(LogitsProcessor):
    """Keeps the log-probabilities of the current step; must come first so it sees the raw logits."""

    def __init__(self):
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


class RowStops(StoppingCriteria):
    """Per-row stop rules of a batch, with every kept token's log-probability recorded.

    A row stops at end-of-sequence, at its ``max_tokens``, once its text contains one of its stop
    strings, or before the token that would bring its cumulative bits to ``budget_bits``: that token
    is generated (its probability is only known then) and dropped at once, by
    :func:`empower.rule.empower_length`, the labeling rule. ``on_token(row, token, logprob, top)``
    hears each kept token as it comes (streaming), and a row whose ``cancelled(row)`` turns true stops
    at the next step.

    Use::

        stops = RowStops(requests, eos_ids, tokenizer)
        model.generate(..., logits_processor=[stops.recorder], stopping_criteria=[stops])
    """

    def __init__(
        self,
        requests: Sequence[GenerateRequest],
        eos_ids: Sequence[int],
        tokenizer,
        on_token: Callable[[int, int, float, dict[int, float]], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
        on_finish: Callable[[int, Generation], None] | None = None,
    ):
        self.requests = list(requests)
        self.on_finish = on_finish
        self.generations: list[Generation | None] = [None] * len(requests)
        self.tokenizer = tokenizer
        self.eos = set(eos_ids)
        self.on_token, self.cancelled = on_token, cancelled
        self.recorder = StepLogProbs()
        self.ids: list[list[int]] = [[] for _ in requests]
        self.logprobs: list[list[float]] = [[] for _ in requests]
        self.top: list[list[dict[int, float]]] = [[] for _ in requests]
        self.finish: list[Finish | None] = [None] * len(requests)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        logp = self.recorder.last.gather(1, input_ids[:, -1:]).squeeze(1).double().cpu().tolist()
        tokens = input_ids[:, -1].cpu().tolist()
        for row, request in enumerate(self.requests):
            if self.finish[row] is None:
                self.finish[row] = self._step(row, request, tokens[row], logp[row])
                if self.finish[row] is not None:
                    self._close(row)
        return torch.tensor([f is not None for f in self.finish], device=input_ids.device)

    def close(self) -> list[Generation]:
        """Every row's generation; rows still open when ``generate`` returned ran out of length."""
        for row, finish in enumerate(self.finish):
            if finish is None:
                self.finish[row] = Finish.LENGTH
                self._close(row)
        return self.generations

    def _close(self, row: int) -> None:
        request = self.requests[row]
        generation = finish_row(
            self.tokenizer, request, self.ids[row], self.logprobs[row], self.finish[row], self.top[row]
        )
        self.generations[row] = generation
        if self.on_finish is not None:
            self.on_finish(row, generation)

    def _step(self, row: int, request: GenerateRequest, token: int, logprob: float) -> Finish | None:
        if self.cancelled is not None and self.cancelled(row):
            return Finish.CANCELLED
        if token in self.eos:
            return Finish.EOS
        if math.isfinite(request.budget_bits):  # no rule to apply on the unbudgeted hot path
            bits = [-lp / LN2 for lp in (*self.logprobs[row], logprob)]
            if empower_length(bits, request.budget_bits) < len(bits):
                return Finish.BUDGET
        self.ids[row].append(token)
        self.logprobs[row].append(logprob)
        top = {}
        if request.top_logprobs:
            values, ids = self.recorder.last[row].topk(request.top_logprobs)
            top = dict(zip(ids.tolist(), values.double().tolist(), strict=True))
            self.top[row].append(top)
        if self.on_token is not None:
            self.on_token(row, token, logprob, top)
        if request.stop and _first_stop(self._text(row), request.stop)[0] is not None:
            return Finish.STOP
        return Finish.LENGTH if len(self.ids[row]) >= request.max_tokens else None

    def _text(self, row: int) -> str:
        # A few prompt tokens are enough context for the decoder to keep a leading space.
        return decode_continuation(self.tokenizer, self.requests[row].prompt[-4:], self.ids[row])


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int | None, str]:
    """(where the earliest stop string begins in ``text``, that string), or (None, "")."""
    found = [(at, s) for s in stops if (at := text.find(s)) >= 0]
    return min(found) if found else (None, "")


def finish_row(
    tokenizer,
    request: GenerateRequest,
    ids: list[int],
    logprobs: list[float],
    finish: Finish,
    top: list[dict[int, float]] | None = None,
) -> Generation:
    """The generation of one row from its kept tokens: the text, cut before a stop string when one
    ended it (the tokens that begin before the stop string are kept)."""
    text = decode_continuation(tokenizer, request.prompt, ids)
    at, word = _first_stop(text, request.stop) if finish is Finish.STOP else (None, "")
    if at is None:
        return Generation(ids, text, logprobs, finish, "", request.prompt, top or [])
    kept = _tokens_before(tokenizer, request.prompt, ids, at)
    return Generation(
        ids[:kept], text[:at], logprobs[:kept], finish, word, request.prompt, (top or [])[:kept]
    )


def _tokens_before(tokenizer, prompt: Sequence[int], ids: list[int], at: int) -> int:
    """How many of ``ids`` begin before character ``at`` of their text (a stop string begins there)."""
    return next(
        (k for k in range(len(ids) + 1) if len(decode_continuation(tokenizer, prompt, ids[:k])) >= at),
        len(ids),
    )


class LocalEngine:
    """A ``transformers`` causal LM behind :class:`~empower.engines.base.Engine`.

    Args:
        model, tokenizer: from :func:`empower.models.load_model`.
        batch_size: requests (rows) per ``generate`` call and per scoring forward pass.
        prefix_cache: prompts whose key/value states are kept (0: none), so a turn of an episode
            encodes only what is new since the last one.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 8, prefix_cache: int = 64, name: str = ""):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.name = name or getattr(model, "name_or_path", "") or type(model).__name__
        self.batch_size = batch_size
        tokenizer.padding_side = "left"
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.prefix_cache = prefix_cache_for(model, prefix_cache)

    def generate(
        self,
        requests: Sequence[GenerateRequest],
        logits_processors: Sequence[LogitsProcessor] = (),
        *,
        on_token: Callable[[int, int, float, dict[int, float]], None] | None = None,
        on_finish: Callable[[int, Generation], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[Generation]:
        """Every request's generation, in order.

        ``logits_processors`` (in-process only) constrain sampling after the log-probabilities are
        recorded; they see the rows of one batch, so requests must then fit one batch.
        ``on_token(i, token, logprob, top)`` hears each kept token of ``requests[i]`` as it is made,
        ``on_finish(i, generation)`` hears it end (before the rest of its batch does), and
        ``cancelled(i)`` stops ``requests[i]`` at the next step (finish ``cancelled``).
        """
        if logits_processors and len(requests) > self.batch_size:
            raise ValueError("logits processors see one batch: pass at most batch_size requests")
        key = lambda i: (requests[i].temperature, requests[i].top_p)  # noqa: E731 -- one generate call each
        order = list(range(len(requests)))
        if not logits_processors:
            order.sort(key=lambda i: (*key(i), len(requests[i].prompt)))
        results: list[Generation | None] = [None] * len(requests)
        for _, group in itertools.groupby(order, key=key):
            group = list(group)
            for begin in range(0, len(group), self.batch_size):
                chunk = group[begin : begin + self.batch_size]
                hear = (lambda row, *a, c=chunk: on_token(c[row], *a)) if on_token else None
                ended = (lambda row, g, c=chunk: on_finish(c[row], g)) if on_finish else None
                stop = (lambda row, c=chunk: cancelled(c[row])) if cancelled else None
                made = self._generate([requests[i] for i in chunk], logits_processors, hear, ended, stop)
                for i, generation in zip(chunk, made, strict=True):
                    results[i] = generation
        return results

    @torch.inference_mode()
    def _generate(
        self, requests: list[GenerateRequest], logits_processors, on_token, on_finish, cancelled
    ) -> list[Generation]:
        rows = [list(r.prompt) for r in requests]
        inputs = batch_inputs(self.prefix_cache or PrefixCache(0), rows, self.pad_id, self.model.device)
        layout = inputs.pop("layout")
        stops = RowStops(requests, self.eos_ids, self.tokenizer, on_token, cancelled, on_finish)
        temperature, top_p = requests[0].temperature, requests[0].top_p
        processors = [stops.recorder, *logits_processors]
        if any(r.banned for r in requests):
            processors.append(Ban([r.banned for r in requests]))
        if temperature > 0:
            processors.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p))
        config = GenerationConfig(
            max_new_tokens=max(r.max_tokens for r in requests),
            do_sample=temperature > 0,
            # Sampling at temperature 1 without top-k/top-p: our own warpers apply the request's
            # settings after the recorder has seen the raw logits (the log-probs are the model's own).
            **({"temperature": 1.0, "top_k": 0, "top_p": 1.0} if temperature > 0 else {}),
            repetition_penalty=1.0,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
        )
        self.model.generate(
            **inputs,
            generation_config=config,
            logits_processor=LogitsProcessorList(processors),
            stopping_criteria=StoppingCriteriaList([stops]),
        )
        if self.prefix_cache is not None:
            store_prompts(self.prefix_cache, rows, inputs["cache"], layout)
        return stops.close()

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        """Log-probability of every continuation token given its context, ``batch_size`` rows a pass."""
        out: list[list[float]] = []
        for begin in range(0, len(requests), self.batch_size):
            out += self._score(list(requests[begin : begin + self.batch_size]))
        return out

    @torch.inference_mode()
    def _score(self, requests: list[ScoreRequest]) -> list[list[float]]:
        """One left-padded forward pass keeping only the logits of continuation positions (a full
        vocabulary row per token is large)."""
        if not any(r.continuation for r in requests):
            return [[] for _ in requests]
        rows = [list(r.context) + list(r.continuation) for r in requests]
        width = max(len(r) for r in rows)
        device = self.model.device
        input_ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=device)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        keep = max(len(r.continuation) for r in requests) + 1
        logits = self.model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, logits_to_keep=keep
        ).logits
        out = []
        for row, r in enumerate(requests):
            n = len(r.continuation)
            if not n:
                out.append([])
                continue
            # One row at a time: the fp32 log-softmax temporary stays (n, vocabulary), not (rows, n,
            # vocabulary). Position p predicts token p + 1.
            logp = torch.log_softmax(logits[row, keep - 1 - n : keep - 1].float(), dim=-1)
            target = torch.tensor(r.continuation, device=logp.device)[:, None]
            out.append(logp.gather(1, target).squeeze(1).double().tolist())
        return out
