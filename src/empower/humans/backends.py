"""Where the LLM human's chat completions come from: a local model through the in-process engine,
or any OpenAI-compatible server (vLLM, llama.cpp, ``empower serve``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from transformers import LogitsProcessor

from empower import models
from empower.engines import Finish, GenerateRequest, encode
from empower.engines.local import LocalEngine, eos_token_ids
from empower.humans.base import HumanConfig, HumanServerError

log = logging.getLogger(__name__)


@dataclass
class ChatRequest:
    messages: list[dict]
    max_tokens: int
    prefill: str = ""  # the start of the reply, where the backend supports it (local)
    # local: while this holds for the text added after the prefill, the reply may not end
    hold_end: Callable[[str], bool] | None = None


def ending_tokens(model, tokenizer) -> list[int]:
    """Tokens that end an appender's reply: end-of-sequence, and any token with a backtick (the
    closing fence starts with one)."""
    return eos_token_ids(model, tokenizer) + [i for token, i in tokenizer.get_vocab().items() if "`" in token]


class HoldEnd(LogitsProcessor):
    """Logits processor: a row whose ``hold`` is true of its reply so far cannot end it yet."""

    def __init__(self, tokenizer, holds: list[Callable[[str], bool] | None], ending: list[int]):
        self.tokenizer, self.holds, self.ending, self.step = tokenizer, holds, ending, 0

    def __call__(self, input_ids, scores):
        for row, hold in enumerate(self.holds):
            if hold is None:
                continue
            reply = (
                self.tokenizer.decode(input_ids[row, input_ids.shape[1] - self.step :]) if self.step else ""
            )
            if hold(reply):
                scores[row, self.ending] = float("-inf")
        self.step += 1
        return scores


@dataclass
class ChatReply:
    text: str  # the whole reply, prefill included
    closed: bool  # ended on its own (end-of-sequence or closing fence), not cut by max_tokens


class LocalChat:
    """Chat completions from a local model, through the in-process engine (batched)."""

    supports_prefill = True

    def __init__(
        self, spec: str, config: HumanConfig, model=None, tokenizer=None, pool: models.ModelPool | None = None
    ):
        if model is None:
            model, tokenizer = (pool if pool is not None else models.ModelPool()).load(
                spec, device=config.human_device or None
            )
        self.config = config
        self.engine = LocalEngine(
            model,
            tokenizer,
            batch_size=config.human_batch_size,
            prefix_cache=config.human_prefix_cache,
            name=spec,
        )
        self.tokenizer = tokenizer
        self.label = spec
        self._ending = ending_tokens(model, tokenizer)  # once: it walks the whole vocabulary

    def complete(self, requests: list[ChatRequest]) -> list[ChatReply]:
        replies = []
        for begin in range(0, len(requests), self.config.human_batch_size):
            batch = requests[begin : begin + self.config.human_batch_size]
            texts = [
                self.tokenizer.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True)
                + r.prefill
                for r in batch
            ]
            # The chat template already holds the special tokens.
            prompts = encode(self.tokenizer, texts, add_special_tokens=False)
            holds = [r.hold_end for r in batch]
            gens = self.engine.generate(
                [
                    GenerateRequest(p, r.max_tokens, ("```",), temperature=self.config.human_temperature)
                    for p, r in zip(prompts, batch, strict=True)
                ],
                logits_processors=[HoldEnd(self.tokenizer, holds, self._ending)] if any(holds) else [],
            )
            for r, g in zip(batch, gens, strict=True):
                replies.append(ChatReply(r.prefill + g.text, g.finish in (Finish.EOS, Finish.STOP)))
        return replies


class ServerChat:
    """Chat completions from an OpenAI-compatible server (vLLM, llama.cpp, ...), requests in parallel.

    The ``openai`` client retries connection errors, timeouts, 429 and 5xx with exponential backoff
    (``human_retries`` times); after that a :class:`HumanServerError` names the URL.
    """

    supports_prefill = False

    def __init__(self, url: str, model: str, config: HumanConfig):
        import openai

        self.url, self.config = url, config
        key = os.environ.get("EMPOWER_HUMAN_API_KEY") or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.client = openai.OpenAI(
            base_url=url, api_key=key, timeout=config.human_timeout_s, max_retries=config.human_retries
        )
        served = [m.id for m in self._call(self.client.models.list).data]
        if not served:
            raise HumanServerError(f"simulated human server {url} serves no model")
        self.model = model if model in served else served[0]
        self.label = f"{url}#{self.model}"

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
        response = self._call(
            self.client.chat.completions.create,
            model=self.model,
            messages=request.messages,
            max_tokens=request.max_tokens,
            temperature=self.config.human_temperature,
        )
        choice = response.choices[0]
        return ChatReply(choice.message.content or "", choice.finish_reason == "stop")

    def complete(self, requests: list[ChatRequest]) -> list[ChatReply]:
        with ThreadPoolExecutor(max_workers=self.config.human_concurrency) as pool:
            return list(pool.map(self._one, requests))
