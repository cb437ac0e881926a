"""The HTTP floor: GET /recommend with the real route's parameters and response shape, and no work.

    uvicorn --factory benchmarks.floor_app:create_floor_app

Served the way the real route is (service/api/routes/recommend.py): an `async def` route on the event
loop that validates the same query parameters and serialises 20 constant items of the same shape
with the route's own serialiser. The real route's throughput divided by this one's is the share
left after the service's own work (its middlewares, dependency, store read, fold-in and search).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Query, Response

from service.api.routes.recommend import _body
from service.api.schemas import ID_PATTERN
from service.core.types import Recommendations
from service.index import Hit

VERSION = "20260101T000000Z-0123abcd"


def create_floor_app() -> FastAPI:
    app = FastAPI(title="m2rec HTTP floor")
    # realistic scores: floats of full precision, as the index returns them
    hits = [Hit(f"syn:{123456 + j}", 3.0 - 0.0123456789 * j, j % 3 == 0) for j in range(200)]

    @app.get("/recommend")
    async def recommend(user: Annotated[str, Query(pattern=ID_PATTERN)], k: Annotated[int, Query(ge=1)] = 20,
                        ) -> Response:
        return Response(_body(user, Recommendations(hits[:k], False, VERSION)), media_type="application/json")

    @app.get("/readyz")
    def readyz() -> dict[str, bool]:
        return {"ready": True}

    return app
