"""The HTTP floor: GET /recommend with the real route's parameters and response shape, and no work.

    uvicorn --factory benchmarks.floor_app:create_floor_app

Three routes, all returning k constant items of the real shape (full-precision floats, as the index
returns them), for benchmarks/serve.py:

- `/recommend`: bare FastAPI: the query parameters validated, a dict returned and written by the
  response model (`RecommendationsOut`, pydantic-core). The floor the service is held against.
- `/recommend-deps`: the same plus the real route's one async dependency (the runtime): with the
  response model, what the FastAPI idiom costs over hand-joined JSON.
- `/recommend-strings`: no dependencies and JSON joined from strings, the pre-issue-18 fast path:
  what the idiom costs over hand-built JSON.
"""

from __future__ import annotations

import math
from json.encoder import encode_basestring as _string
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response

from service.api.schemas import ID_PATTERN, RecommendationsOut
from service.index import Hit

VERSION = "20260101T000000Z-0123abcd"
User = Annotated[str, Query(pattern=ID_PATTERN)]
K = Annotated[int, Query(ge=1)]


POLICY = {"policy": "calibrated", "scale": 1.0, "offset": 0.0}  # the shape the service states its policy in


def _dict(user: str, hits: list[Hit]) -> dict[str, Any]:
    return {"user": user, "model_version": VERSION, "fallback": False, "policy": POLICY,
            "cold_share": sum(h.is_cold for h in hits) / max(len(hits), 1),
            "items": [{"id": h.item_id, "score": h.score, "is_cold": h.is_cold, "model_version": VERSION}
                      for h in hits]}


def _strings(user: str, hits: list[Hit]) -> bytes:
    version = _string(VERSION)
    tail = ',"model_version":' + version + "}"
    items = []
    for hit in hits:
        score = float(hit.score)
        if not math.isfinite(score):
            raise ValueError(f"non-finite score {score}")
        items.append('{"id":' + _string(hit.item_id) + ',"score":' + repr(score)
                     + (',"is_cold":true' if hit.is_cold else ',"is_cold":false') + tail)
    share = sum(h.is_cold for h in hits) / max(len(hits), 1)
    return ('{"user":' + _string(user) + ',"model_version":' + version + ',"fallback":false,'
            '"policy":{"policy":"calibrated","scale":1.0,"offset":0.0},"cold_share":' + repr(share) + ',"items":['
            + ",".join(items) + "]}").encode()


async def _runtime(request: Request) -> object:
    """The one dependency the real route has (its runtime), at module level so FastAPI resolves it."""
    return request.app.state.runtime


Runtime = Annotated[object, Depends(_runtime)]


def create_floor_app() -> FastAPI:
    app = FastAPI(title="m2rec HTTP floor")
    hits = [Hit(f"syn:{123456 + j}", 3.0 - 0.0123456789 * j, j % 3 == 0) for j in range(200)]
    app.state.runtime = object()

    @app.get("/recommend", response_model=RecommendationsOut)
    async def bare(user: User, k: K = 20) -> dict[str, Any]:
        return _dict(user, hits[:k])

    @app.get("/recommend-deps", response_model=RecommendationsOut)
    async def with_runtime(user: User, runtime: Runtime, k: K = 20) -> dict[str, Any]:
        return _dict(user, hits[:k])

    @app.get("/recommend-strings")
    async def strings(user: User, k: K = 20) -> Response:
        return Response(_strings(user, hits[:k]), media_type="application/json")

    @app.get("/readyz")
    def readyz() -> dict[str, bool]:
        return {"ready": True}

    return app
