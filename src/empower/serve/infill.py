"""llama.cpp's ``POST /infill``, the route llama.vim and llama.vscode complete code through.

The request and answer follow llama.cpp's server (tools/server: ``handle_infill``, ``format_infill``
and the completion result's ``to_json``), so these plugins work unchanged against ``empower serve``:

- The prompt is llama.cpp's repository-level fill-in-the-middle layout, built from the model's own
  special tokens (:class:`FimTokens`)::

      [repo]myproject\\n [sep]<filename>\\n<text> ... [sep]filename\\n [pre]<input_prefix><prompt>[suf]<input_suffix>[mid]

  Text is tokenized with special-token parsing off: code that contains "<|fim_prefix|>" stays text.
  A prompt that does not fit keeps the suffix's head (up to a quarter), the prefix's tail and then
  the most recent extra chunks, and reports ``truncated``.
- ``n_predict`` is clamped to the server's ``--max-tokens-limit`` (llama.cpp clamps to its own
  ``--n-predict``); ``n_predict: 0`` is the plugins' cache warm-up and is answered at once.
- ``n_indent`` and ``t_max_predict_ms`` end a suggestion as llama.cpp does: at a later line indented
  less than ``n_indent`` (the line's text is cut, its indentation kept), or at a line end once
  ``t_max_predict_ms`` has passed. ``stop`` strings are honoured; the model's special tokens end
  a suggestion too. The server's policy decides where suggestions end beyond that.
- Decoding is greedy unless ``temperature`` > 0 is sent (llama.cpp samples at 0.8 by default; a
  suggestion that stops where the human must decide should not be a random draw). ``top_p`` is
  honoured; ``top_k``, ``samplers``, ``cache_prompt``, ``t_max_prompt_ms``, ``id_slot`` and other
  llama.cpp fields are accepted and ignored, as llama.cpp ignores fields it does not know.
- ``response_fields`` (paths such as ``timings/prompt_n``) filters the answer to those fields,
  keyed by path, as llama.cpp's ``json_get_nested_values`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from empower.assistant import PolicyAssistant, SuggestionRequest
from empower.serve.openai_api import ApiError, stop_strings
from empower.serve.suggestions import suggestion_deltas

# Special-token names of the fill-in-the-middle families: (prefix, suffix, middle, pad, repository,
# file separator). The ids always come from the served tokenizer; pad, repository and separator
# are optional. Qwen2.5-Coder and StarCoder2 both name theirs.
FIM_FAMILIES = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>", "<reponame>", "<file_sep>"),
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", None, None, None),  # DeepSeek-Coder
)
# llama.cpp's fixed project name and current-file name in the repository-level layout.
REPO_NAME = "myproject"
CURRENT_FILE = "filename"
FIM_MODEL_HINT = "qwen2.5-coder-0.5b (make install-human)"


@dataclasses.dataclass(frozen=True)
class FimTokens:
    """The served tokenizer's fill-in-the-middle special tokens (names; ids via ``ids``)."""

    prefix: str
    suffix: str
    middle: str
    pad: str | None = None
    repo: str | None = None
    file_sep: str | None = None

    @classmethod
    def of(cls, tokenizer) -> FimTokens | None:
        """The first family whose prefix, suffix and middle tokens are all in the vocabulary."""
        vocab = tokenizer.get_vocab()
        for family in FIM_FAMILIES:
            if all(name in vocab for name in family[:3]):
                return cls(*(name if name in vocab else None for name in family))
        return None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in dataclasses.astuple(self) if n is not None)


def no_fim_message(model_id: str) -> str:
    return (
        f"model {model_id!r} has no fill-in-the-middle tokens (a prefix, a suffix and a middle token "
        f"such as <|fim_prefix|> <|fim_suffix|> <|fim_middle|>), so it cannot fill in code; serve a "
        f"model that has them, such as the embedded {FIM_MODEL_HINT}"
    )


class ExtraChunk(BaseModel):
    """One chunk of ``input_extra``: text from elsewhere in the project (``time`` and others ignored)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    text: str
    filename: str = "tmp"


class InfillRequest(BaseModel):
    """The fields of llama.cpp's /infill this server reads; others are ignored, as llama.cpp does."""

    model_config = ConfigDict(extra="ignore", strict=True)
    input_prefix: str
    input_suffix: str
    input_extra: list[ExtraChunk] = []
    prompt: str = ""
    n_predict: int | None = Field(None, ge=0)
    n_indent: int = Field(0, ge=0)
    t_max_predict_ms: int = 0
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = []
    stream: bool = False
    response_fields: list[str] | None = None


@dataclasses.dataclass
class InfillPrompt:
    ids: list[int]
    truncated: bool


def _encode(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids


def build_prompt(tokenizer, fim: FimTokens, body: InfillRequest, budget: int) -> InfillPrompt:
    """llama.cpp's repository-level FIM prompt as token ids, cut to ``budget`` tokens (see module doc)."""
    special = tokenizer.convert_tokens_to_ids
    lead = tokenizer("", add_special_tokens=True).input_ids  # BOS, for tokenizers that add one
    extra: list[int] = []
    if fim.repo is not None:
        extra += [special(fim.repo), *_encode(tokenizer, f"{REPO_NAME}\n")]
    for chunk in body.input_extra:
        if fim.file_sep is not None:
            extra += [special(fim.file_sep), *_encode(tokenizer, f"{chunk.filename}\n")]
        else:
            extra += _encode(tokenizer, "\n\n--- snippet ---\n\n")  # llama.cpp's separator without one
        extra += _encode(tokenizer, chunk.text)
    if fim.file_sep is not None:
        extra += [special(fim.file_sep), *_encode(tokenizer, f"{CURRENT_FILE}\n")]
    before = _encode(tokenizer, body.input_prefix + body.prompt)
    after = _encode(tokenizer, body.input_suffix)
    room = budget - len(lead) - 3  # the prefix, suffix and middle tokens
    if room < 1:
        raise ApiError(400, f"no room for a prompt in {budget} tokens", param="n_predict")
    truncated = len(before) + len(after) + len(extra) > room
    if len(before) + len(after) > room:  # the suffix's head keeps up to a quarter, the prefix the rest
        after = after[: min(len(after), max(room // 4, room - len(before)))]
        before = before[len(before) - (room - len(after)) :]
    extra = extra[len(extra) - min(len(extra), room - len(before) - len(after)) :]
    ids = [
        *extra,
        *lead,
        special(fim.prefix),
        *before,
        special(fim.suffix),
        *after,
        special(fim.middle),
    ]
    return InfillPrompt(ids, truncated)


def indent_cut(text: str, n_indent: int, start: int = 0) -> int | None:
    """Where llama.cpp's ``n_indent`` rule ends ``text``: at the first character of a later line
    indented by fewer than ``n_indent`` spaces or tabs (the indentation stays). None: not yet.
    ``start``: where to look for the first line end (lines before it are already decided)."""
    if n_indent <= 0:
        return None
    newline = text.find("\n", start)
    while newline != -1:
        start = at = newline + 1
        while at < len(text) and text[at] in " \t":
            at += 1
        if at < len(text) and at - start < n_indent:
            return at
        newline = text.find("\n", start)
    return None


def _nested(paths: list[str], answer: dict) -> dict:
    """llama.cpp's json_get_nested_values: each existing "a/b" path, keyed by the path itself."""
    out = {}
    for path in paths:
        current, found = answer, True
        for key in path.split("/"):
            if isinstance(current, dict) and key in current:
                current = current[key]
            else:
                found = False
                break
        if found:
            out[path] = current
    return out


def _timings(prompt_n: int, prompt_s: float, predicted_n: int, predicted_s: float) -> dict:
    def per(n, seconds):
        return (1000 * seconds / n if n else 0.0), (n / seconds if seconds > 0 else 0.0)

    prompt_per_token, prompt_per_second = per(prompt_n, prompt_s)
    predicted_per_token, predicted_per_second = per(predicted_n, predicted_s)
    return {
        "prompt_n": prompt_n,
        "prompt_ms": 1000 * prompt_s,
        "prompt_per_token_ms": prompt_per_token,
        "prompt_per_second": prompt_per_second,
        "predicted_n": predicted_n,
        "predicted_ms": 1000 * predicted_s,
        "predicted_per_token_ms": predicted_per_token,
        "predicted_per_second": predicted_per_second,
    }


def add_infill_route(
    app: FastAPI, config, engine, policy: PolicyAssistant, fim: FimTokens | None, auth: list, prompt_limit
) -> None:
    """Register ``POST /infill`` on ``app``, its suggestions made by ``policy`` over ``engine``.

    ``fim``: the tokenizer's FIM tokens (``FimTokens.of``);
    ``prompt_limit``: most prompt tokens for a request generating ``max_tokens`` (a function of it:
    the model's context minus what is generated)."""
    tokenizer = policy.tokenizer
    # Any special token in the generated text ends the middle (llama.cpp's end-of-generation set).
    special_stops = tuple(dict.fromkeys([*(fim.names if fim else ()), *tokenizer.all_special_tokens]))

    @app.post("/infill", dependencies=auth)
    async def infill(body: InfillRequest):
        if fim is None:
            raise ApiError(
                400, no_fim_message(config.model_id), param="input_prefix", code="fim_not_supported"
            )
        stops = stop_strings(body.stop)
        max_tokens = min(
            body.n_predict if body.n_predict is not None else config.serve_max_tokens, config.serve_max_tokens
        )
        prompt = build_prompt(tokenizer, fim, body, prompt_limit(max(max_tokens, 1)))
        started = time.perf_counter()
        answer = {
            "index": 0,
            "content": "",
            "tokens": [],
            "id_slot": 0,
            "stop": True,
            "model": config.model_id,
            "tokens_predicted": 0,
            "tokens_evaluated": len(prompt.ids),
            "generation_settings": {
                "n_predict": max_tokens,
                "temperature": body.temperature,
                "top_p": body.top_p,
                "stop": list(stops),
                "n_indent": body.n_indent,
                "t_max_predict_ms": body.t_max_predict_ms,
                "policy": config.policy.value,
            },
            "prompt": tokenizer.decode(prompt.ids),
            "has_new_line": False,
            "truncated": prompt.truncated,
            "stop_type": "limit",
            "stopping_word": "",
            # What the engine keeps for the next request: the prompt, when it has a prefix cache.
            "tokens_cached": len(prompt.ids) if getattr(engine, "prefix_cache", None) is not None else 0,
            "timings": _timings(len(prompt.ids), 0.0, 0, 0.0),
        }
        if max_tokens == 0:  # the plugins' cache warm-up: nothing to generate
            return _final(body, answer)
        request = policy.request_for(
            SuggestionRequest(""),  # the FIM prompt is the model input itself
            prompt_ids=prompt.ids,
            max_tokens=max_tokens,
            stop=(*stops, *special_stops),
            temperature=body.temperature,
            top_p=body.top_p,
        )
        deltas = suggestion_deltas(policy, engine, [SuggestionRequest("")], [request])
        events = _generate(deltas, body, answer, started, set(stops))
        if body.stream:
            return StreamingResponse(_sse(events, body, answer), media_type="text/event-stream")
        async with contextlib.aclosing(events) as pieces:
            async for _ in pieces:
                pass
        return _final(body, answer)


async def _generate(deltas, body: InfillRequest, answer: dict, started: float, user_stops):
    """Yield each new piece of the suggestion and keep ``answer`` up to date; applies n_indent and
    t_max_predict_ms, and leaves the engine (cancelling the row) as soon as either ends it."""
    text, first = "", None
    async with contextlib.aclosing(deltas) as pieces:
        async for delta in pieces:
            now = time.perf_counter()
            first = first or now
            answer["tokens_predicted"] += delta.token_count
            piece, finish = delta.text, delta.finish_reason
            # Only the last line of what came before can still be cut: scan from its start.
            cut = indent_cut(text + piece, body.n_indent, start=max(text.rfind("\n"), 0))
            if cut is not None:
                piece, finish = (text + piece)[len(text) : cut], "limit"
            elif (
                body.t_max_predict_ms > 0
                and ("\n" in piece or "\n" in text)
                and 1000 * (now - first) > body.t_max_predict_ms
            ):
                finish = "limit"
            text += piece
            answer["content"] = text
            if finish == "stop":
                answer["stopping_word"] = delta.stopping_word if delta.stopping_word in user_stops else ""
                answer["stop_type"] = "word" if answer["stopping_word"] else "eos"
            elif finish is not None:
                answer["stop_type"] = "limit"
            if piece:
                yield piece
            if finish is not None:
                break
    ended = time.perf_counter()
    first = first or ended
    answer["has_new_line"] = "\n" in text
    answer["timings"] = _timings(
        answer["tokens_evaluated"], first - started, answer["tokens_predicted"], ended - first
    )


def _final(body: InfillRequest, answer: dict) -> dict:
    return _nested(body.response_fields, answer) if body.response_fields else answer


async def _sse(events, body: InfillRequest, answer: dict) -> AsyncIterator[str]:
    """llama.cpp's stream: a partial result per piece, then the final result (no [DONE] line)."""
    try:
        async with contextlib.aclosing(events) as pieces:
            async for piece in pieces:
                partial = {
                    "index": 0,
                    "content": piece,
                    "tokens": [],
                    "stop": False,
                    "id_slot": 0,
                    "tokens_predicted": answer["tokens_predicted"],
                    "tokens_evaluated": answer["tokens_evaluated"],
                }
                yield f"data: {json.dumps(partial)}\n\n"
    except RuntimeError as err:  # the headers are sent: report in-band, as llama.cpp does
        yield f"data: {json.dumps({'error': {'code': 500, 'message': str(err), 'type': 'server_error'}})}\n\n"
        return
    # In a stream the text went out in the partial results.
    yield f"data: {json.dumps(_final(body, answer | {'content': ''}))}\n\n"
