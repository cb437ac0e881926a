"""GET /recommend?user=&k=: fold the user in, search, drop what they have; a fallback when there is no history."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service.deps import MetricsDep, OutOfBoundsError, RecommenderDep, SettingsDep
from service.schemas import ID_PATTERN, ErrorOut, RecommendationsOut, RecommendedItem

router = APIRouter(tags=["recommend"])


@router.get("/recommend", responses={503: {"model": ErrorOut}})
def recommend(
    user: Annotated[str, Query(pattern=ID_PATTERN, description="user id")],
    recommender: RecommenderDep, metrics: MetricsDep, settings: SettingsDep,
    k: Annotated[int, Query(ge=1, description="number of items; at most the configured k_max")] = 20,
) -> RecommendationsOut:
    if k > settings.k_max:
        raise OutOfBoundsError(f"k={k} is larger than this service's k_max={settings.k_max}; ask for fewer items")
    result = recommender.recommend(user, k)
    metrics.recommendations.labels(outcome="fallback" if result.fallback else "personal").inc()
    cold = sum(hit.is_cold for hit in result.hits)
    metrics.recommended_items.labels(kind="cold").inc(cold)
    metrics.recommended_items.labels(kind="warm").inc(len(result.hits) - cold)
    return RecommendationsOut(
        user=user, model_version=result.model_version, fallback=result.fallback,
        items=[RecommendedItem(id=h.item_id, score=h.score, is_cold=h.is_cold, model_version=result.model_version)
               for h in result.hits],
    )
