"""The completion server: the official `openai` client against a real `empower serve` process.

One server process (tiny random model, API key, on a free 127.0.0.1 port) is shared by the module;
the policies are checked on the in-process engine. Run: ``pytest tests/test_server.py``.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from empower.assistant import (
    AssistantConfig,
    Policy,
    PolicyAssistant,
    SuggestionRequest,
    build_assistant,
)
from empower.engines import GenerateRequest, ScoreRequest
from empower.engines.local import LocalEngine
from empower.engines.openai import OpenAIEngine
from empower.engines.wrappers import Batcher, _first_stop_at, _stop_prefix
from empower.rule import empower_length
from empower.serve.server import ServeConfig, create_app, local_engine
from serve_process import serve_process

KEY = "test-key"
MODEL = "tiny-random"
PROMPT = "def add(a, b):\n"


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    """Base URL of a running `empower serve` subprocess (stopped after the module)."""
    args = ["--assistant", MODEL, "--api-key", KEY, "--max-tokens-limit", "900", "--max-body-bytes", "20000"]
    with serve_process(args, tmp_path_factory.mktemp("server") / "server.log") as url:
        yield url


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def _metrics(server) -> dict:
    return httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}).json()


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_reports_text_and_usage(client, tiny):
    _, tokenizer = tiny
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 6
    assert out.usage.prompt_tokens == len(tokenizer(PROMPT).input_ids)
    assert len(tokenizer(out.choices[0].text, add_special_tokens=False).input_ids) >= 1


def test_streaming_yields_the_same_text_as_one_response(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    )
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_streaming_reports_usage_when_asked(client):
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_every_prompt_gets_n_choices(client):
    out = client.completions.create(
        model=MODEL, prompt=[PROMPT, "import os\n"], n=2, max_tokens=3, temperature=0.8
    )
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 12


def test_logprobs_describe_each_generated_token(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    assert "".join(logprobs.tokens) == out.choices[0].text
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) == 2 and chosen == pytest.approx(max(top.values()))  # greedy picks the top token


def test_stop_string_ends_the_suggestion_before_it(client):
    text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].text == text[: text.find(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_concurrent_clients_share_a_generate_batch(client, server):
    barrier = threading.Barrier(4)

    def ask():
        barrier.wait()
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=48, temperature=0)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _metrics(server)["max_batch_rows"] > 1


def test_client_disconnect_stops_the_generation(server):
    before = _metrics(server)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    for _ in range(200):  # until the worker has seen the cancellation
        after = _metrics(server)
        if after["rows_cancelled"] > before["rows_cancelled"]:
            break
        time.sleep(0.05)
    assert after["rows_cancelled"] == before["rows_cancelled"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < 900


def test_abandoned_non_streaming_request_stops_too(server):
    before = _metrics(server)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 900, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up (and closes the connection) after 1 s
        httpx.post(
            f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=1.0
        )
    for _ in range(200):
        after = _metrics(server)
        if after["rows_cancelled"] > before["rows_cancelled"]:
            break
        time.sleep(0.05)
    assert after["rows_cancelled"] == before["rows_cancelled"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < 900


BAD_REQUESTS = [
    ("malformed JSON", b'{"model": "tiny-random", "prompt": ', 400, "not valid JSON"),
    ("wrong type", {"model": MODEL, "prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens"),
    ("unknown field", {"model": MODEL, "prompt": PROMPT, "best_guess": 1}, 400, "best_guess"),
    ("unknown model", {"model": "gpt-9", "prompt": PROMPT}, 404, "gpt-9"),
    ("oversized body", {"model": MODEL, "prompt": "x" * 30000}, 413, "larger than 20000 bytes"),
    ("prompt too long", {"model": MODEL, "prompt": "x " * 4000}, 400, "tokens"),
    ("max_tokens over the limit", {"model": MODEL, "prompt": PROMPT, "max_tokens": 5000}, 400, "max_tokens"),
    ("temperature out of range", {"model": MODEL, "prompt": PROMPT, "temperature": 7}, 400, "temperature"),
    ("empty prompt list", {"model": MODEL, "prompt": []}, 400, "prompt"),
    (
        "suffix without FIM tokens",
        {"model": MODEL, "prompt": PROMPT, "suffix": "\n"},
        400,
        "fill-in-the-middle",
    ),
    ("token id out of range", {"model": MODEL, "prompt": [10**9]}, 400, "token ids"),
]


@pytest.mark.parametrize(
    "body, status, needle", [r[1:] for r in BAD_REQUESTS], ids=[r[0] for r in BAD_REQUESTS]
)
def test_bad_request_gets_a_4xx_and_the_server_stays_up(server, body, status, needle):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{server}/v1/completions",
        content=content,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    assert httpx.get(f"{server}/health").status_code == 200


FIVE_MB = 5_000_000


def test_official_client_reads_the_413_of_a_5_mb_body_and_does_not_retry(server):
    sent = []
    http = openai.DefaultHttpxClient(event_hooks={"request": [sent.append]})
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=3, http_client=http)
    with pytest.raises(openai.APIStatusError) as raised:
        client.completions.create(model=MODEL, prompt="x" * FIVE_MB, max_tokens=2)
    assert raised.value.status_code == 413
    assert raised.value.body["code"] == "request_too_large"
    assert len(sent) == 1
    assert httpx.get(f"{server}/health").status_code == 200


def test_chunked_oversized_body_is_a_413_too(server):
    """No Content-Length: the limit counts streamed bytes (FastAPI alone would answer 400)."""
    response = httpx.post(
        f"{server}/v1/completions",
        content=(b"x" * 65536 for _ in range(FIVE_MB // 65536)),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert response.status_code == 413 and "larger than" in response.json()["error"]["message"]


def test_a_body_past_the_drain_bound_is_refused_and_the_connection_closed():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse

    from empower.serve.body_limit import BodyLimit

    echo = Starlette()
    echo.add_route("/", lambda request: PlainTextResponse("read"), methods=["POST"])
    app = BodyLimit(echo, limit=10, refuse=lambda m: PlainTextResponse(m, status_code=413), drain=100)
    with TestClient(app) as local:
        assert local.post("/", content=b"x" * 10).text == "read"
        drained = local.post("/", content=b"x" * 50)
        assert drained.status_code == 413 and "connection" not in drained.headers
        closed = local.post("/", content=b"x" * 500)
        assert closed.status_code == 413 and closed.headers["connection"] == "close"


def test_unknown_path_gets_an_openai_shaped_404(server):
    response = httpx.get(f"{server}/v1/chat/nothing")
    assert response.status_code == 404 and "/v1/chat/nothing" in response.json()["error"]["message"]


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_requests_without_the_api_key_are_refused(server, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(
        f"{server}/v1/completions", json={"model": MODEL, "prompt": PROMPT}, headers=headers
    )
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_openai_client_with_a_wrong_key_gets_an_authentication_error(server):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)


def test_health_needs_no_key(server):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


# ---- policies, on the in-process engine ---------------------------------------------------------


def _run(engine, requests: list[GenerateRequest], logprobs: bool = False) -> list:
    async def collect():
        return [delta async for delta in engine.stream(requests, logprobs)]

    return asyncio.run(collect())


def _policy(tiny, **fields) -> PolicyAssistant:
    config = ServeConfig(assistant=MODEL, **fields).assistant_config
    return PolicyAssistant(config, LocalEngine(*tiny))


@pytest.fixture
def prompt_ids(tiny) -> list[int]:
    return tiny[1](PROMPT).input_ids


def test_the_batcher_streams_what_the_engine_generates(tiny, prompt_ids):
    """The wrapper adds no rule of its own: its deltas join into the engine's generation."""
    engine = LocalEngine(*tiny, prefix_cache=0)
    batcher = Batcher(LocalEngine(*tiny, prefix_cache=0))
    requests = [GenerateRequest(prompt_ids, 10), GenerateRequest(prompt_ids[:3], 6, budget_bits=40.0)]
    try:
        deltas = _run(batcher, requests, logprobs=True)
    finally:
        batcher.close()
    for index, g in enumerate(engine.generate(requests)):
        mine = [d for d in deltas if d.index == index]
        assert "".join(d.text for d in mine) == g.text and len(mine) > 1
        assert [lp for d in mine for lp in d.token_logprobs] == pytest.approx(g.logprobs, abs=1e-4)
        assert mine[-1].generation.ids == g.ids and all(d.finish_reason is None for d in mine[:-1])
    # The budgeted row ends first, without waiting for the rest of its batch.
    assert [(d.index, d.finish_reason) for d in deltas if d.finish_reason] == [(1, "stop"), (0, "length")]


def test_the_batcher_gathers_callers_on_many_threads_into_shared_generate_calls(tiny, prompt_ids):
    """Its engine verb, called from 8 threads at once: the engine's generations, in fewer batches."""
    engine = LocalEngine(*tiny, prefix_cache=0)
    batcher = Batcher(LocalEngine(*tiny, prefix_cache=0), max_batch_rows=8, batch_wait_s=0.05)
    requests = [
        GenerateRequest(prompt_ids[: 3 + k], 6, budget_bits=40.0 if k % 2 else math.inf) for k in range(8)
    ]
    try:
        with ThreadPoolExecutor(8) as pool:
            made = list(pool.map(lambda r: batcher.generate([r])[0], requests))
        scored = batcher.score(
            [ScoreRequest(r.prompt, tuple(g.ids)) for r, g in zip(requests, made, strict=True)]
        )
    finally:
        batcher.close()
    for got, want, logprobs in zip(made, engine.generate(requests), scored, strict=True):
        assert (got.ids, got.text, got.finish) == (want.ids, want.text, want.finish)
        assert got.logprobs == pytest.approx(logprobs, abs=1e-4)
    assert batcher.stats.rows == 8 and batcher.stats.batches < 8


def test_the_batcher_keeps_calls_of_different_kinds_in_separate_batches(tiny, prompt_ids):
    """Short and long replies asked at once from many threads: each generate call holds one kind (a
    static batch runs to its longest row), and every caller still gets the engine's generation."""
    engine = LocalEngine(*tiny, prefix_cache=0)
    batcher = Batcher(LocalEngine(*tiny, prefix_cache=0), max_batch_rows=8, batch_wait_s=0.05)
    calls: list[set[int]] = []
    real = batcher.engine.generate

    def recorded(requests, *args, **kwargs):
        calls.append({r.max_tokens for r in requests})
        return real(requests, *args, **kwargs)

    batcher.engine.generate = recorded
    requests = [GenerateRequest(prompt_ids[: 3 + k], 3 if k % 2 else 9) for k in range(12)]
    try:
        with ThreadPoolExecutor(12) as pool:
            made = list(pool.map(lambda r: batcher.generate([r])[0], requests))
    finally:
        batcher.close()
    for got, want in zip(made, engine.generate(requests), strict=True):
        assert (got.ids, got.text, got.finish) == (want.ids, want.text, want.finish)
    assert all(len(kinds) == 1 for kinds in calls)
    assert batcher.stats.rows == 12 and batcher.stats.batches < 12


def test_threshold_keeps_the_tokens_the_labeling_rule_keeps(tiny, prompt_ids):
    policy = _policy(tiny, policy=Policy.THRESHOLD, eta=40.0)
    batcher = Batcher(LocalEngine(*tiny))
    try:
        free = _run(batcher, [GenerateRequest(prompt_ids, 10)], logprobs=True)
        bits = [-lp / 0.6931471805599453 for d in free for lp in d.token_logprobs]
        request = policy.request_for(SuggestionRequest(PROMPT), prompt_ids=prompt_ids, max_tokens=10)
        kept = _run(batcher, [request])
    finally:
        batcher.close()
    assert 0 < empower_length(bits, 40.0) < 10  # the case is informative: eta cuts inside the budget
    assert sum(d.token_count for d in kept) == empower_length(bits, 40.0)
    assert kept[-1].finish_reason == "stop"


def test_an_editor_retyping_its_file_gets_the_same_completions_from_cached_prefixes(tiny, prompt_ids):
    """Each request extends the last (typing); with the prefix cache only the new tokens are encoded."""
    batchers = {size: Batcher(LocalEngine(*tiny, prefix_cache=size)) for size in (0, 16)}
    seen = {}
    try:
        for size, batcher in batchers.items():
            seen[size] = [[(d.text, d.tokens) for d in _run(batcher, [GenerateRequest(prompt_ids + typed, 8)], True)]
                          for typed in ([], prompt_ids[:3], prompt_ids[:3] + prompt_ids[:5])]  # fmt: skip
    finally:
        for batcher in batchers.values():
            batcher.close()
    assert seen[16] == seen[0]
    assert batchers[0].prefix_cache is None and batchers[16].prefix_cache.reused_tokens > len(prompt_ids)


def test_upstream_engine_cuts_the_stream_where_the_threshold_rule_does(server, prompt_ids):
    """The --engine vllm proxy, with our own server standing in for vLLM (same OpenAI API)."""
    upstream = OpenAIEngine(server, MODEL, api_key=KEY)
    bits = [-lp / 0.6931471805599453 for d in _run(upstream, [GenerateRequest(prompt_ids, 10)], True)
            for lp in d.token_logprobs]  # fmt: skip
    kept = _run(upstream, [GenerateRequest(prompt_ids, 10, budget_bits=40.0)])
    assert 0 < empower_length(bits, 40.0) < 10
    assert sum(d.token_count for d in kept) == empower_length(bits, 40.0)
    assert kept[-1].finish_reason == "stop"


def _in_process(model, tokenizer, **options) -> TestClient:
    config = ServeConfig(assistant=MODEL, **options)
    return TestClient(create_app(config, local_engine(config, model, tokenizer), tokenizer))


def test_suffix_is_dropped_when_the_server_is_told_to(tiny):
    with _in_process(*tiny, serve_ignore_suffix=True) as client:
        plain = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
        with_suffix = client.post(
            "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "suffix": "\n", "max_tokens": 2}
        )
    assert with_suffix.status_code == 200
    assert with_suffix.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]


def test_suffix_becomes_a_fill_in_the_middle_prompt_when_the_tokenizer_has_fim_tokens(tiny):
    model, tokenizer = copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1])
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]}
    )
    model.resize_token_embeddings(len(tokenizer))
    with _in_process(model, tokenizer) as client:
        out = client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "a = ", "suffix": "\nb = a", "max_tokens": 2}
        )
    expected = tokenizer("<fim_prefix>a = <fim_suffix>\nb = a<fim_middle>").input_ids
    assert out.status_code == 200 and out.json()["usage"]["prompt_tokens"] == len(expected)


def test_the_stream_holds_back_what_could_begin_a_stop_string():
    assert _first_stop_at("x = 1\n\ny = 2", ("y", "\n\n")) == 5
    assert _stop_prefix("x = 1\n", 0, ("\n\n",)) == 1  # "\n" may start "\n\n": not sent yet
    assert _stop_prefix("x = 1", 0, ("\n\n",)) == 0


STATES = ["def add(a, b):\n    ", "import os\n\n\ndef main():\n    path = os.getcwd()\n    ", "x = ["]


@pytest.mark.parametrize("policy", list(Policy))
def test_serve_and_eval_give_the_same_suggestion_for_the_same_state(tiny, tiny_model_path, policy):
    """One policy module: /v1/completions (streamed or not) and empower eval's assistant agree."""
    fields = dict(policy=policy, n=3, eta=40.0)
    config = AssistantConfig(assistant=tiny_model_path, max_new_tokens=12, **fields)
    evaluated = build_assistant(config, model=tiny[0], tokenizer=tiny[1]).suggest(
        [SuggestionRequest(state) for state in STATES]
    )
    if policy is Policy.THRESHOLD:  # the case is informative: eta cuts inside the budget
        assert any(s.stop_reason == "threshold" for s in evaluated)
    if policy is Policy.BASE_N:
        assert any(s.stop_reason == "cap" for s in evaluated)
    with _in_process(*tiny, **fields) as client:
        for state, suggestion in zip(STATES, evaluated, strict=True):
            body = {"model": MODEL, "prompt": state, "max_tokens": 12, "temperature": 0}
            whole = client.post("/v1/completions", json=body).json()["choices"][0]
            streamed = client.post("/v1/completions", json=body | {"stream": True}).text
            pieces = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
            assert whole["text"] == suggestion.text
            assert "".join(p["choices"][0]["text"] for p in pieces) == suggestion.text
            assert whole["finish_reason"] == ("length" if suggestion.stop_reason == "max_tokens" else "stop")


def test_base_policies_refuse_logprobs_by_name(tiny):
    with _in_process(*tiny, policy=Policy.BASE_N) as client:
        out = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "logprobs": 1})
    assert out.status_code == 400 and out.json()["error"]["param"] == "logprobs"


def test_config_refuses_a_nonpositive_limit():
    with pytest.raises(ValueError, match="serve_max_tokens"):
        ServeConfig(assistant=MODEL, serve_max_tokens=0)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"serve_vllm_dtype": "fp8"}, "serve_vllm_dtype must be one of float32, bfloat16, float16, auto"),
        ({"serve_vllm_max_model_len": -1}, "serve_vllm_max_model_len must be >= 0"),
        ({"serve_vllm_tensor_parallel_size": 0}, "serve_vllm_tensor_parallel_size must be >= 1"),
        (
            {"serve_vllm_gpu_memory_utilization": 1.5},
            r"serve_vllm_gpu_memory_utilization must be in \[0, 1\]",
        ),
    ],
)
def test_config_refuses_impossible_vllm_settings_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig(assistant=MODEL, serve_engine="vllm", **fields)


def test_vllm_settings_beside_a_running_server_are_refused_naming_the_flags():
    """--engine-url names a server that runs already: settings for one started here would be lost."""
    with pytest.raises(ValueError, match="--vllm-dtype, --vllm-tensor-parallel-size configure a vLLM server"):
        ServeConfig(assistant=MODEL, serve_engine_url="http://127.0.0.1:8001", serve_vllm_dtype="bfloat16",
                    serve_vllm_tensor_parallel_size=2)  # fmt: skip
    ServeConfig(assistant=MODEL, serve_engine_url="http://127.0.0.1:8001")  # the defaults are no request


def test_the_vllm_python_is_the_venv_then_this_python_with_vllm(tmp_path, monkeypatch):
    from empower.serve import upstream

    monkeypatch.chdir(tmp_path)  # no .venv-vllm here
    assert upstream.vllm_python("/opt/vllm/bin/python") == "/opt/vllm/bin/python"
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(FileNotFoundError, match=r"make install-vllm.*pip install vllm"):
            upstream.vllm_python()
    venv = tmp_path / ".venv-vllm" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").touch()
    assert upstream.vllm_python() == ".venv-vllm/bin/python"
