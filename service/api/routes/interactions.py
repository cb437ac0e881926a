"""POST /interactions: users touched items (trained or registered); histories are what users are folded in from."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Body

from service.api.deps import MetricsDep, RecommenderDep, SettingsDep, WriteAccess, check_batch_size
from service.api.routes.json_body import JsonBodyRoute
from service.api.schemas import UNAVAILABLE_WRITE, ErrorOut, InteractionBatchIn, InteractionsBody, InteractionsOut
from service.store import Interaction

router = APIRouter(tags=["interactions"], route_class=JsonBodyRoute)


@router.post("/interactions", dependencies=[WriteAccess], responses={
    401: {"model": ErrorOut}, 404: {"model": ErrorOut, "description": "an item is unknown; nothing was written"},
    413: {"model": ErrorOut}, 503: {"model": ErrorOut, "description": UNAVAILABLE_WRITE}})
def post_interactions(
    body: Annotated[InteractionsBody, Body()],
    recommender: RecommenderDep, metrics: MetricsDep, settings: SettingsDep,
) -> InteractionsOut:
    """One event, or {"interactions": [...]}; all are recorded or none."""
    events = body.interactions if isinstance(body, InteractionBatchIn) else [body]
    check_batch_size(len(events), settings, "interactions")
    now = time.time()
    batch = [Interaction(e.user, e.item, now if e.timestamp is None else e.timestamp) for e in events]
    recommender.add_interactions(batch)
    metrics.interactions.inc(len(batch))
    return InteractionsOut(accepted=len(batch), users=len({e.user for e in events}))
