"""Any OpenAI-compatible completions server as an engine: vLLM, llama.cpp's server, ``empower serve``.

Prompts go as token ids, so the server sees exactly the prompt the in-process engine would; each
token comes back as its id (vLLM's ``return_tokens_as_token_ids``, which ``empower serve`` speaks
too) with its log-probability. The NLL budget is the labeling rule (:func:`empower.rule.empower_length`)
applied to the sampled tokens' log-probabilities as they stream; the stream is closed at the cut, so
the server stops generating there. Two faces:

- :meth:`OpenAIEngine.generate`, the engine verb for the roles (the assistant's policies): requests
  in flight at once up to ``concurrency``, each retried with backoff when the server cannot be
  reached or answers 429/5xx;
- :meth:`OpenAIEngine.stream`, for ``empower serve --engine vllm``: one upstream request per client
  request (``n`` copies of each prompt), its deltas passed on as they come.

Example::

    engine = OpenAIEngine("http://127.0.0.1:8000", served_model("http://127.0.0.1:8000"), tokenizer)
    [g] = engine.generate([GenerateRequest(tokenizer("def f(").input_ids, 16, budget_bits=4.0)])
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import subprocess
from collections.abc import AsyncIterator, Sequence

import httpx

from empower.engines.base import LN2, Finish, GenerateRequest, Generation, ScoreRequest
from empower.engines.local import finish_row
from empower.engines.wrappers import Delta, EngineStats
from empower.rule import empower_length

TOKEN_ID = "token_id:"


class ServerEngineError(ConnectionError):
    """The server could not be reached, or refused a request, after the retries."""


def base_url(url: str) -> str:
    """The server's root, whether given with or without ``/v1``."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def served_model(url: str, name: str = "", api_key: str | None = None, timeout_s: float = 30.0) -> str:
    """The model id to send to the server at ``url``: ``name`` when the server lists it (a LoRA adapter
    vLLM serves by name, say); with no name, the one model the server lists.

    Raises:
        ServerEngineError: the server is unreachable.
        ValueError: ``name`` is not listed (naming the ones that are), or no name was given and the
            server lists several.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:
        response = httpx.get(f"{base_url(url)}/v1/models", headers=headers, timeout=timeout_s)
        response.raise_for_status()
    except httpx.HTTPError as err:
        raise ServerEngineError(f"{url}: cannot list the served models ({err})") from err
    served = [m["id"] for m in response.json().get("data", [])]
    if name:
        if name not in served:
            raise ValueError(f"{url} does not serve a model named {name!r}; it serves {served}")
        return name
    if len(served) != 1:
        raise ValueError(f"{url} serves {len(served)} models ({served}): name the one to use")
    return served[0]


@dataclasses.dataclass
class _Choice:
    """What one upstream choice has streamed so far."""

    text: str = ""
    ids: list[int] = dataclasses.field(default_factory=list)
    bits: list[float] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list[dict[int | str, float]] = dataclasses.field(default_factory=list)
    finish: Finish | None = None
    budget_hit: bool = False
    eos_hit: bool = False


class _Retry(Exception):
    """An answer worth asking again (429, 5xx)."""


class OpenAIEngine:
    """An OpenAI-compatible completions server behind the engine interface (see the module doc).

    Args:
        url: the server's root (with or without ``/v1``).
        model: the model id to send (:func:`served_model`).
        tokenizer: the served model's tokenizer (prompts are built and generations decoded with it).
        process: a server process this engine owns (stopped by :meth:`close`).
        concurrency: :meth:`generate`'s requests in flight at once.
        timeout_s, retries: per request; retries wait 0.5 s, 1 s, 2 s, ...
    """

    def __init__(
        self,
        url: str,
        model: str,
        tokenizer=None,
        process: subprocess.Popen | None = None,
        api_key: str | None = None,
        *,
        concurrency: int = 8,
        timeout_s: float = 120.0,
        retries: int = 3,
        eos_ids: Sequence[int] = (),
    ):
        self.url, self.upstream_model, self.tokenizer = base_url(url), model, tokenizer
        self.name = f"{self.url}#{model}"
        self.process = process
        self.concurrency, self.timeout_s, self.retries = concurrency, timeout_s, retries
        # The model's end-of-sequence ids end a generation here even where the server does not stop
        # on them (vLLM serving a LoRA adapter may not), and are never part of it.
        self.eos_ids = set(eos_ids)
        self.stats = EngineStats()
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._client = self._new_client(None)

    def _new_client(self, timeout_s: float | None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, headers=self._headers, timeout=httpx.Timeout(timeout_s, connect=10.0)
        )

    # ---- the engine verb --------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        """Every request's generation, in order (``concurrency`` in flight at once)."""
        return asyncio.run(self._generate_all(list(requests)))

    async def _generate_all(self, requests: list[GenerateRequest]) -> list[Generation]:
        gate = asyncio.Semaphore(self.concurrency)
        async with self._new_client(self.timeout_s) as client:

            async def one(request: GenerateRequest) -> Generation:
                async with gate:
                    return await self._generate_one(client, request)

            return list(await asyncio.gather(*(one(r) for r in requests)))

    async def _generate_one(self, client: httpx.AsyncClient, request: GenerateRequest) -> Generation:
        async def once() -> Generation:
            final = None
            async for delta in self._stream([request], False, client):
                final = delta.generation or final
            return final

        return await self._retrying(once)

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        """Log-probability of every continuation token given its context, from the server's
        ``prompt_logprobs`` (vLLM's extension; ``empower serve`` speaks it too), one request per row."""
        return asyncio.run(self._score_all(list(requests)))

    async def ascore(self, requests: Sequence[ScoreRequest]) -> list[list[float]]:
        """:meth:`score` from inside a running event loop (the server's proxy)."""
        return await self._score_all(list(requests))

    async def _score_all(self, requests: list[ScoreRequest]) -> list[list[float]]:
        gate = asyncio.Semaphore(self.concurrency)
        async with self._new_client(self.timeout_s) as client:

            async def one(request: ScoreRequest) -> list[float]:
                async with gate:
                    return await self._retrying(lambda: self._score_one(client, request))

            return list(await asyncio.gather(*(one(r) for r in requests)))

    async def _score_one(self, client: httpx.AsyncClient, request: ScoreRequest) -> list[float]:
        if not request.continuation:
            return []
        prompt = [*request.context, *request.continuation]
        body = {"model": self.upstream_model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
        response = await client.post("/v1/completions", json=body | {"prompt_logprobs": 0})
        if response.status_code != 200:
            message = f"upstream server at {self.url} answered {response.status_code}: {response.text[:500]}"
            raise (
                _Retry(message)
                if response.status_code == 429 or response.status_code >= 500
                else ServerEngineError(message)
            )
        entries = response.json()["choices"][0].get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(prompt):
            raise ServerEngineError(
                f"upstream server at {self.url} sent no prompt_logprobs for the {len(prompt)} prompt tokens; "
                "scoring through a server needs them (vLLM's extension)"
            )
        out = []
        for position in range(len(request.context), len(prompt)):
            entry = (entries[position] or {}).get(str(prompt[position]))
            if entry is None:
                raise ServerEngineError(
                    f"upstream server at {self.url} sent no log-probability for prompt token {position} "
                    f"(id {prompt[position]}); scoring needs every one"
                )
            out.append(float(entry["logprob"] if isinstance(entry, dict) else entry))
        return out

    async def _retrying(self, call):
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except (httpx.TransportError, _Retry) as err:
                if attempt == self.retries:
                    raise ServerEngineError(
                        f"server {self.url} failed after {self.retries} retries: {err}; start it or fix "
                        "the URL (an evaluation resumes with --resume)"
                    ) from err
                await asyncio.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    # ---- the streaming face (empower serve --engine vllm) ------------------------------------------

    async def stream(
        self, requests: Sequence[GenerateRequest], logprobs: bool = False
    ) -> AsyncIterator[Delta]:
        """Yield deltas per request as the server streams them; closing early aborts the upstream request.

        ``requests`` are n copies of each prompt in a row (choice ``i * n + j``), with one setting.
        """
        try:
            async for delta in self._stream(list(requests), logprobs, self._client):
                yield delta
        except _Retry as err:
            raise RuntimeError(str(err)) from err

    async def _stream(self, requests: list[GenerateRequest], logprobs: bool, client) -> AsyncIterator[Delta]:
        self.stats.requests += 1
        first = requests[0]
        prompts = list(dict.fromkeys(r.prompt for r in requests))
        n = len(requests) // len(prompts)
        if [r.prompt for r in requests] != [p for p in prompts for _ in range(n)] or any(
            dataclasses.replace(r, prompt=first.prompt) != first for r in requests
        ):
            raise ValueError("an upstream call takes n copies of each prompt in a row, all with one setting")
        body = {
            "model": self.upstream_model,
            "prompt": [list(p) for p in prompts] if len(prompts) > 1 else list(prompts[0]),
            "max_tokens": first.max_tokens,
            "temperature": first.temperature,
            "top_p": first.top_p,
            "n": n,
            "stream": True,
            # Always ask for the sampled token's log-probability (it counts tokens and drives the
            # budget), and for its id (so the text is decoded exactly as in-process).
            "logprobs": first.top_logprobs,
            "return_tokens_as_token_ids": True,
        }
        if first.stop:
            body["stop"] = list(first.stop)
        choices = {i: _Choice() for i in range(len(requests))}
        try:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode(errors="replace")[:500]
                    message = f"upstream server at {self.url} answered {response.status_code}: {detail}"
                    if response.status_code == 429 or response.status_code >= 500:
                        raise _Retry(message)
                    raise ServerEngineError(message)
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RuntimeError(f"upstream server at {self.url}: {event['error'].get('message')}")
                    for data in event.get("choices", []):
                        choice = choices.get(data["index"])
                        if choice is None or choice.finish is not None:
                            continue
                        delta = self._delta(data, choice, first, logprobs)
                        self.stats.tokens_generated += delta.token_count
                        yield delta
                    if all(c.finish is not None for c in choices.values()):
                        return
        finally:
            self.stats.rows_cancelled += sum(c.finish is None for c in choices.values())

    def _delta(self, data: dict, choice: _Choice, request: GenerateRequest, want_logprobs: bool) -> Delta:
        index = data["index"]
        logprobs = data.get("logprobs") or {}
        tokens = list(logprobs.get("tokens") or [])
        # A missing log-probability stays None (JSON null for our client): never 0 bits, which would
        # stretch a budgeted suggestion past eta.
        token_logprobs = (list(logprobs.get("token_logprobs") or []) + [None] * len(tokens))[: len(tokens)]
        top = [
            {
                int(k[len(TOKEN_ID) :]) if k.startswith(TOKEN_ID) else k: v
                for k, v in (alternatives or {}).items()
            }
            for alternatives in list(logprobs.get("top_logprobs") or [])[: len(tokens)]
        ]
        ids = [int(t[len(TOKEN_ID) :]) for t in tokens if t.startswith(TOKEN_ID)]
        if len(ids) != len(tokens):
            ids = []  # a server without token ids: the text is the server's own
        elif self.tokenizer is not None:
            tokens = [self.tokenizer.decode([i]) for i in ids]
        text, finish = data.get("text", ""), data.get("finish_reason")
        end = next((i for i, token in enumerate(ids) if token in self.eos_ids), None)
        if end is not None:
            text = "".join(tokens[:end]) if self.tokenizer is not None else text
            tokens, token_logprobs, top, ids = tokens[:end], token_logprobs[:end], top[:end], ids[:end]
            finish, choice.eos_hit = "stop", True
        if math.isfinite(request.budget_bits) and tokens:
            if None in token_logprobs:
                i = token_logprobs.index(None)
                raise RuntimeError(
                    f"upstream server at {self.url} sent no log-probability for token {i} "
                    f"({tokens[i]!r}) of choice {index}; the NLL budget needs every one"
                )
            bits = choice.bits + [-lp / LN2 for lp in token_logprobs]
            keep = empower_length(bits, request.budget_bits) - len(choice.bits)
            if keep < len(tokens):  # the next token would reach the budget: the text ends before it
                kept_text = "".join(tokens[:keep])
                text = kept_text if text.startswith(kept_text) else text[: len(kept_text)]
                tokens, token_logprobs, top, ids = (
                    tokens[:keep],
                    token_logprobs[:keep],
                    top[:keep],
                    ids[:keep],
                )
                finish = "stop"
                choice.budget_hit, choice.eos_hit = True, False
            choice.bits = bits[: len(choice.bits) + keep]
        choice.text += text
        choice.ids += ids
        choice.logprobs += [lp for lp in token_logprobs if lp is not None]
        choice.top += top
        delta = Delta(index, text, token_count=len(tokens), finish_reason=finish)
        if want_logprobs:
            delta.tokens, delta.token_ids, delta.token_logprobs, delta.top_logprobs = (
                tokens,
                ids,
                token_logprobs,
                top,
            )
        if finish is not None:
            delta.generation = self._generation(choice, request, finish)
        return delta

    def _generation(self, choice: _Choice, request: GenerateRequest, reason: str) -> Generation:
        """The whole generation, decoded from the token ids as the in-process engine does (the server's
        text may end mid-character, and vLLM's ids run through a stop string its text leaves out)."""
        if choice.budget_hit:
            choice.finish = Finish.BUDGET
        elif choice.eos_hit:
            choice.finish = Finish.EOS
        elif reason == "length":
            choice.finish = Finish.LENGTH
        else:  # "stop": one of the request's stop strings, or end-of-sequence
            choice.finish = Finish.STOP
        if self.tokenizer is not None and len(choice.ids) == len(choice.logprobs) and choice.ids:
            top = choice.top if len(choice.top) == len(choice.ids) else None
            generation = finish_row(self.tokenizer, request, choice.ids, choice.logprobs, choice.finish, top)
            if generation.finish is Finish.STOP and not generation.stop:
                generation.finish = Finish.EOS
            return generation
        if choice.finish is Finish.STOP and not request.stop:
            choice.finish = Finish.EOS
        return Generation([], choice.text, choice.logprobs, choice.finish, "", request.prompt)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
