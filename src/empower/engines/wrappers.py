"""Wrappers over an engine: :class:`Batcher` gathers concurrent callers into one generate call;
:class:`Resilient` keeps many requests in flight to a server, each under a timeout and retried;
:class:`Turns` lets threads (episodes) take turns running Python while their engine calls overlap.

Why a worker thread: ``generate`` holds the CPU for hundreds of milliseconds; running it on the event
loop would freeze every other request (health checks included). The worker takes the jobs that
arrived while the previous batch ran (plus a short wait for stragglers), runs ONE
:meth:`LocalEngine.generate` over all their requests, and hands each kept token to the job that owns
the row, as a :class:`Delta` on that job's asyncio queue (``loop.call_soon_threadsafe``). The event
loop never touches the model; the engine applies every stop rule, so this is a wrapper, not a second
generation loop.

A request whose caller goes away (its iterator closed) stops costing compute at the next step. This
is static batching: a job that arrives mid-batch waits for that batch to end. Throughput at scale is
a server engine's job (vLLM), not something we grow here.

Example::

    batcher = Batcher(LocalEngine(model, tokenizer))
    async for delta in batcher.stream([GenerateRequest(tokenizer("def f(").input_ids, 16)]):
        print(delta.text, end="")
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence

from empower.engines.base import (
    Finish,
    GenerateRequest,
    Generation,
    Retryable,
    ScoreRequest,
    ServerEngineError,
    decode_continuation,
)
from empower.engines.local import LocalEngine

log = logging.getLogger(__name__)

# What an OpenAI-compatible client reads as the reason a choice ended.
FINISH_REASON = {Finish.EOS: "stop", Finish.STOP: "stop", Finish.BUDGET: "stop", Finish.LENGTH: "length"}


@dataclasses.dataclass
class Delta:
    """New text of one request (``index``); its last delta has ``finish_reason`` (``stop``, ``length``)
    and the whole :class:`Generation`."""

    index: int
    text: str
    tokens: list[str] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    token_logprobs: list[float] = dataclasses.field(default_factory=list)
    # per token: the most likely alternatives, token id -> log-probability (a server that sends no
    # token ids gives them by text)
    top_logprobs: list[dict[int | str, float]] = dataclasses.field(default_factory=list)
    token_count: int = 0  # tokens generated for this delta (usage), logprobs asked or not
    finish_reason: str | None = None
    stopping_word: str = ""  # the request's stop string that ended it, if one did
    generation: Generation | None = None


_held = threading.local()


class Turns:
    """Threads that take turns: one runs Python at a time (tokenizers, bookkeeping: nothing needs to be
    thread-safe), and a thread waiting for an engine (:func:`waiting`) lets the others run meanwhile.

    Example::

        turns = Turns()
        def play(task):
            with turns.turn():
                ...  # engine calls inside wait with the turn given up
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.waiting = 0  # threads waiting for an engine right now (progress)

    @contextlib.contextmanager
    def turn(self):
        self._lock.acquire()
        _held.turns = self
        try:
            yield
        finally:
            _held.turns = None
            self._lock.release()


@contextlib.contextmanager
def waiting():
    """Around a blocking engine call: a thread holding a turn gives it up until the call returns."""
    turns = getattr(_held, "turns", None)
    if turns is None:
        yield
        return
    _held.turns = None
    turns.waiting += 1
    turns._lock.release()
    try:
        yield
    finally:
        turns._lock.acquire()
        turns.waiting -= 1
        _held.turns = turns


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
    retried: int = 0  # attempts that failed and were tried again (Resilient)
    refused: int = 0  # requests that failed every attempt
    in_flight: int = 0  # requests sent and not yet answered (Resilient), and the most at once
    most_in_flight: int = 0


class _Job:
    """One caller: its requests, and the queue its deltas go to (owned by the event loop)."""

    def __init__(
        self,
        requests: list[GenerateRequest],
        logprobs: bool,
        loop: asyncio.AbstractEventLoop,
        streaming: bool = True,
    ):
        self.requests, self.logprobs, self.loop, self.streaming = requests, logprobs, loop, streaming
        self.events: asyncio.Queue = asyncio.Queue()
        self.rows = [_Row(index, r) for index, r in enumerate(requests)]
        self.open_rows = len(self.rows)
        # A caller's requests are of one kind (one episode step, one editor request).
        self.kind = next(((r.temperature, r.top_p, r.max_tokens) for r in requests), None)
        self.cancelled = False

    def post(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone: nobody will read, stop generating
            self.cancelled = True


class _Row:
    def __init__(self, index: int, request: GenerateRequest):
        self.index, self.request = index, request
        self.tokens: list[int] = []
        self.sent_chars = 0
        self.posted_tokens = 0  # tokens whose strings went out in earlier deltas
        self.pending = Delta(index, "")


class Batcher:
    """Owns ``engine`` on a worker thread; :meth:`stream` is the asyncio face of it.

    Args:
        engine: the in-process engine (its ``batch_size`` should be at least ``max_batch_rows``).
        max_batch_rows: the most requests one generate call holds.
        batch_wait_s: how long the worker waits for more jobs after the first one arrives.
    """

    def __init__(self, engine: LocalEngine, *, max_batch_rows: int = 8, batch_wait_s: float = 0.005):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.model, self.prefix_cache = engine.model, engine.prefix_cache
        self.max_batch_rows, self.batch_wait_s = max_batch_rows, batch_wait_s
        self.stats = EngineStats()
        self._model_lock = threading.Lock()  # one model call at a time: generate batches, or a scoring
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._deferred: collections.deque[_Job] = collections.deque()
        self._thread = threading.Thread(target=self._work, name="empower-engine", daemon=True)
        self._thread.start()

    def generate(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        """The engine verb, from any thread: these requests join the other callers' waiting ones in one
        generate call, and this returns when they are done."""

        async def collect() -> list[Generation]:
            out: list[Generation | None] = [None] * len(requests)
            async for delta in self._deltas(list(requests), False, streaming=False):
                out[delta.index] = delta.generation
            return out

        if not requests:
            return []
        with waiting():
            return asyncio.run(collect())

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        """The engine's *score* verb, from any thread (between generate batches)."""
        with waiting(), self._model_lock:
            return self.engine.score(requests)

    async def stream(
        self, requests: Sequence[GenerateRequest], logprobs: bool = False
    ) -> AsyncIterator[Delta]:
        """Yield each request's deltas as its tokens are made (with token strings and log-probs when
        ``logprobs``). Closing the iterator early (the caller went away) cancels its requests."""
        async for delta in self._deltas(list(requests), logprobs):
            yield delta

    async def _deltas(self, requests: list[GenerateRequest], logprobs: bool, streaming: bool = True):
        job = _Job(requests, logprobs, asyncio.get_running_loop(), streaming)
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

    async def ascore(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        """The engine's *score* verb off the event loop (between generate batches)."""
        return await asyncio.to_thread(self.score, requests)

    def close(self) -> None:
        """Stop the worker after the batch it is running (idempotent)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)

    # ---- worker thread -------------------------------------------------------------------------

    def _gather(self) -> list[_Job] | None:
        """Block for the first job, then take what else is waiting of its kind, up to ``max_batch_rows``.

        Jobs of another kind (sampling settings, token budget) wait for a later batch, oldest first: a
        static batch runs to its longest row, so a 4-token acceptor reply batched with an 18-token
        appender reply (and its longer prompt) would pay for both.
        """
        first = self._deferred.popleft() if self._deferred else self._queue.get()
        if first is None:
            return None
        jobs, rows = [first], len(first.rows)
        later: collections.deque[_Job] = collections.deque()
        for job in self._deferred:
            if job.kind == first.kind and rows + len(job.rows) <= self.max_batch_rows:
                jobs.append(job)
                rows += len(job.rows)
            else:
                later.append(job)
        self._deferred = later
        deadline = time.monotonic() + self.batch_wait_s
        while rows < self.max_batch_rows:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)
                break
            if job.kind != first.kind:
                self._deferred.append(job)
                continue
            if rows + len(job.rows) > self.max_batch_rows:
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
                with self._model_lock:
                    self._generate(jobs)
            except Exception as err:  # a bad batch fails its callers, never the worker
                log.exception("generation failed")
                for job in jobs:
                    job.post(err)
            self.stats.busy_seconds += time.perf_counter() - start

    def _generate(self, jobs: list[_Job]) -> None:
        owners = [(job, row) for job in jobs for row in job.rows]
        self.stats.batches += 1
        self.stats.rows += len(owners)
        self.stats.max_batch_rows = max(self.stats.max_batch_rows, len(owners))

        def on_token(i: int, token: int, logprob: float, top: dict[int, float]) -> None:
            job, row = owners[i]
            row.tokens.append(token)
            self.stats.tokens_generated += 1
            row.pending.token_count += 1
            if not job.streaming:  # the caller takes the whole generation at the end
                return
            if job.logprobs:
                row.pending.tokens.append(self.tokenizer.decode([token]))
                row.pending.token_ids.append(token)
                row.pending.token_logprobs.append(logprob)
                if top:
                    row.pending.top_logprobs.append(dict(top))
            text = decode_continuation(self.tokenizer, row.request.prompt[-4:], row.tokens)
            # Hold back what could be the start of a stop string, and half a multi-byte character.
            end = len(text) - _stop_prefix(text, row.sent_chars, row.request.stop)
            if text.endswith("\ufffd"):
                end = min(end, len(text) - 1)
            if end > row.sent_chars and _first_stop_at(text, row.request.stop) is None:
                row.pending.text += text[row.sent_chars : end]
                row.sent_chars = end
                row.posted_tokens = len(row.tokens)
                job.post(row.pending)
                row.pending = Delta(row.index, "")

        def on_finish(i: int, generation: Generation) -> None:
            job, row = owners[i]
            if generation.finish is Finish.CANCELLED:
                self.stats.rows_cancelled += 1
            else:
                delta = row.pending
                delta.text += generation.text[row.sent_chars :]
                keep = len(generation.ids) - row.posted_tokens  # a stop string can drop the last token
                delta.tokens, delta.token_logprobs = delta.tokens[:keep], delta.token_logprobs[:keep]
                delta.token_ids = delta.token_ids[:keep]
                delta.top_logprobs = delta.top_logprobs[:keep]
                delta.finish_reason = FINISH_REASON[generation.finish]
                delta.stopping_word, delta.generation = generation.stop, generation
                job.post(delta)
            job.open_rows -= 1
            if job.open_rows == 0:
                job.post(None)

        self.engine.generate(
            [row.request for _, row in owners],
            on_token=on_token,
            on_finish=on_finish,
            cancelled=lambda i: owners[i][0].cancelled,
        )


def _first_stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    found = [at for s in stops if (at := text.find(s)) >= 0]
    return min(found) if found else None


def _stop_prefix(text: str, start: int, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` (past ``start``) could begin a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text) - start), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class Slots:
    """At most ``n`` holders at once across threads, each on its own event loop (an episode thread's
    ``asyncio.run``): ``asyncio.Semaphore`` belongs to one loop, so calls from many threads would each
    get ``n``. Waiters are served oldest first; a waiter cancelled once its slot was handed over passes
    the slot on."""

    def __init__(self, n: int):
        self._free, self._lock = n, threading.Lock()
        self._waiters: collections.deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = (
            collections.deque()
        )

    async def acquire(self) -> None:
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return
            waiter = (asyncio.get_running_loop(), asyncio.get_running_loop().create_future())
            self._waiters.append(waiter)
        try:
            await waiter[1]
        except asyncio.CancelledError:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                    raise
            if waiter[1].done() and not waiter[1].cancelled():  # handed over just as it was cancelled
                self.release()
            raise

    def release(self) -> None:
        """Hand the slot to the oldest waiter (it stays held), or free it."""
        with self._lock:
            while self._waiters:
                loop, future = self._waiters.popleft()
                try:
                    loop.call_soon_threadsafe(self._hand, future)
                    return
                except RuntimeError:  # that caller's loop is gone
                    continue
            self._free += 1

    def _hand(self, future: asyncio.Future) -> None:
        if future.cancelled():  # its caller gave up before the hand-over arrived
            self.release()
        elif not future.done():
            future.set_result(None)

    @contextlib.asynccontextmanager
    async def slot(self):
        await self.acquire()
        try:
            yield
        finally:
            self.release()


class Resilient:
    """The engine verbs over an engine that takes one request at a time, asynchronously.

    ``engine`` has ``session()`` (an async context manager for one event loop) and
    ``generate_one(session, request)`` / ``score_one(session, request)`` making one attempt and
    raising :class:`~empower.engines.base.Retryable` for a failure worth another. Here: at most
    ``concurrency`` requests in flight over every call from every thread (:class:`Slots`), each
    attempt under ``timeout_s``, ``retries`` retries after 0.5 s, 1 s, 2 s, ..., each retry logged;
    a request that fails them all stops the call with one :class:`~empower.engines.base.ServerEngineError`
    naming the engine and the last failure. Other attributes (``stream``, ``stats``, ``close``) are
    the engine's.
    """

    def __init__(
        self, engine, *, concurrency: int = 8, timeout_s: float = 120.0, retries: int = 3, backoff_s=0.5
    ):
        if concurrency < 1 or timeout_s <= 0 or retries < 0:
            raise ValueError(
                f"need concurrency >= 1, timeout_s > 0 and retries >= 0; got {concurrency}, {timeout_s}, {retries}"
            )
        self.engine, self.tokenizer, self.name = engine, engine.tokenizer, engine.name
        self.concurrency, self.timeout_s, self.retries, self.backoff_s = (
            concurrency,
            timeout_s,
            retries,
            backoff_s,
        )
        self.slots, self._counting = Slots(concurrency), threading.Lock()

    def __getattr__(self, name):
        if name == "engine":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.engine, name)

    def generate(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        with waiting():
            return asyncio.run(self.agenerate(requests))

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        with waiting():
            return asyncio.run(self.ascore(requests))

    async def agenerate(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        """:meth:`generate` from inside a running event loop."""
        return await self._all(list(requests), self.engine.generate_one)

    async def ascore(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        """:meth:`score` from inside a running event loop (the server's proxy)."""
        return await self._all(list(requests), self.engine.score_one)

    async def _all(self, requests: list, verb) -> list:
        async with self.engine.session() as session:

            async def one(request):
                async with self.slots.slot():
                    self._count(+1)
                    try:
                        return await self._attempts(lambda: verb(session, request))
                    finally:
                        self._count(-1)

            return list(await asyncio.gather(*(one(r) for r in requests)))

    def _count(self, change: int) -> None:
        stats = self.engine.stats
        with self._counting:
            stats.in_flight += change
            stats.most_in_flight = max(stats.most_in_flight, stats.in_flight)

    async def _attempts(self, call):
        stats = self.engine.stats
        for attempt in range(self.retries + 1):
            try:
                return await asyncio.wait_for(call(), self.timeout_s)
            except (Retryable, TimeoutError) as err:
                failure = str(err) or f"no answer within {self.timeout_s:g} s"
                if attempt == self.retries:
                    stats.refused += 1
                    raise ServerEngineError(
                        f"{self.name}: a request failed {attempt + 1} time(s), last: {failure}; start the "
                        "server or fix the URL (an evaluation resumes with --resume)"
                    ) from err
                stats.retried += 1
                wait = self.backoff_s * 2**attempt
                log.warning(
                    "%s: %s; retry %d of %d in %g s", self.name, failure, attempt + 1, self.retries, wait
                )
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")
