"""Request bodies decoded by pydantic's JSON parser, off the event loop.

FastAPI decodes a JSON body with the standard library's `json.loads`, on the event loop: while a
large batch of items with content vectors (megabytes) decodes, no other request is answered.
pydantic_core's parser (the one `model_validate_json` uses) decodes it faster, and here it runs
in the thread pool. Validation is unchanged: FastAPI
validates the decoded value against the route's models exactly as before.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute

_SMALL = 64 * 1024  # bytes; below this a thread-pool round trip costs more than decoding in place


class JsonBodyRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = (_decode(body) if len(body) < _SMALL else await run_in_threadpool(_decode, body))
            except ValueError as exc:  # FastAPI answers a JSONDecodeError with its usual 422
                raise json.JSONDecodeError(str(exc), body.decode("utf-8", "replace"), 0) from exc
        return self._json


def _decode(body: bytes) -> Any:
    return pydantic_core.from_json(body, allow_inf_nan=True)  # NaN is then refused by the models


class JsonBodyRoute(APIRoute):
    """FastAPI's documented hook for a custom Request class (route_class of an APIRouter)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            return await handler(JsonBodyRequest(request.scope, request.receive))

        return route_handler
