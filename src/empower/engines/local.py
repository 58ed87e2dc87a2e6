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
from collections.abc import Sequence

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
)

from empower.engines.base import LN2, Finish, GenerateRequest, Generation, ScoreRequest, decode_continuation
from empower.labeling import empower_length
from empower.prefix_cache import PrefixCache, batch_inputs, prefix_cache_for, store_prompts


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a reply: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update([configured] if isinstance(configured, int) else configured or [])
    return sorted(ids)


class StepLogProbs(LogitsProcessor):
    """Keeps the log-probabilities of the current step; must come first so it sees the raw logits."""

    def __init__(self):
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


class RowStops(StoppingCriteria):
    """Per-row stop rules of a batch, with every generated token's log-probability recorded.

    A row stops at end-of-sequence, at its ``max_tokens``, once its text contains one of its stop
    strings, or once the cumulative bits of its tokens reach its ``budget_bits``. The token that
    crosses the budget is generated (its probability is only known then) and is dropped afterwards by
    :func:`empower.labeling.empower_length`. End-of-sequence tokens are not recorded.

    Use::

        stops = RowStops(requests, eos_ids, tokenizer)
        model.generate(..., logits_processor=[stops.recorder], stopping_criteria=[stops])
    """

    def __init__(self, requests: Sequence[GenerateRequest], eos_ids: Sequence[int], tokenizer):
        self.requests = list(requests)
        self.tokenizer = tokenizer
        self.eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long)
        self.budgets = torch.tensor([r.budget_bits for r in requests], dtype=torch.float64)
        self.max_tokens = torch.tensor([r.max_tokens for r in requests])
        self.recorder = StepLogProbs()
        self.ids: list[list[int]] = [[] for _ in requests]
        self.logprobs: list[list[float]] = [[] for _ in requests]
        self.done = torch.zeros(len(requests), dtype=torch.bool)
        self.eos_hit = torch.zeros(len(requests), dtype=torch.bool)
        self.cum_bits = torch.zeros(len(requests), dtype=torch.float64)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tokens = input_ids[:, -1].cpu()
        logp = self.recorder.last.gather(1, input_ids[:, -1:]).squeeze(1).double().cpu()
        is_eos = torch.isin(tokens, self.eos)
        counted = ~self.done & ~is_eos
        self.cum_bits += torch.where(counted, -logp / LN2, 0.0)
        self.eos_hit |= ~self.done & is_eos
        for row in torch.nonzero(counted).flatten().tolist():
            self.ids[row].append(int(tokens[row]))
            self.logprobs[row].append(float(logp[row]))
        lengths = torch.tensor([len(ids) for ids in self.ids])
        self.done |= is_eos | (counted & (self.cum_bits >= self.budgets)) | (lengths >= self.max_tokens)
        for row in torch.nonzero(counted & ~self.done).flatten().tolist():
            stops = self.requests[row].stop
            if stops and _first_stop(self._text(row), stops)[0] is not None:
                self.done[row] = True
        return self.done.to(input_ids.device).clone()

    def _text(self, row: int) -> str:
        # A few prompt tokens are enough context for the decoder to keep a leading space.
        return decode_continuation(self.tokenizer, self.requests[row].prompt[-4:], self.ids[row])


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int | None, str]:
    """(where the earliest stop string begins in ``text``, that string), or (None, "")."""
    found = [(at, s) for s in stops if (at := text.find(s)) >= 0]
    return min(found) if found else (None, "")


def finish_row(
    tokenizer, request: GenerateRequest, ids: list[int], logprobs: list[float], eos: bool
) -> Generation:
    """The generation of one row from its raw tokens: the NLL budget cut, then the stop strings.

    ``ids`` may run past the budget (the crossing token) or past a stop string (generation stops after
    the token that completes it); whichever rule cuts earlier decides the finish.
    """
    kept = empower_length([-lp / LN2 for lp in logprobs], request.budget_bits)
    text = decode_continuation(tokenizer, request.prompt, ids[:kept])
    at, word = _first_stop(text, request.stop) if request.stop else (None, "")
    if at is not None:
        kept = _tokens_before(tokenizer, request.prompt, ids[:kept], at)
        return Generation(ids[:kept], text[:at], logprobs[:kept], Finish.STOP, word, request.prompt)
    if kept < len(ids):
        finish = Finish.BUDGET
    else:
        finish = Finish.EOS if eos else Finish.LENGTH
    return Generation(ids[:kept], text, logprobs[:kept], finish, "", request.prompt)


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
        self, requests: Sequence[GenerateRequest], logits_processors: Sequence[LogitsProcessor] = ()
    ) -> list[Generation]:
        """Every request's generation, in order.

        ``logits_processors`` (in-process only) constrain sampling after the log-probabilities are
        recorded; they see the rows of one batch, so requests must then fit one batch.
        """
        if logits_processors and len(requests) > self.batch_size:
            raise ValueError("logits processors see one batch: pass at most batch_size requests")
        order = sorted(range(len(requests)), key=lambda i: (requests[i].temperature, len(requests[i].prompt)))
        if logits_processors:
            order = list(range(len(requests)))
        results: list[Generation | None] = [None] * len(requests)
        for _, group in itertools.groupby(order, key=lambda i: requests[i].temperature):
            group = list(group)
            for begin in range(0, len(group), self.batch_size):
                chunk = group[begin : begin + self.batch_size]
                made = self._generate([requests[i] for i in chunk], logits_processors)
                for i, generation in zip(chunk, made, strict=True):
                    results[i] = generation
        return results

    @torch.inference_mode()
    def _generate(self, requests: list[GenerateRequest], logits_processors) -> list[Generation]:
        rows = [list(r.prompt) for r in requests]
        inputs = batch_inputs(self.prefix_cache or PrefixCache(0), rows, self.pad_id, self.model.device)
        layout = inputs.pop("layout")
        stops = RowStops(requests, self.eos_ids, self.tokenizer)
        temperature = requests[0].temperature
        processors = [stops.recorder, *logits_processors]
        processors += [TemperatureLogitsWarper(temperature)] if temperature > 0 else []
        config = GenerationConfig(
            max_new_tokens=max(r.max_tokens for r in requests),
            do_sample=temperature > 0,
            # Sampling at temperature 1 without top-k/top-p: our own warper applies the temperature,
            # after the recorder has seen the raw logits (the log-probs are those of the model itself).
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
        return [
            finish_row(self.tokenizer, r, stops.ids[i], stops.logprobs[i], bool(stops.eos_hit[i]))
            for i, r in enumerate(requests)
        ]

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
        logp = torch.log_softmax(logits.float(), dim=-1)  # position p predicts token p + 1
        out = []
        for row, r in enumerate(requests):
            n = len(r.continuation)
            if not n:
                out.append([])
                continue
            predicting = logp[row, keep - 1 - n : keep - 1]
            target = torch.tensor(r.continuation, device=logp.device)[:, None]
            out.append(predicting.gather(1, target).squeeze(1).double().tolist())
        return out
