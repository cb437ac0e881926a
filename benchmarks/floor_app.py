"""The HTTP floor: GET /recommend with the real route's parameters and response shape, and no work.

    uvicorn --factory benchmarks.floor_app:create_floor_app

A sync route (served from the thread pool, as the real one is) that validates the same query
parameters and returns 20 constant items through the same pydantic response model. The real
route's throughput divided by this one's is the share left after the service's own work.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Query

from service.schemas import ID_PATTERN, RecommendationsOut, RecommendedItem

VERSION = "20260101T000000Z-0123abcd"


def create_floor_app() -> FastAPI:
    app = FastAPI(title="m2rec HTTP floor")
    hits = [(f"syn:{123456 + j}", 3.0 - 0.01 * j, j % 3 == 0) for j in range(200)]

    @app.get("/recommend")
    def recommend(user: Annotated[str, Query(pattern=ID_PATTERN)], k: Annotated[int, Query(ge=1)] = 20,
                  ) -> RecommendationsOut:
        return RecommendationsOut(
            user=user, model_version=VERSION, fallback=False,
            items=[RecommendedItem(id=i, score=s, is_cold=c, model_version=VERSION) for i, s, c in hits[:k]])

    @app.get("/readyz")
    def readyz() -> dict[str, bool]:
        return {"ready": True}

    return app
