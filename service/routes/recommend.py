"""GET /recommend?user=&k=: fold the user in, search, drop what they have; a fallback when there is no history."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from service.deps import MetricsDep, OutOfBoundsError, RecommenderDep, SettingsDep
from service.schemas import ID_PATTERN, ErrorOut, RecommendationsOut

router = APIRouter(tags=["recommend"])


@router.get("/recommend", response_model=RecommendationsOut, responses={503: {"model": ErrorOut}})
def recommend(
    user: Annotated[str, Query(pattern=ID_PATTERN, description="user id")],
    recommender: RecommenderDep, metrics: MetricsDep, settings: SettingsDep,
    k: Annotated[int, Query(ge=1, description="number of items; at most the configured k_max")] = 20,
) -> JSONResponse:
    if k > settings.k_max:
        raise OutOfBoundsError(f"k={k} is larger than this service's k_max={settings.k_max}; ask for fewer items")
    result = recommender.recommend(user, k)
    metrics.recommendations.labels(outcome="fallback" if result.fallback else "personal").inc()
    cold = sum(hit.is_cold for hit in result.hits)
    metrics.recommended_items.labels(kind="cold").inc(cold)
    metrics.recommended_items.labels(kind="warm").inc(len(result.hits) - cold)
    # The RecommendationsOut shape, serialised directly: building and re-validating 20 pydantic
    # models per request is a measurable share of this route's time (benchmarks/serve.py).
    version = result.model_version
    return JSONResponse({
        "user": user, "model_version": version, "fallback": result.fallback,
        "items": [{"id": h.item_id, "score": h.score, "is_cold": h.is_cold, "model_version": version}
                  for h in result.hits],
    })
