"""Request bodies decoded by pydantic's JSON parser, off the event loop, after the API key.

FastAPI decodes a JSON body with the standard library's `json.loads`, on the event loop: while a
large batch of items with content vectors (megabytes) decodes, no other request is answered.
pydantic_core's parser (the one `model_validate_json` uses) decodes it faster, and here it runs
in the thread pool. Validation is unchanged: FastAPI
validates the decoded value against the route's models exactly as before.

FastAPI reads and decodes the body before it runs a route's dependencies, so a write with a
malformed body and no key would be told about its JSON (422) instead of its key (401): routes that
need the key check it here first. A decode error names its line and column.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute

from service.api.deps import require_api_key, runtime_of

_SMALL = 64 * 1024  # bytes; below this a thread-pool round trip costs more than decoding in place


class JsonBodyRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = (_decode(body) if len(body) < _SMALL else await run_in_threadpool(_decode, body))
            except ValueError as exc:  # FastAPI answers a JSONDecodeError with a 422 (app.py words it)
                text = body.decode("utf-8", "replace")
                raise json.JSONDecodeError(str(exc), text, _offset(text, str(exc))) from exc
        return self._json


_POSITION = re.compile(r"line (\d+) column (\d+)")


def _offset(text: str, message: str) -> int:
    """Character offset of pydantic_core's "... at line L column C" in `text` (0 when it names none)."""
    found = _POSITION.search(message)
    if found is None:
        return 0
    line, column = int(found[1]), int(found[2])
    starts = [0, *(m.end() for m in re.finditer("\n", text))]
    return min(starts[min(line, len(starts)) - 1] + max(column - 1, 0), len(text))


def _decode(body: bytes) -> Any:
    return pydantic_core.from_json(body, allow_inf_nan=True)  # NaN is then refused by the models


class JsonBodyRoute(APIRoute):
    """FastAPI's documented hook for a custom Request class (route_class of an APIRouter)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        guarded = any(d.call is require_api_key for d in self.dependant.dependencies)

        async def route_handler(request: Request) -> Response:
            if guarded:  # 401 before anything about the body (the dependency checks again: cheap)
                await require_api_key(runtime_of(request).settings, request.headers.get("x-api-key"))
            return await handler(JsonBodyRequest(request.scope, request.receive))

        return route_handler
