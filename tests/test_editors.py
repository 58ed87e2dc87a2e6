"""Editor clients against a real `empower serve` process: the requests they send, replayed as sent.

Each request shape is taken from the client's own source (file and commit named where it is built).
The server runs the tiny random model with the Qwen2.5-Coder fill-in-the-middle special tokens added,
so prompts that carry a rendered FIM template tokenize as they would on the real model.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import urllib.parse
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

from empower.assistant import Policy
from empower.serve.infill import FimTokens, InfillRequest, build_prompt, indent_cut
from empower.serve.server import ServeConfig, create_app, local_engine
from serve_process import serve_process

MODEL = "tiny-fim"
QWEN_FIM_TOKENS = [
    "<|fim_prefix|>",
    "<|fim_suffix|>",
    "<|fim_middle|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]

PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(1, 2))\n"

# Continue's autocomplete stop list for a Qwen coder model (14 strings, after the user's own), as
# continuedev/continue builds it: the template's own stops (core/autocomplete/templating/
# AutocompleteTemplate.ts, qwenCoderFimTemplate, commit 01efdfeb), then getStopTokens' multiline and
# common stops (core/autocomplete/templating/getStopTokens.ts, commit 2ae584e8).
CONTINUE_TEMPLATE_STOPS = [
    "<|endoftext|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<|im_start|>",
    "<|im_end|>",
]
CONTINUE_COMMON_STOPS = ["\n\n", "\r\n\r\n", "/src/", "#- coding: utf-8", "```"]


def continue_request(prompt: str, user_stops: list[str], *, stream: bool = True) -> dict:
    """The body Continue's openai provider POSTs to /v1/completions for an autocomplete.

    core/llm/llms/OpenAI.ts (commit 0069b948), _legacystreamComplete + _convertArgs: the rendered
    FIM template as ``prompt``, the stop list unsliced (a non-OpenAI host), ``stream: true``;
    ``top_p`` and the penalties are undefined and drop out of JSON.stringify. The autocomplete
    provider sets temperature 0.01 when the config leaves it unset (CompletionProvider._prepareLlm);
    max_tokens is the config's ``maxTokens``.
    """
    return {
        "model": MODEL,
        "max_tokens": 64,
        "temperature": 0.01,
        "stream": stream,
        "stop": [*user_stops, *CONTINUE_TEMPLATE_STOPS, *CONTINUE_COMMON_STOPS],
        "prompt": f"<|fim_prefix|>{prompt}<|fim_suffix|>{SUFFIX}<|fim_middle|>",
    }


# Continue sends "Bearer undefined" when no apiKey is configured.
CONTINUE_HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer undefined", "api-key": ""}


@pytest.fixture(scope="module")
def fim_model(tiny, tmp_path_factory):
    """A folder holding the tiny random model with Qwen2.5-Coder's FIM and repository tokens."""
    model, tokenizer = copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1])
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_FIM_TOKENS})
    model.resize_token_embeddings(len(tokenizer))
    folder = tmp_path_factory.mktemp("tiny-fim")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


@pytest.fixture(scope="module")
def server(fim_model, tmp_path_factory):
    folder, _ = fim_model
    args = ["--assistant", str(folder), "--model-name", MODEL, "--max-tokens-limit", "64"]
    with serve_process(args, tmp_path_factory.mktemp("editors") / "server.log") as url:
        yield url


def _post(server: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}/v1/completions", json=body, headers=CONTINUE_HEADERS, timeout=120)


def _streamed(server: str, body: dict) -> tuple[str, str | None]:
    """(text, last finish_reason) of a server-sent-event answer, read as Continue's streamSse does."""
    text, finish, done = "", None, False
    with httpx.stream(
        "POST", f"{server}/v1/completions", json=body, headers=CONTINUE_HEADERS, timeout=120
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk
            text += chunk["choices"][0]["text"]
            finish = chunk["choices"][0]["finish_reason"] or finish
    assert done, "the stream never ended with [DONE]"
    return text, finish


def _greedy(server: str) -> str:
    body = continue_request(PREFIX, [], stream=False) | {"temperature": 0.0, "stop": None}
    response = _post(server, body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_continue_autocomplete_request_is_answered_without_any_of_its_stop_strings(server, fim_model, stream):
    _, tokenizer = fim_model
    body = continue_request(PREFIX, ["\ndef ", "\nclass "])
    assert len(body["stop"]) >= 16  # the request that OpenAI's 4-string limit turned away
    if stream:
        text, finish = _streamed(server, body)
    else:
        response = _post(server, body | {"stream": False})
        assert response.status_code == 200, response.text
        out = response.json()
        text, finish = out["choices"][0]["text"], out["choices"][0]["finish_reason"]
        # The rendered template's markers reach the model as its special tokens, not as text.
        ids = tokenizer(body["prompt"]).input_ids
        assert tokenizer.convert_tokens_to_ids("<|fim_middle|>") in ids
        assert out["usage"]["prompt_tokens"] == len(ids)
    assert finish in ("stop", "length")
    assert not any(stop in text for stop in body["stop"])


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_continue_suggestion_ends_where_its_earliest_stop_string_begins(server, stream):
    greedy = _greedy(server)
    assert len(greedy) > 6
    # Stops of the user's own config come first in Continue's list: two taken from the greedy text,
    # so the cut is known in advance.
    user_stops = [greedy[-3:], greedy[4:6]]
    body = continue_request(PREFIX, user_stops, stream=stream) | {"temperature": 0.0}
    cut = min(i for i in (greedy.find(s) for s in body["stop"]) if i >= 0)
    if stream:
        text, finish = _streamed(server, body)
    else:
        choice = _post(server, body).json()["choices"][0]
        text, finish = choice["text"], choice["finish_reason"]
    assert (text, finish) == (greedy[:cut], "stop")


def test_sixty_four_stop_strings_are_taken(server):
    stops = [f"<stop {i}>" for i in range(64)]
    response = _post(server, continue_request(PREFIX, [], stream=False) | {"stop": stops, "max_tokens": 2})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "stop, needle",
    [
        ([f"<stop {i}>" for i in range(65)], "at most 64"),
        (["x" * 257], "1 to 256"),
        (["\n", ""], "stop[1]"),
    ],
    ids=["too many", "too long", "empty"],
)
def test_stop_lists_past_the_bound_get_a_400_naming_it(server, stop, needle):
    response = _post(server, continue_request(PREFIX, [], stream=False) | {"stop": stop})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "stop" and needle in error["message"]
    assert httpx.get(f"{server}/health").status_code == 200


# ---- llama.vim and llama.vscode: llama.cpp's /infill ------------------------------------------------

EXTRA = [{"text": "def sub(a, b):\n    return a - b\n", "time": [1733390000, 1234], "filename": "util.py"}]
VIM_RESPONSE_FIELDS = [
    "content",
    "timings/prompt_n",
    "timings/prompt_ms",
    "timings/prompt_per_token_ms",
    "timings/prompt_per_second",
    "timings/predicted_n",
    "timings/predicted_ms",
    "timings/predicted_per_token_ms",
    "timings/predicted_per_second",
    "truncated",
    "tokens_cached",
]


def vim_request(prefix: str, middle: str, suffix: str, n_indent: int = 0) -> dict:
    """llama.vim's completion request: ggml-org/llama.vim autoload/llama.vim (commit 02e6a4f3),
    llama#fim: lines above the cursor as input_prefix, the cursor line's start as prompt, the rest
    as input_suffix, ring-buffer chunks (with a reltime ``time``) as input_extra."""
    return {
        "input_prefix": prefix,
        "input_suffix": suffix,
        "input_extra": EXTRA,
        "prompt": middle,
        "n_predict": 256,
        "n_indent": n_indent,
        "top_k": 40,
        "top_p": 0.99,
        "stream": False,
        "samplers": ["top_k", "top_p", "infill"],
        "cache_prompt": True,
        "t_max_prompt_ms": 500,
        "t_max_predict_ms": 1500,
        "response_fields": VIM_RESPONSE_FIELDS,
    }


# llama.vim's s:ring_update: new extra context is sent with n_predict 0 so the server caches it.
VIM_WARMUP = {
    "input_prefix": "",
    "input_suffix": "",
    "input_extra": EXTRA,
    "prompt": "",
    "n_predict": 0,
    "temperature": 0.0,
    "stream": False,
    "samplers": [],
    "cache_prompt": True,
    "t_max_prompt_ms": 1,
    "t_max_predict_ms": 1,
    "response_fields": [""],
}


def vscode_request(prefix: str, middle: str, suffix: str, *, warmup: bool = False) -> dict:
    """llama.vscode's request: ggml-org/llama.vscode src/llama-server.ts (commit 009e5b72),
    createRequestPayload, with the extension's default settings (n_predict 128, t_max_* 500/2500)."""
    if warmup:
        return {
            "input_prefix": "",
            "input_suffix": "",
            "input_extra": EXTRA,
            "prompt": "",
            "n_predict": 0,
            "samplers": [],
            "cache_prompt": True,
            "t_max_prompt_ms": 500,
            "t_max_predict_ms": 1,
        }
    return {
        "input_prefix": prefix,
        "input_suffix": suffix,
        "input_extra": EXTRA,
        "prompt": middle,
        "n_predict": 128,
        "top_k": 40,
        "top_p": 0.99,
        "stream": False,
        "samplers": ["top_k", "top_p", "infill"],
        "cache_prompt": True,
        "t_max_prompt_ms": 500,
        "t_max_predict_ms": 2500,
    }


def _infill(server: str, body: dict | bytes, **headers) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(
            f"{server}/infill", content=body, headers={"Content-Type": "application/json"}, timeout=120
        )
    return httpx.post(f"{server}/infill", json=body, headers=headers, timeout=120)


def _metrics(server: str) -> dict:
    return httpx.get(f"{server}/metrics").json()


VIM_PREFIX, VIM_MIDDLE, VIM_SUFFIX = "def add(a, b):\n", "    return ", "\n\nprint(add(1, 2))\n"


def test_llama_vim_request_gets_exactly_the_response_fields_it_asks_for(server):
    response = _infill(server, vim_request(VIM_PREFIX, VIM_MIDDLE, VIM_SUFFIX))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert sorted(answer) == sorted(VIM_RESPONSE_FIELDS)
    assert isinstance(answer["content"], str) and answer["truncated"] is False
    assert answer["timings/predicted_n"] >= 1 and answer["timings/prompt_ms"] >= 0


def test_infill_prompt_is_llama_cpps_repository_layout_around_the_cursor(server, fim_model):
    _, tokenizer = fim_model
    answer = _infill(server, vscode_request(VIM_PREFIX, VIM_MIDDLE, VIM_SUFFIX)).json()
    chunk = EXTRA[0]
    # tools/server/utils.hpp format_infill: [repo]myproject, [sep]file + text per chunk, [sep]filename,
    # then prefix + prompt before the hole and the suffix after it.
    expected = (
        f"<|repo_name|>myproject\n<|file_sep|>{chunk['filename']}\n{chunk['text']}<|file_sep|>filename\n"
        f"<|fim_prefix|>{VIM_PREFIX}{VIM_MIDDLE}<|fim_suffix|>{VIM_SUFFIX}<|fim_middle|>"
    )
    assert answer["prompt"] == expected
    assert answer["tokens_evaluated"] == len(tokenizer(expected, add_special_tokens=False).input_ids)
    assert answer["timings"]["prompt_n"] == answer["tokens_evaluated"]
    assert answer["stop"] is True and answer["stop_type"] in ("eos", "limit", "word")
    assert answer["tokens_predicted"] == answer["timings"]["predicted_n"] >= 1
    assert answer["has_new_line"] == ("\n" in answer["content"])


@pytest.mark.parametrize(
    "body", [VIM_WARMUP, vscode_request("", "", "", warmup=True)], ids=["llama.vim", "llama.vscode"]
)
def test_warm_up_is_answered_without_generating(server, body):
    before = _metrics(server)
    response = _infill(server, body)
    after = _metrics(server)
    assert response.status_code == 200, response.text
    if body.get("response_fields") == [""]:
        assert response.json() == {}  # no such field: llama.cpp answers an empty object
    else:
        assert response.json()["content"] == "" and response.json()["tokens_predicted"] == 0
    assert after["requests"] == before["requests"] and after["tokens_generated"] == before["tokens_generated"]


def test_streamed_infill_sends_the_text_in_partials_then_a_final_result(server):
    body = vscode_request(VIM_PREFIX, VIM_MIDDLE, VIM_SUFFIX) | {"n_predict": 12}
    whole = _infill(server, body).json()
    events = []
    with httpx.stream("POST", f"{server}/infill", json=body | {"stream": True}, timeout=120) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    partials, final = events[:-1], events[-1]
    assert partials and all(p["stop"] is False for p in partials)
    assert "".join(p["content"] for p in partials) == whole["content"]
    assert final["stop"] is True and final["content"] == "" and final["tokens_predicted"] == 12


def test_infill_stops_where_its_stop_string_begins(server):
    body = vscode_request(VIM_PREFIX, VIM_MIDDLE, VIM_SUFFIX) | {"n_predict": 16}
    greedy = _infill(server, body).json()["content"]
    stop = greedy[5:8]
    answer = _infill(server, body | {"stop": [stop]}).json()
    assert answer["content"] == greedy[: greedy.find(stop)]
    assert (answer["stop_type"], answer["stopping_word"]) == ("word", stop)


def test_a_long_file_is_cut_to_fit_and_reported_truncated(server):
    answer = _infill(
        server, vscode_request("x = 1\n" * 2000, VIM_MIDDLE, "y = 2\n" * 500) | {"n_predict": 4}
    ).json()
    assert answer["truncated"] is True
    assert answer["tokens_evaluated"] <= 1024 - 4  # the tiny model's context minus what is generated
    before, after = answer["prompt"].split("<|fim_suffix|>")
    # The hole keeps its surroundings: the prefix's tail, the suffix's head; the extra chunk goes first.
    assert before.startswith("<|fim_prefix|>") and before.endswith("x = 1\n" + VIM_MIDDLE)
    assert after.startswith("y = 2\n") and after.endswith("<|fim_middle|>")


INFILL_BAD_REQUESTS = [
    ("input_extra not a list", {"input_extra": "util.py"}, "input_extra"),
    ("input_extra chunk without text", {"input_extra": [{"filename": "util.py"}]}, "input_extra"),
    ("input_extra text not a string", {"input_extra": [{"text": 3}]}, "input_extra"),
    ("negative n_predict", {"n_predict": -1}, "n_predict"),
    ("too many stop strings", {"stop": ["x"] * 65}, "stop"),
    ("too long a stop string", {"stop": ["x" * 257]}, "stop"),
    ("no input_prefix", {"input_prefix": None}, "input_prefix"),
]


@pytest.mark.parametrize(
    "change, field", [r[1:] for r in INFILL_BAD_REQUESTS], ids=[r[0] for r in INFILL_BAD_REQUESTS]
)
def test_bad_infill_request_gets_a_400_naming_the_field_and_the_server_stays_up(server, change, field):
    body = {
        k: v
        for k, v in (vscode_request(VIM_PREFIX, VIM_MIDDLE, VIM_SUFFIX) | change).items()
        if v is not None
    }
    response = _infill(server, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_infill_body_that_is_not_json_gets_a_400(server):
    response = _infill(server, b'{"input_prefix": ')
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_a_model_without_fim_tokens_gets_a_400_that_names_one_with_them(tiny_model_path, tmp_path):
    with serve_process(["--assistant", "tiny-random"], tmp_path / "server.log") as plain:
        response = _infill(plain, vscode_request(VIM_PREFIX, VIM_MIDDLE, VIM_SUFFIX))
        assert response.status_code == 400
        message = response.json()["error"]["message"]
        assert "fill-in-the-middle" in message and "qwen2.5-coder-0.5b" in message
        assert httpx.get(f"{plain}/health").status_code == 200


# ---- /infill rules, on the in-process engine --------------------------------------------------------


def _in_process(fim_model, **options) -> TestClient:
    folder, tokenizer = fim_model
    model = AutoModelForCausalLM.from_pretrained(folder)
    config = ServeConfig(assistant=MODEL, **options)
    return TestClient(create_app(config, local_engine(config, model, tokenizer), tokenizer))


def test_infill_needs_the_api_key_when_the_server_has_one(fim_model):
    with _in_process(fim_model, serve_api_key="k") as client:
        body = vscode_request(VIM_PREFIX, VIM_MIDDLE, VIM_SUFFIX) | {"n_predict": 2}
        assert client.post("/infill", json=body).status_code == 401
        assert client.post("/infill", json=body, headers={"Authorization": "Bearer k"}).status_code == 200


@pytest.mark.parametrize("policy", [Policy.BASE_N, Policy.THRESHOLD])
def test_infill_ends_suggestions_as_the_completions_route_does_under_each_policy(fim_model, policy):
    """The same token prompt through /infill and /v1/completions gets the same suggestion."""
    body = vscode_request(VIM_PREFIX, VIM_MIDDLE, VIM_SUFFIX) | {"n_predict": 24}
    with _in_process(fim_model, policy=policy, n=3, eta=6.0) as client:
        infill = client.post("/infill", json=body).json()
        ids = fim_model[1](infill["prompt"], add_special_tokens=False).input_ids
        completion = client.post(
            "/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 24, "temperature": 0}
        ).json()
    choice = completion["choices"][0]
    assert infill["content"] == choice["text"]
    assert infill["tokens_predicted"] == completion["usage"]["completion_tokens"] < 24
    if policy is Policy.BASE_N:  # the suggestion is the cleaned reply's first n tokens
        assert 0 < len(fim_model[1](infill["content"], add_special_tokens=False).input_ids) <= 3
        assert infill["tokens_predicted"] <= 3 + 8


def test_code_that_spells_a_special_token_stays_text(fim_model):
    _, tokenizer = fim_model
    body = InfillRequest(input_prefix="s = '<|fim_middle|>'\n", input_suffix="", input_extra=[])
    prompt = build_prompt(tokenizer, FimTokens.of(tokenizer), body, budget=512)
    assert prompt.ids.count(tokenizer.convert_tokens_to_ids("<|fim_middle|>")) == 1  # only the hole's


def test_n_indent_ends_at_a_later_line_indented_less_keeping_its_indentation():
    # llama.cpp (tools/server/server.cpp, process_token): only lines after the first are checked.
    assert indent_cut("a + b\n    c\n", 4) is None
    assert indent_cut("a + b\n  c", 4) == len("a + b\n  ")
    assert indent_cut("a\n\n", 4) == len("a\n")  # an empty line is indented by 0
    assert indent_cut("x\ny", 0) is None
    assert indent_cut("    x", 8) is None  # the first line is the cursor's own


@pytest.mark.integration
def test_llama_vim_against_the_embedded_fim_model_with_the_threshold_policy(tmp_path):
    """The set-up docs/editors.md recommends: Qwen2.5-Coder-0.5B, threshold policy, eta 4 bits."""
    args = ["--assistant", "qwen2.5-coder-0.5b", "--policy", "threshold", "--eta", "4"]
    with serve_process(args, tmp_path / "server.log") as url:
        answer = _infill(url, vim_request(VIM_PREFIX, VIM_MIDDLE, VIM_SUFFIX, n_indent=4)).json()
        # n_indent 4 ends the suggestion at the next line that is not indented by 4 or more.
        assert answer["content"].rstrip() == "a + b"
        assert answer["timings/predicted_n"] < 256
        warm = _infill(url, VIM_WARMUP)
        assert warm.status_code == 200 and warm.json() == {}
        # t_max_predict_ms: past the limit, the suggestion ends at its first line end (llama.cpp's rule).
        quick = _infill(
            url, vscode_request(VIM_PREFIX, VIM_MIDDLE, VIM_SUFFIX) | {"t_max_predict_ms": 1}
        ).json()
        assert (quick["content"], quick["stop_type"]) == ("a + b\n", "limit")


# ---- docs/editors.md: each configuration produces the requests replayed above -------------------------

EDITORS_DOC = Path(__file__).resolve().parents[1] / "docs" / "editors.md"


def _doc_block(language: str) -> str:
    blocks = re.findall(r"```(\w+)\n(.*?)```", EDITORS_DOC.read_text(), flags=re.DOTALL)
    found = [text for lang, text in blocks if lang == language]
    assert len(found) == 1, f"docs/editors.md should have one {language} block, has {len(found)}"
    return found[0]


def _vim_dict(text: str) -> dict:
    """The entries of llama.vim's g:llama_config, written as a Vim dict or a Lua table."""
    pairs = re.findall(r"'?(\w+)'?\s*[:=]\s*(\"[^\"]*\"|'[^']*'|\d+)", text)
    return {key: value.strip("'\"") if value[0] in "'\"" else int(value) for key, value in pairs}


@pytest.fixture(scope="module")
def documented_server(tmp_path_factory):
    """The server exactly as docs/editors.md starts it (on a free port instead of 8012)."""
    args = shlex.split(_doc_block("sh").strip())
    assert args[:2] == ["empower", "serve"] and args[-2] == "--port"
    with serve_process(args[2:-2], tmp_path_factory.mktemp("documented") / "server.log") as url:
        yield url, int(args[-1])


def _on(url: str, documented_port: int, server: str) -> str:
    """``url`` from a config, with the documented port replaced by the test server's."""
    assert f"127.0.0.1:{documented_port}" in url
    return url.replace(f"http://127.0.0.1:{documented_port}", server)


@pytest.mark.integration
def test_documented_continue_config_sends_the_replayed_request(documented_server):
    server, port = documented_server
    model = yaml.safe_load(_doc_block("yaml"))["models"][0]
    assert model["provider"] == "openai" and "autocomplete" in model["roles"]
    # Continue: new URL("completions", apiBase); the Qwen template only for a "qwen" + "coder" name.
    url = _on(urllib.parse.urljoin(model["apiBase"], "completions"), port, server)
    assert "qwen" in model["model"] and "coder" in model["model"]
    options = model["defaultCompletionOptions"]
    body = continue_request(PREFIX, []) | {
        "model": model["model"],
        "max_tokens": options["maxTokens"],
        "temperature": options["temperature"],
    }
    text, chunks = "", 0
    with httpx.stream("POST", url, json=body, headers=CONTINUE_HEADERS, timeout=300) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
                chunks += 1
    assert chunks >= 1 and not any(stop in text for stop in body["stop"])


@pytest.mark.integration
def test_documented_llama_vscode_settings_send_the_replayed_request(documented_server):
    server, port = documented_server
    settings = json.loads(_doc_block("json"))
    body = vscode_request(VIM_PREFIX, VIM_MIDDLE, VIM_SUFFIX) | {
        "n_predict": settings["llama-vscode.n_predict"],
        "t_max_predict_ms": settings["llama-vscode.t_max_predict_ms"],
    }
    url = _on(settings["llama-vscode.endpoint"], port, server) + "/infill"  # `${endpoint}/infill`
    answer = httpx.post(url, json=body, timeout=300).json()
    assert answer["content"].startswith("a + b") and answer["tokens_predicted"] <= body["n_predict"]
    warmup = vscode_request("", "", "", warmup=True) | {"t_max_prompt_ms": body["t_max_prompt_ms"]}
    assert httpx.post(url, json=warmup, timeout=300).json()["tokens_predicted"] == 0


@pytest.mark.integration
@pytest.mark.parametrize("language", ["lua", "vim"])
def test_documented_llama_vim_config_sends_the_replayed_request(documented_server, language):
    server, port = documented_server
    config = _vim_dict(_doc_block(language))
    assert set(config) == {"endpoint", "n_predict", "t_max_predict_ms"}
    body = vim_request(VIM_PREFIX, VIM_MIDDLE, VIM_SUFFIX, n_indent=4) | {
        "n_predict": config["n_predict"],
        "t_max_predict_ms": config["t_max_predict_ms"],
    }
    url = _on(config["endpoint"], port, server)
    answer = httpx.post(url, json=body, timeout=300).json()
    assert answer["content"].rstrip() == "a + b"
    assert httpx.post(url, json=VIM_WARMUP, timeout=300).json() == {}
