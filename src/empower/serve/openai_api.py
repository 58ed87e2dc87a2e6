"""OpenAI's completions API as this server speaks it: the request schema and the error shape.

Kept apart from the app so the schema reads as a spec: which fields editor plugins may send, with
which types and ranges (pydantic, strict: "5" is not an integer), and how every refusal looks
(``{"error": {"message", "type", "param", "code"}}``, as OpenAI answers).
"""

from __future__ import annotations

import json

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

# Stop strings: OpenAI allows 4, but editor clients send more (Continue's autocomplete sends a
# dozen or more: its template's special tokens, "\n\n", "```", ...), and vLLM and llama.cpp accept
# them. Every generated token is scanned against each one, so the list is bounded.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 256


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The fields editor plugins send. Unknown fields are refused by name (as OpenAI does)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int | None = Field(1, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=20)  # as vLLM (max_logprobs 20); OpenAI allows 5
    stop: str | list[str] | None = None
    echo: bool | None = False
    best_of: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    # vLLM's extension: each token in ``logprobs`` as "token_id:N", so a client that sent token ids
    # gets exactly the tokens back (empower's server engine asks for it).
    return_tokens_as_token_ids: bool | None = False
    # vLLM's extension: the log-probability of every prompt token (only the token itself: 0).
    prompt_logprobs: int | None = Field(None, ge=0, le=0)


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def stop_strings(stop: str | list[str] | None, param: str = "stop") -> tuple[str, ...]:
    """The request's stop strings, or an :class:`ApiError` naming the bound a list breaks."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(
            400,
            f"'{param}' has {len(stops)} strings; this server takes at most {MAX_STOP_STRINGS}",
            param=param,
        )
    for i, s in enumerate(stops):
        if not s or len(s) > MAX_STOP_CHARS:
            raise ApiError(
                400,
                f"'{param}[{i}]' is {len(s)} characters; each stop string takes 1 to {MAX_STOP_CHARS}",
                param=param,
            )
    return tuple(stops)


def body_too_large(message: str) -> JSONResponse:
    """The 413 of ``empower serve``; ``x-should-retry: false`` tells the official client not to retry."""
    response = ApiError(413, f"{message} (serve_max_body_bytes)", code="request_too_large").response()
    response.headers["x-should-retry"] = "false"
    return response


def validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    location = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = location[0] if location else None
    where = ".".join(location) or "body"
    received = first.get("input")
    shown = json.dumps(received)[:80] if received is not None and first.get("type") != "missing" else None
    message = f"'{where}': {first['msg']}" + (f" (got {shown})" if shown else "")
    if len(err.errors()) > 1:
        message += f" (and {len(err.errors()) - 1} more problem(s))"
    return message, param
