"""Any OpenAI-compatible completions server as an engine: vLLM, llama.cpp's server, ``empower serve``.

Prompts go as token ids, so the server sees exactly the prompt the in-process engine would; each
token comes back as its id (vLLM's ``return_tokens_as_token_ids``, which ``empower serve`` speaks
too) with its log-probability. The NLL budget is the labeling rule (:func:`empower.rule.empower_length`)
applied to the sampled tokens' log-probabilities as they stream; the stream is closed at the cut, so
the server stops generating there. Two faces:

- one request at a time, asynchronously (:meth:`OpenAIEngine.generate_one`, :meth:`score_one`
  inside :meth:`session`): :func:`server_engine` wraps them in
  :class:`~empower.engines.wrappers.Resilient`, which adds the engine verbs with requests in flight
  at once, a timeout per attempt and retries with backoff;
- :meth:`OpenAIEngine.stream`, for ``empower serve --engine vllm``: one upstream request per client
  request (``n`` copies of each prompt), its deltas passed on as they come.

Example::

    engine = server_engine("http://127.0.0.1:8000", served_model("http://127.0.0.1:8000"), tokenizer)
    [g] = engine.generate([GenerateRequest(tokenizer("def f(").input_ids, 16, budget_bits=4.0)])
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
from collections.abc import AsyncIterator, Sequence

import httpx

from empower.engines.base import (
    LN2,
    Finish,
    GenerateRequest,
    Generation,
    Retryable,
    ScoreRequest,
    ServerEngineError,
)
from empower.engines.local import finish_row
from empower.engines.wrappers import Delta, EngineStats, Resilient
from empower.rule import empower_length

TOKEN_ID = "token_id:"


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


class OpenAIEngine:
    """An OpenAI-compatible completions server, one request at a time (see the module doc).

    Args:
        url: the server's root (with or without ``/v1``).
        model: the model id to send (:func:`served_model`).
        tokenizer: the served model's tokenizer (prompts are built and generations decoded with it).
        process: a server process this engine owns (stopped by :meth:`close`).
        eos_ids: the model's end-of-sequence ids.
    """

    def __init__(
        self,
        url: str,
        model: str,
        tokenizer=None,
        process: subprocess.Popen | None = None,
        api_key: str | None = None,
        *,
        eos_ids: Sequence[int] = (),
    ):
        self.url, self.upstream_model, self.tokenizer = base_url(url), model, tokenizer
        self.name = f"{self.url}#{model}"
        self.process = process
        # The model's end-of-sequence ids end a generation here even where the server does not stop
        # on them (vLLM serving a LoRA adapter may not), and are never part of it.
        self.eos_ids = set(eos_ids)
        self.stats = EngineStats()
        # Prompt plus generation the server takes (vLLM's --max-model-len, read by check()); None: unknown.
        self.max_model_len: int | None = None
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._client = self.session()

    def check(self) -> None:
        """Ask for one token of a token-id prompt, once, before any work: a server that takes no token
        ids, sends none back or sends no log-probabilities is refused here, naming what it lacks. Reads
        the context length the server lists for the model (:attr:`max_model_len`) where it lists one."""
        start = next(
            i for i in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, 0) if i is not None
        )
        body = {"model": self.upstream_model, "prompt": [start], "max_tokens": 1, "temperature": 0.0,
                "logprobs": 1, "return_tokens_as_token_ids": True}  # fmt: skip
        try:
            response = httpx.post(
                f"{self.url}/v1/completions", json=body, headers=self._headers, timeout=60.0
            )
        except httpx.HTTPError as err:
            raise ServerEngineError(f"{self.name}: cannot be reached ({err})") from err
        why = (
            "; prompts go as token ids so that the server sees exactly the in-process prompt: use vLLM or "
            "empower serve (a simulated human can use a chat server: --human-server-api chat)"
        )
        if response.status_code != 200:
            raise ServerEngineError(
                f"{self.name} does not take a token-id prompt (HTTP {response.status_code}: "
                f"{response.text[:300]}){why}"
            )
        logprobs = response.json()["choices"][0].get("logprobs") or {}
        if not logprobs.get("tokens") or not all(t.startswith(TOKEN_ID) for t in logprobs["tokens"]):
            raise ServerEngineError(
                f"{self.name} sends no token ids back (vLLM's return_tokens_as_token_ids: "
                f"'token_id:N' in logprobs.tokens){why}"
            )
        if None in (logprobs.get("token_logprobs") or [None]):
            raise ServerEngineError(f"{self.name} sends no log-probabilities (logprobs.token_logprobs){why}")
        try:
            listed = httpx.get(f"{self.url}/v1/models", headers=self._headers, timeout=60.0).json()
        except (httpx.HTTPError, ValueError):
            return  # context length unknown: nothing to check it against
        card = next((m for m in listed.get("data", []) if m.get("id") == self.upstream_model), {})
        self.max_model_len = card.get("max_model_len")

    def session(self) -> httpx.AsyncClient:
        """A connection pool for one event loop (``async with``); timeouts are the caller's."""
        return httpx.AsyncClient(
            base_url=self.url, headers=self._headers, timeout=httpx.Timeout(None, connect=10.0)
        )

    async def generate_one(self, client: httpx.AsyncClient, request: GenerateRequest) -> Generation:
        """One attempt at ``request``'s generation. Raises Retryable (connection lost, 429, 5xx) or
        ServerEngineError (any other refusal)."""
        final = None
        try:
            async for delta in self._stream([request], False, client):
                final = delta.generation or final
        except httpx.TransportError as err:
            raise Retryable(f"server {self.url}: {type(err).__name__} {err}") from err
        if final is None:
            raise Retryable(f"server {self.url} closed the stream before the generation ended")
        return final

    async def score_one(self, client: httpx.AsyncClient, request: ScoreRequest) -> list[float]:
        """One attempt at the log-probability of every continuation token given its context, from
        the server's ``prompt_logprobs`` (vLLM's extension; ``empower serve`` speaks it too)."""
        if not request.continuation:
            return []
        prompt = [*request.context, *request.continuation]
        body = {"model": self.upstream_model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
        try:
            response = await client.post("/v1/completions", json=body | {"prompt_logprobs": 0})
        except httpx.TransportError as err:
            raise Retryable(f"server {self.url}: {type(err).__name__} {err}") from err
        if response.status_code != 200:
            self._refused(response.status_code, response.text)
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

    def _refused(self, status: int, detail: str) -> None:
        message = f"upstream server at {self.url} answered {status}: {detail[:500]}"
        raise Retryable(message) if status == 429 or status >= 500 else ServerEngineError(message)

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
        except (Retryable, ServerEngineError) as err:  # the server passes it on to its client in band
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
        if first.banned:
            body["logit_bias"] = {str(token): -100 for token in first.banned}  # the most vLLM allows
        choices = {i: _Choice() for i in range(len(requests))}
        try:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    self._refused(response.status_code, (await response.aread()).decode(errors="replace"))
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
                raise ServerEngineError(
                    f"upstream server at {self.url} sent no log-probability (logprobs.token_logprobs) for "
                    f"token {i} ({tokens[i]!r}) of choice {index}; policy threshold's NLL budget needs every one"
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


def server_engine(
    url: str,
    model: str,
    tokenizer,
    *,
    api_key: str | None = None,
    eos_ids: Sequence[int] = (),
    process: subprocess.Popen | None = None,
    concurrency: int = 8,
    timeout_s: float = 120.0,
    retries: int = 3,
) -> Resilient:
    """The server at ``url`` as an engine, checked (:meth:`OpenAIEngine.check`): :class:`OpenAIEngine`
    with ``concurrency`` requests in flight, ``timeout_s`` per attempt and ``retries`` retries with
    backoff."""
    engine = OpenAIEngine(url, model, tokenizer, process, api_key, eos_ids=eos_ids)
    try:
        engine.check()
    except ServerEngineError:
        engine.close()  # a server process started for it goes too
        raise
    return Resilient(engine, concurrency=concurrency, timeout_s=timeout_s, retries=retries)
