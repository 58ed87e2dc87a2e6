"""The in-process `transformers` engine: one worker thread owns the model and batches requests.

Why a worker thread: ``model.generate`` holds the CPU for hundreds of milliseconds; running it on the
event loop would freeze every other request (health checks included). The worker gathers the
requests that arrived while the previous batch ran (plus a short wait for stragglers), runs ONE
``generate`` over all their rows, and hands each new token to the request that owns the row through
:class:`_BatchStreamer`, which posts per-request events onto that request's asyncio queue with
``loop.call_soon_threadsafe``. The event loop never touches the model.

A row stops when its request is cancelled (client gone), reaches its ``max_tokens``, hits a stop
string or EOS, or the policy's stopping rule says so; :class:`_RowTracker` is the StoppingCriteria
that reads those per-row flags, so an abandoned request stops costing compute at the next step.
This is static batching: a request that arrives mid-batch waits for that batch to end. Throughput
at scale is vLLM's job (``empower serve --engine vllm``), not something we grow here.

Example::

    engine = Engine(model, tokenizer, PolicyRule(Policy.BASE_N, n=20))
    async for delta in engine.stream([tokenizer("def f(").input_ids], SamplingParams(max_tokens=16)):
        print(delta.text, end="")
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation import TemperatureLogitsWarper, TopPLogitsWarper
from transformers.generation.streamers import BaseStreamer

from empower.assistant import Policy, ThresholdStopping, chat_prompt
from empower.engines.base import decode_continuation
from empower.engines.local import StepLogProbs, eos_token_ids
from empower.prefix_cache import PrefixCache, batch_inputs, prefix_cache_for, store_prompts

log = logging.getLogger(__name__)

LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. Requests with equal ``batch_key`` share a ``generate`` call."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy, as editor plugins usually ask
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None  # how many alternatives per token (0 = only the chosen token's)

    @property
    def batch_key(self) -> tuple[float, float]:
        return (self.temperature, self.top_p)


@dataclasses.dataclass(frozen=True)
class PolicyRule:
    """How a suggestion ends, beyond EOS and max_tokens (the policies of ``empower.assistant``)."""

    policy: Policy = Policy.MODEL
    n: int = 20  # base-n: token cap
    eta: float = 4.0  # threshold: cumulative NLL budget in bits

    def cap(self, max_tokens: int) -> int:
        return min(max_tokens, self.n) if self.policy is Policy.BASE_N else max_tokens

    @property
    def chat(self) -> bool:
        """base and base-n ask an instruct model, through its chat template, to extend the code."""
        return self.policy in (Policy.BASE, Policy.BASE_N)

    def model_input(self, tokenizer, code: str) -> str:
        """The text the model continues for a code prefix (the assistant module's ``base`` prompt)."""
        return chat_prompt(tokenizer, code, prefill=True) if self.chat else code

    def stops(self, stop: tuple[str, ...]) -> tuple[str, ...]:
        """base: the reply's closing code fence ends the suggestion (as the assistant module does)."""
        return (*stop, "```") if self.chat and "```" not in stop else stop


@dataclasses.dataclass
class Delta:
    """New text of one choice; ``finish_reason`` is set on its last delta (``stop``, ``length``)."""

    index: int
    text: str
    tokens: list[str] = dataclasses.field(default_factory=list)
    token_logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[dict[str, float]] = dataclasses.field(default_factory=list)
    token_count: int = 0  # tokens generated for this delta (usage), logprobs asked or not
    finish_reason: str | None = None
    stopping_word: str = ""  # the request's stop string that ended the choice, if one did


@dataclasses.dataclass
class EngineStats:
    """Counters read by ``GET /metrics`` (and the tests: batching and cancellation are observable)."""

    requests: int = 0
    batches: int = 0
    rows: int = 0
    max_batch_rows: int = 0
    tokens_generated: int = 0
    rows_cancelled: int = 0
    busy_seconds: float = 0.0


class _Job:
    """One HTTP request: its rows, and the queue its events go to (owned by the event loop)."""

    def __init__(self, prompts: list[list[int]], params: SamplingParams, loop: asyncio.AbstractEventLoop):
        self.params = params
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.rows = [
            _Row(self, i * params.n + j, ids) for i, ids in enumerate(prompts) for j in range(params.n)
        ]
        self.open_rows = len(self.rows)
        self.cancelled = False

    def post(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone: nobody will read, stop generating
            self.cancelled = True


class _Row:
    def __init__(self, job: _Job, index: int, prompt_ids: list[int]):
        self.job = job
        self.index = index
        self.prompt_ids = prompt_ids
        self.tokens: list[int] = []
        self.sent_chars = 0
        self.pending = Delta(index, "")
        self.finish_reason: str | None = None
        self.stop_now = False  # set by the policy rule: the token of this step is not part of the suggestion


class _RowTracker(StoppingCriteria):
    """Per-row stop flags: cancellation, max_tokens, stop strings (set by the streamer), policy."""

    def __init__(self, rows: list[_Row], prompt_width: int, threshold: ThresholdStopping | None):
        self.rows = rows
        self.prompt_width = prompt_width
        self.threshold = threshold

    def __call__(self, input_ids, scores, **kwargs):
        steps = input_ids.shape[1] - self.prompt_width
        # ThresholdStopping also flags end-of-sequence rows; the streamer ends those itself.
        policy_done = self.threshold(input_ids, scores) if self.threshold is not None else None
        done = []
        for i, row in enumerate(self.rows):
            if row.finish_reason is None and policy_done is not None and bool(policy_done[i]):
                row.stop_now = True
            done.append(
                row.finish_reason is not None
                or row.job.cancelled
                or row.stop_now
                or steps >= row.job.params.max_tokens
            )
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _BatchStreamer(BaseStreamer):
    """Splits each step's tokens (one per row) into per-request deltas on their asyncio queues."""

    def __init__(self, engine: Engine, rows: list[_Row], recorder: StepLogProbs):
        self.engine = engine
        self.rows = rows
        self.recorder = recorder
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate() first hands over the prompt itself
            self.seen_prompt = True
            return
        for i, row in enumerate(self.rows):
            if row.finish_reason is not None:
                continue
            if row.job.cancelled:
                self.engine._finish(row, None)
                continue
            if row.stop_now:  # the policy ends the suggestion BEFORE this token
                self._flush(row)
                self.engine._finish(row, "stop")
                continue
            token = int(value[i])
            if token in self.engine.eos_ids:
                self._flush(row)
                self.engine._finish(row, "stop")
                continue
            row.tokens.append(token)
            row.pending.token_count += 1
            self.engine.stats.tokens_generated += 1
            self._add_logprobs(row, i, token)
            text = self.engine._decode(row)
            cut, hold, word = _scan_stops(text, row.sent_chars, row.job.params.stop)
            if cut is not None:
                row.pending.text += text[row.sent_chars : cut]
                row.pending.stopping_word = word
                self.engine._finish(row, "stop")
                continue
            end = len(text) - hold
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                end = min(end, len(text) - 1)
            if end > row.sent_chars:
                row.pending.text += text[row.sent_chars : end]
                row.sent_chars = end
            if len(row.tokens) >= row.job.params.max_tokens:
                self._flush(row, text)
                self.engine._finish(row, "length")
            elif row.pending.text:
                row.job.post(row.pending)
                row.pending = Delta(row.index, "")

    def end(self) -> None:
        for row in self.rows:
            if row.finish_reason is None:
                self._flush(row)
                self.engine._finish(row, None if row.job.cancelled else "length")

    def _flush(self, row: _Row, text: str | None = None) -> None:
        """Release the text held back as a possible stop-string prefix: the suggestion is complete."""
        text = self.engine._decode(row) if text is None else text
        row.pending.text += text[row.sent_chars :]
        row.sent_chars = len(text)

    def _add_logprobs(self, row: _Row, i: int, token: int) -> None:
        want = row.job.params.logprobs
        if want is None or self.recorder.last is None:
            return
        tokenizer = self.engine.tokenizer
        logprobs = self.recorder.last[i]
        row.pending.tokens.append(tokenizer.decode([token]))
        row.pending.token_logprobs.append(float(logprobs[token]))
        if want > 0:
            values, ids = logprobs.topk(want)
            row.pending.top_logprobs.append(
                {tokenizer.decode([int(t)]): float(v) for v, t in zip(values, ids, strict=True)}
            )


def _scan_stops(text: str, start: int, stops: tuple[str, ...]) -> tuple[int | None, int, str]:
    """(index where the earliest stop string begins, or None; chars to hold back as a possible stop
    prefix; that stop string, or "")."""
    cuts = [(i, s) for i, s in ((text.find(s, max(0, start - len(s) + 1)), s) for s in stops) if i >= 0]
    if cuts:
        at, word = min(cuts)
        return max(at, start), 0, word
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text) - start), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return None, hold, ""


class Engine:
    """Owns ``model`` on a worker thread; :meth:`stream` is the asyncio face of it.

    Args:
        model, tokenizer: from ``empower.models.load_model``.
        rule: the suggestion policy (how suggestions end).
        max_batch_rows: the most rows (prompts x n) one ``generate`` call holds.
        batch_wait_s: how long the worker waits for more requests after the first one arrives.
        prefix_cache: prompts whose key/value states are kept (0: none). An editor sends the same
            file again and again as it is typed, so a request mostly encodes only what changed.
    """

    def __init__(
        self,
        model,
        tokenizer,
        rule: PolicyRule = PolicyRule(),
        *,
        max_batch_rows: int = 8,
        batch_wait_s: float = 0.005,
        prefix_cache: int = 64,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.rule = rule
        self.max_batch_rows = max_batch_rows
        self.batch_wait_s = batch_wait_s
        self.eos_ids = set(eos_token_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stats = EngineStats()
        self.prefix_cache = prefix_cache_for(model, prefix_cache)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._deferred: collections.deque[_Job] = collections.deque()
        self._thread = threading.Thread(target=self._work, name="empower-engine", daemon=True)
        self._thread.start()

    async def stream(self, prompts: list[list[int]], params: SamplingParams) -> AsyncIterator[Delta]:
        """Yield the deltas of every choice (``len(prompts) * params.n``) as the tokens are made.

        Closing the iterator early (the client went away) cancels the request's rows.
        """
        params = dataclasses.replace(
            params, max_tokens=self.rule.cap(params.max_tokens), stop=self.rule.stops(params.stop)
        )
        job = _Job(prompts, params, asyncio.get_running_loop())
        self.stats.requests += 1
        self._queue.put(job)
        try:
            while True:
                item = await job.events.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise RuntimeError(f"generation failed: {item}") from item
                yield item
        finally:
            job.cancelled = True  # no-op when finished; otherwise the worker drops its rows

    def close(self) -> None:
        """Stop the worker after the batch it is running (idempotent)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)

    # ---- worker thread -------------------------------------------------------------------------

    def _decode(self, row: _Row) -> str:
        # Decoded after a few prompt tokens: tokenizers that drop a token's leading space alone keep it.
        return decode_continuation(self.tokenizer, row.prompt_ids[-4:], row.tokens)

    def _finish(self, row: _Row, reason: str | None) -> None:
        row.finish_reason = reason or "cancelled"
        if reason is None:
            self.stats.rows_cancelled += 1
        else:
            row.pending.finish_reason = reason
            row.job.post(row.pending)
        row.job.open_rows -= 1
        if row.job.open_rows == 0:
            row.job.post(None)

    def _gather(self) -> list[_Job] | None:
        """Block for the first job, then take what else is waiting (same sampling settings only)."""
        first = self._deferred.popleft() if self._deferred else self._queue.get()
        if first is None:
            return None
        jobs, rows = [first], len(first.rows)
        deadline = time.monotonic() + self.batch_wait_s
        while rows < self.max_batch_rows:
            try:
                job = (
                    self._deferred.popleft()
                    if self._deferred
                    else self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                )
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)
                break
            if job.params.batch_key != first.params.batch_key or rows + len(job.rows) > self.max_batch_rows:
                self._deferred.append(job)
                break
            jobs.append(job)
            rows += len(job.rows)
        return jobs

    def _work(self) -> None:
        while (jobs := self._gather()) is not None:
            for job in jobs:
                if job.cancelled:  # abandoned while queued: never generated
                    self.stats.rows_cancelled += len(job.rows)
            jobs = [job for job in jobs if not job.cancelled]
            if not jobs:
                continue
            start = time.perf_counter()
            try:
                self._generate(jobs)
            except Exception as err:  # a bad batch fails its requests, never the server
                log.exception("generation failed")
                for job in jobs:
                    job.post(err)
            self.stats.busy_seconds += time.perf_counter() - start

    @torch.inference_mode()
    def _generate(self, jobs: list[_Job]) -> None:
        rows = [row for job in jobs for row in job.rows]
        self.stats.batches += 1
        self.stats.rows += len(rows)
        self.stats.max_batch_rows = max(self.stats.max_batch_rows, len(rows))
        prompts = [row.prompt_ids for row in rows]
        # Left padding (every row's next token sits in the last column), cached prefixes not re-encoded.
        inputs = batch_inputs(self.prefix_cache or PrefixCache(0), prompts, self.pad_id, self.model.device)
        layout = inputs.pop("layout")
        width = inputs["input_ids"].shape[1]
        params = jobs[0].params
        threshold = (
            ThresholdStopping(self.rule.eta, sorted(self.eos_ids))
            if self.rule.policy is Policy.THRESHOLD
            else None
        )
        recorder = threshold.recorder if threshold is not None else StepLogProbs()
        processors = [recorder]
        if params.temperature > 0:
            processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
        self.model.generate(
            **inputs,
            max_new_tokens=max(row.job.params.max_tokens for row in rows),
            # Sampling settings go through our own processors (after the recorder), so the
            # generation config must not add its own warpers.
            do_sample=params.temperature > 0,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            pad_token_id=self.pad_id,
            logits_processor=LogitsProcessorList(processors),
            stopping_criteria=StoppingCriteriaList([_RowTracker(rows, width, threshold)]),
            streamer=_BatchStreamer(self, rows, recorder),
        )
        if self.prefix_cache is not None:
            store_prompts(self.prefix_cache, prompts, inputs["cache"], layout)
