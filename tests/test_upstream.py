"""The vLLM proxy engine when the upstream server leaves a token's log-probability out.

A real vLLM cannot run here, and a well-behaved one (or our own server, see test_server.py) always
sends them; so the upstream is an ``httpx.MockTransport`` replaying a completion stream in the
OpenAI format with a ``null`` log-probability, the case that used to be counted as 0 bits.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi.testclient import TestClient

from empower.assistant import Policy
from empower.engines import GenerateRequest
from empower.engines.openai import OpenAIEngine
from empower.serve.server import ServeConfig, create_app

URL = "http://upstream.test"
# Two sampled tokens; the second has no log-probability.
CHUNK = {
    "choices": [
        {
            "index": 0,
            "text": "ab",
            "logprobs": {"tokens": ["a", "b"], "token_logprobs": [-0.1, None], "top_logprobs": None},
            "finish_reason": "length",
        }
    ]
}


def _engine(tokenizer=None) -> OpenAIEngine:
    body = f"data: {json.dumps(CHUNK)}\n\ndata: [DONE]\n\n"
    engine = OpenAIEngine(URL, "m", tokenizer)
    engine._client = httpx.AsyncClient(
        base_url=URL, transport=httpx.MockTransport(lambda request: httpx.Response(200, text=body))
    )
    return engine


def _deltas(engine: OpenAIEngine, request: GenerateRequest, logprobs: bool = False) -> list:
    async def collect():
        return [delta async for delta in engine.stream([request], logprobs)]

    return asyncio.run(collect())


def test_an_nll_budget_refuses_a_missing_logprob_instead_of_counting_zero_bits():
    with pytest.raises(
        RuntimeError,
        match=rf"{URL} sent no log-probability \(logprobs.token_logprobs\) for token 1 \('b'\) of choice 0; policy threshold",
    ):
        _deltas(_engine(), GenerateRequest([1, 2, 3], 2, budget_bits=40.0))


def test_without_a_budget_a_missing_logprob_passes_on_as_null():
    [delta] = _deltas(_engine(), GenerateRequest([1, 2, 3], 2), logprobs=True)
    assert delta.tokens == ["a", "b"] and delta.token_logprobs == [-0.1, None]
    assert delta.token_count == 2 and delta.text == "ab"


def test_a_streaming_client_gets_the_error_in_band(tiny):
    _, tokenizer = tiny
    config = ServeConfig(assistant="tiny-random", policy=Policy.THRESHOLD, eta=40.0)
    with TestClient(create_app(config, _engine(tokenizer), tokenizer)) as client:
        response = client.post(
            "/v1/completions", json={"model": "tiny-random", "prompt": "x", "max_tokens": 2, "stream": True}
        )
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    assert response.status_code == 200
    assert [e["error"]["message"] for e in events if "error" in e] == [
        f"upstream server at {URL} sent no log-probability (logprobs.token_logprobs) for token 1 ('b') of "
        "choice 0; policy threshold's NLL budget needs every one"
    ]
