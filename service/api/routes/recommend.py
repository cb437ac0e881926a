"""GET /recommend: the user's list, new and trained items mixed by the model's policy or `cold_share`."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Response

from service.api.deps import OutOfBoundsError, RuntimeDep, serving
from service.api.schemas import ID_PATTERN, ErrorOut, RecommendationsOut
from service.core.types import Recommendations
from service.model.mixing import Quota

router = APIRouter(tags=["recommend"])


@router.get("/recommend", response_model=RecommendationsOut, responses={503: {"model": ErrorOut}})
async def recommend(
    user: Annotated[str, Query(pattern=ID_PATTERN, description="user id")],
    runtime: RuntimeDep,
    k: Annotated[int, Query(ge=1, description="number of items; at most the configured k_max")] = 20,
    cold_share: Annotated[float | None, Query(
        ge=0.0, le=1.0, description="share of new items in the list, 0..1 (every 1/share-th slot holds the next "
        "best new item; a population that runs out hands its slots to the other). Absent: the model's "
        "validation-chosen policy, stated in the response")] = None,
    explain: Annotated[bool, Query(description="add to every item why it is there (new items: the weights of "
                                   "their views for this user and their most influential attributes; "
                                   "personal lists: the history items that pulled each item up)")] = False,
) -> Response:
    if k > runtime.settings.k_max:
        raise OutOfBoundsError(
            f"k={k} is larger than this service's k_max={runtime.settings.k_max}; ask for fewer items")
    # answered in a worker thread together with the other requests of this event-loop pass, and
    # counted there, per batch (service/api/recommend_batcher.py)
    policy = None if cold_share is None else Quota(cold_share)
    result = await runtime.batcher.recommend(serving(runtime), user, k, explain, policy)
    # RecommendationsOut is the contract (OpenAPI, and tests/test_api.py checks answers against it); the
    # body is written by orjson, not validated again by pydantic on its way out: that costs more than
    # the answer's own compute with explain=true (benchmarks/results/explain.md)
    return Response(orjson.dumps(_body(user, result), option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")


def _body(user: str, result: Recommendations) -> dict[str, Any]:
    """The answer as RecommendationsOut describes it."""
    version = result.model_version
    items: list[dict[str, Any]] = [{"id": h.item_id, "score": h.score, "is_cold": h.is_cold, "model_version": version}
                                   for h in result.hits]
    for item, e in zip(items, result.explanations or [], strict=False):
        views = None if e.views is None else {"attributes": e.views.attributes, "content": e.views.content,
                                              "common": e.views.common}
        item["explanation"] = {"views": views, "attributes": [{"token": t, "weight": w} for t, w in e.attributes],
                               "because": [{"item": i, "contribution": c} for i, c in e.because]}
    assert result.policy is not None  # the recommender states the policy of every list
    return {"user": user, "model_version": version, "fallback": result.fallback, "policy": result.policy.to_dict(),
            "cold_share": result.cold_share, "items": items}
