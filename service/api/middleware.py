"""The app's own ASGI middleware: request metrics outermost, the body limit inside it.

Plain ASGI classes, not `@app.middleware("http")`: that wraps every response in streaming
machinery that cost more than the whole recommendation (benchmarks/results/serve.md).
"""

from __future__ import annotations

import time

from fastapi import status
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
# No route reads a body for these methods, so they skip the body limit: one ASGI layer less on
# every read.
_BODILESS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


class Measure:
    """Request count and latency per route template, method and status; requests that may carry a
    body pass through `BodyLimit` inside it (so its 413s are counted)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, body_limit: int) -> None:
        self.app = app
        self.limited = BodyLimit(app, body_limit)
        self.metrics = metrics
        # (template, method, status) -> its series: `labels()` per request costs more than observing
        self._series: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status_code = 500

        async def send_status(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await (self.app if scope["method"] in _BODILESS else self.limited)(scope, receive, send_status)
        finally:
            self._observe(scope, status_code, time.perf_counter() - start)

    def _observe(self, scope: Scope, status_code: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", "unmatched")  # the template, never the raw path with ids
        method = scope["method"] if scope["method"] in _METHODS else "other"
        key = (template, method, str(status_code))
        series = self._series.get(key)
        if series is None:  # bounded: route templates x methods x status codes
            labels = {"route": template, "method": method, "status": key[2]}
            series = self._series[key] = (self.metrics.requests.labels(**labels),
                                          self.metrics.latency.labels(**labels))
        series[0].inc()
        series[1].observe(seconds)


class BodyLimit:
    """413 for bodies over the limit, declared (Content-Length) or streamed (chunked, read up to the
    limit and then replayed), before any route parses them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = chunked = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = value
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                await self._reject(scope, receive, send, int(length))
            else:
                await self.app(scope, receive, send)
            return
        if chunked is None and scope.get("http_version") != "2":  # HTTP/1.x: then there is no body
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._reject(scope, receive, send, size)
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        replay = iter(messages)

        async def replayed() -> Message:
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        response = JSONResponse(
            {"detail": f"request body of at least {size} bytes exceeds {self.limit}; send smaller batches"},
            status_code=status.HTTP_413_CONTENT_TOO_LARGE)
        await response(scope, receive, send)

