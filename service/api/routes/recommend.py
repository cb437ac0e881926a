"""GET /recommend?user=&k=: fold the user in, search, drop what they have; a fallback when there is no history."""

from __future__ import annotations

import math
from json.encoder import encode_basestring as _string  # a JSON string literal, non-ASCII kept as is
from typing import Annotated

import pydantic_core
from fastapi import APIRouter, Query, Request, Response

from service.api.deps import OutOfBoundsError, runtime_of, serving
from service.api.schemas import ID_PATTERN, ErrorOut, RecommendationsOut
from service.core.types import Explanation, Recommendations

router = APIRouter(tags=["recommend"])


# async and without dependencies (the Request is FastAPI's own parameter): each dependency, and a
# sync route's thread-pool round trip, cost about as much server time as the fold-in itself
# (benchmarks/results/serve.md).
@router.get("/recommend", response_model=RecommendationsOut, responses={503: {"model": ErrorOut}})
async def recommend(
    user: Annotated[str, Query(pattern=ID_PATTERN, description="user id")],
    request: Request,
    k: Annotated[int, Query(ge=1, description="number of items; at most the configured k_max")] = 20,
    explain: Annotated[bool, Query(description="add to every item why it is there (new items: the weights of "
                                   "their views for this user and their most influential attributes; "
                                   "personal lists: the history items that pulled each item up)")] = False,
) -> Response:
    runtime = runtime_of(request)
    if k > runtime.settings.k_max:
        raise OutOfBoundsError(
            f"k={k} is larger than this service's k_max={runtime.settings.k_max}; ask for fewer items")
    # answered together with the other requests of this event-loop pass (service/api/recommend_batcher.py)
    # (and counted there, per batch)
    result = await runtime.batcher.recommend(serving(runtime), user, k, explain)
    return Response(_body(user, result), media_type="application/json")


def _explained_body(user: str, result: Recommendations, explanations: list[Explanation]) -> bytes:
    """explain=true: the ExplainedItem shape, encoded by pydantic_core in one call (the standard library's
    encoder took as long as computing the explanations)."""
    version = result.model_version
    items = []
    for hit, e in zip(result.hits, explanations, strict=True):
        views = None if e.views is None else {"attributes": e.views.attributes, "content": e.views.content,
                                              "common": e.views.common}
        items.append({"id": hit.item_id, "score": float(hit.score), "is_cold": hit.is_cold, "model_version": version,
                      "explanation": {"views": views,
                                      "attributes": [{"token": t, "weight": w} for t, w in e.attributes],
                                      "because": [{"item": i, "contribution": c} for i, c in e.because]}})
    body = {"user": user, "model_version": version, "fallback": result.fallback, "items": items}
    return pydantic_core.to_json(body, inf_nan_mode="null")  # never a body clients cannot parse


def _body(user: str, result: Recommendations) -> bytes:
    """The RecommendationsOut shape, serialised directly: building and re-validating k pydantic
    models per request cost more than the JSON itself, and joining pre-encoded parts is faster
    than json.dumps of the equivalent dict (the OpenAPI document still names the model)."""
    if result.explanations is not None:
        return _explained_body(user, result, result.explanations)
    version = _string(result.model_version)
    tail = ',"model_version":' + version + "}"
    items = []
    for hit in result.hits:
        score = float(hit.score)  # repr of a NumPy scalar is not a JSON number
        if not math.isfinite(score):  # JSON has no NaN: a bug upstream, never a body clients cannot parse
            raise ValueError(f"non-finite score {score} for item {hit.item_id}")
        items.append('{"id":' + _string(hit.item_id) + ',"score":' + repr(score)
                     + (',"is_cold":true' if hit.is_cold else ',"is_cold":false') + tail)
    return ('{"user":' + _string(user) + ',"model_version":' + version + ',"fallback":'
            + ("true" if result.fallback else "false") + ',"items":[' + ",".join(items) + "]}").encode()
