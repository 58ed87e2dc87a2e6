"""ASGI middleware that refuses request bodies over a byte limit with a 413 the client can read.

Both servers (``empower serve`` and ``empower study serve``) use it; each says how its 413 looks.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import Response


class BodyLimit:
    """413 for bodies over ``limit`` bytes, declared (Content-Length) or streamed (chunked).

    The body is read here, never more than ``limit`` bytes kept, and handed on whole, so the app
    (FastAPI turns any failure while reading a body into a 400) never sees an oversized one. An
    oversized body is then read to its end and thrown away before the 413 is sent: clients such as
    the official ``openai`` one write the whole request before reading the answer, and a server that
    stops reading makes them see a reset connection (and retry) instead of the 413. Past ``drain``
    bytes the 413 goes out with ``Connection: close``, so one client cannot keep the server reading.
    """

    def __init__(self, app, limit: int, refuse: Callable[[str], Response], drain: int = 64 << 20):
        self.app, self.limit, self.refuse, self.drain = app, limit, refuse, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        declared = int(declared) if declared is not None and declared.isdigit() else None
        if declared is not None and declared > self.limit:
            # past `drain` nothing is read: seen starts above it, and the connection closes
            return await self._refuse(
                scope, receive, send, seen=0 if declared <= self.drain else declared, more=True
            )
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away mid-body
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(scope, receive, send, seen=len(body), more=more)
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()  # after the body: only http.disconnect is left
            delivered = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, seen: int, more: bool) -> None:
        while more and seen <= self.drain:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)
        response = self.refuse(f"request body is larger than {self.limit} bytes")
        if more:
            response.headers["connection"] = "close"
        await response(scope, receive, send)
