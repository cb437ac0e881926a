"""GET /recommend?user=&k=: fold the user in, search, drop what they have; a fallback when there is no history."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from service.api.deps import OutOfBoundsError, RuntimeDep, serving
from service.api.schemas import ID_PATTERN, ErrorOut, RecommendationsOut

router = APIRouter(tags=["recommend"])


# One dependency, the runtime (settings, batcher and the serving recommender in one): on the hot
# route each further dependency costs about as much as the index search (benchmarks/results/serve.md).
@router.get("/recommend", response_model=RecommendationsOut, responses={503: {"model": ErrorOut}})
async def recommend(
    user: Annotated[str, Query(pattern=ID_PATTERN, description="user id")],
    runtime: RuntimeDep,
    k: Annotated[int, Query(ge=1, description="number of items; at most the configured k_max")] = 20,
) -> dict[str, Any]:
    if k > runtime.settings.k_max:
        raise OutOfBoundsError(
            f"k={k} is larger than this service's k_max={runtime.settings.k_max}; ask for fewer items")
    # answered in a worker thread together with the other requests of this event-loop pass, and
    # counted there, per batch (service/api/recommend_batcher.py)
    result = await runtime.batcher.recommend(serving(runtime), user, k)
    version = result.model_version
    # a plain dict: FastAPI validates it against RecommendationsOut and writes the JSON in pydantic-core
    return {"user": user, "model_version": version, "fallback": result.fallback,
            "items": [{"id": h.item_id, "score": h.score, "is_cold": h.is_cold, "model_version": version}
                      for h in result.hits]}
