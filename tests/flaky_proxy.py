"""A real HTTP proxy in front of a server that fails on command: the network failures a run meets
(a server restarting, overloaded, gone) without mocking the client that meets them."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve_process import free_port


@dataclass
class Faults:
    """What the proxy does to the next completions: pass ``passing`` of them (None: all), then
    answer ``status`` to ``failing`` of them (None: every one after), then pass again."""

    passing: int | None = None
    failing: int | None = 0
    status: int = 503
    passed: int = 0
    failed: int = 0

    def fail_now(self) -> bool:
        if (
            self.passing is not None
            and self.passed >= self.passing
            and (self.failing is None or self.failed < self.failing)
        ):
            self.failed += 1
            return True
        self.passed += 1
        return False


@contextlib.contextmanager
def flaky_proxy(upstream: str, faults: Faults) -> Iterator[str]:
    """Serve a proxy to ``upstream`` on a free port (a uvicorn thread); yield its URL."""
    app = FastAPI()

    @app.get("/v1/models")
    async def listed():
        return JSONResponse(httpx.get(f"{upstream}/v1/models").json())

    @app.post("/v1/completions")
    async def completions(request: Request):
        if faults.fail_now():
            return JSONResponse({"error": {"message": "injected failure"}}, status_code=faults.status)
        client = httpx.AsyncClient(base_url=upstream, timeout=None)
        upstream_request = client.build_request("POST", "/v1/completions", content=await request.body(),
                                                headers={"content-type": "application/json"})  # fmt: skip
        response = await client.send(upstream_request, stream=True)
        if response.headers.get("content-type", "").startswith("text/event-stream"):

            async def body():
                try:
                    async for chunk in response.aiter_raw():
                        yield chunk
                finally:
                    await response.aclose()
                    await client.aclose()

            return StreamingResponse(body(), status_code=response.status_code, media_type="text/event-stream")
        content = await response.aread()
        await client.aclose()
        return Response(content, status_code=response.status_code, media_type="application/json")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:  # readiness, not a time limit
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()
