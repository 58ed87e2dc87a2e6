"""Where the LLM human's replies come from: an engine (the in-process one, or any OpenAI-compatible
completions server that takes token ids: vLLM, ``empower serve``), or a server's chat completions.

Both engine backends build the chat prompt here, with the human model's own chat template, start the
reply with the prefill, and hold a reply open while its code stops mid-construct. So a human behind
vLLM is the human in-process: same prompt tokens, same budget, same rule (:func:`generate_held`).
The chat-completions backend is for servers that take no token ids (llama.cpp's): the server applies
its template, nothing is prefilled and nothing is held (docs/assistants-and-humans.md says what that
changes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from empower import models
from empower.engines import Finish, GenerateRequest, Generation, encode
from empower.engines.local import LocalEngine, finish_row
from empower.engines.openai import ServerEngineError, served_model, server_engine
from empower.engines.wrappers import Resilient
from empower.humans.base import HumanConfig, HumanServerError
from empower.prompts import NO_THINKING, chat_text

log = logging.getLogger(__name__)

FENCE = "```"


@dataclass
class ChatRequest:
    messages: list[dict]
    max_tokens: int
    prefill: str = ""  # the start of the reply, where the backend supports it
    # while this holds for the text added after the prefill, the reply may not end
    hold_end: Callable[[str], bool] | None = None


@dataclass
class ChatReply:
    text: str  # the whole reply, prefill included
    closed: bool  # ended on its own (end-of-sequence or closing fence), not cut by max_tokens


def ending_tokens(tokenizer, eos_ids: Sequence[int]) -> set[int]:
    """Tokens that end an appender's reply: end-of-sequence, and any token with a backtick (the
    closing fence starts with one)."""
    return set(eos_ids) | {i for token, i in tokenizer.get_vocab().items() if "`" in token}


@dataclass
class HoldStats:
    """How often held replies tried to end."""

    held: int = 0  # steps retaken with the ending tokens banned


def generate_held(
    engine,
    requests: list[GenerateRequest],
    holds: list[Callable[[str], bool] | None],
    ending: set[int],
    stats: HoldStats,
) -> list[Generation]:
    """Generate, but never end a row with an ending token while its hold is true of its reply so far.

    Generation runs free; where a held row ended (or wrote an ending token), its tokens before that
    step are kept and that one step is taken again with the ending tokens banned (a server gets them
    as ``logit_bias``); then it runs free again. That is exactly generation with those tokens banned
    at every step where the hold is true (elsewhere the ban would change nothing), greedy or sampled,
    on any engine that applies bans: in-process, vLLM, ``empower serve``.
    """
    banned = tuple(sorted(ending))
    kept: list[list[int]] = [[] for _ in requests]
    lps: list[list[float]] = [[] for _ in requests]
    results: list[Generation | None] = [None] * len(requests)
    live = list(range(len(requests)))
    while live:
        gens = engine.generate([_after(requests[i], kept[i]) for i in live])
        retake = []
        for i, g in zip(live, gens, strict=True):
            at = _first_held_end(engine.tokenizer, g, kept[i], holds[i], ending)
            if at is None:
                results[i] = _joined(requests[i], kept[i], lps[i], g, engine.tokenizer)
            else:
                kept[i] += g.ids[:at]
                lps[i] += g.logprobs[:at]
                retake.append(i)
        stats.held += len(retake)
        steps = engine.generate([_after(requests[i], kept[i], 1, banned) for i in retake]) if retake else []
        live = []
        for i, step in zip(retake, steps, strict=True):
            if step.finish is not Finish.LENGTH or len(kept[i]) + 1 >= requests[i].max_tokens:
                results[i] = _joined(
                    requests[i], kept[i], lps[i], step, engine.tokenizer
                )  # a stop, or the end
            else:
                kept[i] += step.ids
                lps[i] += step.logprobs
                live.append(i)
    return results


def _after(request: GenerateRequest, kept: list[int], max_tokens: int = 0, banned=()) -> GenerateRequest:
    """``request`` continued after the tokens already kept (``max_tokens`` of them, when given)."""
    return GenerateRequest(
        request.prompt + tuple(kept),
        max_tokens or request.max_tokens - len(kept),
        request.stop,
        temperature=request.temperature,
        top_p=request.top_p,
        banned=banned,
    )


def _first_held_end(tokenizer, g: Generation, kept: list[int], hold, ending: set[int]) -> int | None:
    """Index in ``g.ids`` of the first ending step taken while ``hold`` was true; None if there is none.
    An end-of-sequence, or a stop string that began at a token's start, is not among the ids: it is the
    step after the last one."""
    if hold is None:
        return None
    steps = [j for j, token in enumerate(g.ids) if token in ending]
    if g.finish in (Finish.EOS, Finish.STOP):
        steps.append(len(g.ids))
    for j in steps:
        if hold(tokenizer.decode(kept + g.ids[:j])):
            return j
    return None


def _joined(request, kept: list[int], lps: list[float], g: Generation, tokenizer) -> Generation:
    if not kept:
        return g
    return finish_row(tokenizer, request, kept + g.ids, lps + g.logprobs, g.finish)


class EngineChat:
    """Chat replies from an engine: the chat template applied here, the prefill as prompt tokens, the
    reply held open by :func:`generate_held`."""

    supports_prefill = True

    def __init__(self, engine, eos_ids: Sequence[int], temperature: float, label: str):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.temperature, self.label = temperature, label
        self.ending = ending_tokens(self.tokenizer, eos_ids)  # once: it walks the whole vocabulary
        self.hold_stats = HoldStats()

    def complete(self, requests: list[ChatRequest]) -> list[ChatReply]:
        if not requests:
            return []
        texts = [chat_text(self.tokenizer, r.messages) + r.prefill for r in requests]
        # The chat template already holds the special tokens.
        prompts = encode(self.tokenizer, texts, add_special_tokens=False)
        asked = [
            GenerateRequest(p, r.max_tokens, (FENCE,), temperature=self.temperature)
            for p, r in zip(prompts, requests, strict=True)
        ]
        gens = generate_held(self.engine, asked, [r.hold_end for r in requests], self.ending, self.hold_stats)
        return [
            ChatReply(r.prefill + g.text, g.finish in (Finish.EOS, Finish.STOP))
            for r, g in zip(requests, gens, strict=True)
        ]


class LocalChat(EngineChat):
    """The human's model in-process (batched, prompt prefixes cached turn to turn)."""

    def __init__(
        self, spec: str, config: HumanConfig, model=None, tokenizer=None, pool: models.ModelPool | None = None
    ):
        if model is None:
            model, tokenizer = (pool if pool is not None else models.ModelPool()).load(
                spec, device=config.human_device or None
            )
        engine = LocalEngine(
            model,
            tokenizer,
            batch_size=config.human_batch_size,
            prefix_cache=config.human_prefix_cache,
            name=spec,
        )
        super().__init__(engine, engine.eos_ids, config.human_temperature, spec)


def _served(url: str, config: HumanConfig, key: str | None) -> str:
    """The human's model name on the server at ``url`` (HumanServerError when it cannot be reached)."""
    try:
        return served_model(url, config.human_served_model, key, timeout_s=config.human_timeout_s)
    except ServerEngineError as err:
        raise HumanServerError(f"simulated human server {url} unreachable: {err}") from err


def human_server_engine(url: str, config: HumanConfig, tokenizer=None) -> Resilient:
    """The human's completions server as an engine (``human_model`` names the local tokenizer)."""
    key = os.environ.get("EMPOWER_HUMAN_API_KEY")
    served = _served(url, config, key)
    tokenizer = tokenizer if tokenizer is not None else models.load_tokenizer(config.human_model)
    return server_engine(
        url,
        served,
        tokenizer,
        api_key=key,
        eos_ids=models.eos_ids(config.human_model, tokenizer),
        concurrency=config.human_concurrency,
        timeout_s=config.human_timeout_s,
        retries=config.human_retries,
    )


class ServerChat(EngineChat):
    """The human's model behind a completions server that takes token ids (vLLM, ``empower serve``):
    the same prompt tokens, prefill and hold as in-process."""

    def __init__(self, url: str, config: HumanConfig, tokenizer=None):
        engine = human_server_engine(url, config, tokenizer)
        super().__init__(engine, sorted(engine.eos_ids), config.human_temperature, engine.name)

    def complete(self, requests: list[ChatRequest]) -> list[ChatReply]:
        try:
            return super().complete(requests)
        except ServerEngineError as err:
            raise HumanServerError(f"simulated human: {err}") from err


class ChatAPI:
    """Chat completions from a server that takes no token ids (llama.cpp's), requests in parallel.

    The server applies its own chat template (asked not to think where it can be); the reply is not
    prefilled and not held open. The ``openai`` client retries connection errors, timeouts, 429 and
    5xx with exponential backoff (``human_retries`` times); after that a :class:`HumanServerError`
    names the URL.
    """

    supports_prefill = False

    def __init__(self, url: str, config: HumanConfig):
        import openai

        self.url, self.config = url, config
        key = os.environ.get("EMPOWER_HUMAN_API_KEY") or "EMPTY"
        self.model = _served(url, config, key)
        self.client = openai.OpenAI(
            base_url=url, api_key=key, timeout=config.human_timeout_s, max_retries=config.human_retries
        )
        self.label = f"{url}#{self.model}"
        # vLLM and SGLang pass these to the template (reasoning models reply without thinking).
        self.template_kwargs: dict | None = {"chat_template_kwargs": NO_THINKING}

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
        ask = dict(model=self.model, messages=request.messages, max_tokens=request.max_tokens,
                   temperature=self.config.human_temperature)  # fmt: skip
        try:
            response = self._call(self.client.chat.completions.create, **ask, extra_body=self.template_kwargs)
        except HumanServerError as err:
            if not (self.template_kwargs and "chat_template_kwargs" in str(err)):
                raise
            # A server that refuses the argument by name (OpenAI's own) has no template to pass it to.
            self.template_kwargs = None
            response = self._call(self.client.chat.completions.create, **ask)
        choice = response.choices[0]
        return ChatReply(choice.message.content or "", choice.finish_reason == "stop")

    def complete(self, requests: list[ChatRequest]) -> list[ChatReply]:
        with ThreadPoolExecutor(max_workers=self.config.human_concurrency) as pool:
            return list(pool.map(self._one, requests))
