"""Editor clients against a real `empower serve` process: the requests they send, replayed as sent.

Each request shape is taken from the client's own source (file and commit named where it is built).
The server runs the tiny random model with the Qwen2.5-Coder fill-in-the-middle special tokens added,
so prompts that carry a rendered FIM template tokenize as they would on the real model.
"""

from __future__ import annotations

import copy
import json

import httpx
import pytest

from serve_process import serve_process

MODEL = "tiny-fim"
QWEN_FIM_TOKENS = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]

PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(1, 2))\n"

# Continue's autocomplete stop list for a Qwen coder model (14 strings, after the user's own), as
# continuedev/continue builds it: the template's own stops (core/autocomplete/templating/
# AutocompleteTemplate.ts, qwenCoderFimTemplate, commit 01efdfeb), then getStopTokens' multiline and
# common stops (core/autocomplete/templating/getStopTokens.ts, commit 2ae584e8).
CONTINUE_TEMPLATE_STOPS = [
    "<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<|im_start|>", "<|im_end|>",
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
