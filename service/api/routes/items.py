"""POST /items, POST /items/batch, GET /items/{id}, DELETE /items/{id}."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from service.api.deps import MetricsDep, RecommenderDep, SettingsDep, WriteAccess, check_batch_size
from service.api.routes.json_body import JsonBodyRoute
from service.api.schemas import ID_PATTERN, UNAVAILABLE_WRITE, ErrorOut, ItemBatchIn, ItemBatchOut, ItemIn, ItemOut
from service.core.recommender import Recommender
from service.core.types import NewItem, Registration, UnknownItemsError
from service.metrics import Metrics

router = APIRouter(tags=["items"], route_class=JsonBodyRoute)
ItemId = Annotated[str, Path(pattern=ID_PATTERN, description="1-128 characters of A-Z a-z 0-9 _ . : -")]

_WRITE_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorOut, "description": "X-API-Key missing or wrong"},
    409: {"model": ErrorOut, "description": "the id belongs to a trained item"},
    413: {"model": ErrorOut, "description": "batch or body too large"},
    422: {"description": "invalid item: wrong content dimension, NaN, empty, malformed id"},
    503: {"model": ErrorOut, "description": UNAVAILABLE_WRITE},
}


def _register(recommender: Recommender, metrics: Metrics, items: list[ItemIn]) -> list[ItemOut]:
    registrations = recommender.register([NewItem(i.id, i.attributes, i.content) for i in items])
    now = time.time()
    inserted = sum(reg.inserted for reg in registrations)
    metrics.items_ingested.labels(outcome="inserted").inc(inserted)
    metrics.items_ingested.labels(outcome="updated").inc(len(registrations) - inserted)
    lag = metrics.ingest_lag.labels(source="local")
    for reg in registrations:
        lag.observe(max(now - reg.record.created_at, 0.0))
    metrics.set_index_size(*recommender.index.count())
    return [_out(reg) for reg in registrations]


def _out(reg: Registration) -> ItemOut:
    r = reg.record
    return ItemOut(id=r.item_id, is_cold=True, model_version=r.model_version, attributes=r.attributes,
                   unknown_attributes=reg.unknown_attributes, has_content=r.content is not None,
                   created=reg.inserted, created_at=r.created_at, held_out=reg.held_out)


@router.post("/items", status_code=status.HTTP_201_CREATED, dependencies=[WriteAccess],
             responses={200: {"model": ItemOut, "description": "an existing id was updated"}, **_WRITE_ERRORS})
def post_item(item: ItemIn, response: Response, recommender: RecommenderDep, metrics: MetricsDep) -> ItemOut:
    """Register (or update) one item; it is stored and recommendable when this returns."""
    out = _register(recommender, metrics, [item])[0]
    response.status_code = status.HTTP_201_CREATED if out.created else status.HTTP_200_OK
    return out


@router.post("/items/batch", dependencies=[WriteAccess], responses=_WRITE_ERRORS)
def post_items(batch: ItemBatchIn, recommender: RecommenderDep, metrics: MetricsDep,
               settings: SettingsDep) -> ItemBatchOut:
    """Register many items at once: all are written, or (on any invalid item) none."""
    check_batch_size(len(batch.items), settings, "items")
    return ItemBatchOut(items=_register(recommender, metrics, batch.items))


@router.get("/items/{item_id}", responses={404: {"model": ErrorOut}})
def get_item(item_id: ItemId, recommender: RecommenderDep) -> ItemOut:
    view = recommender.get(item_id)
    if view is None:
        raise UnknownItemsError([item_id])
    r = view.record
    return ItemOut(id=view.item_id, is_cold=view.is_cold, model_version=view.model_version,
                   attributes=None if r is None else r.attributes, unknown_attributes=view.unknown_attributes,
                   has_content=None if r is None else r.content is not None,
                   created_at=None if r is None else r.created_at, held_out=view.held_out)


@router.delete("/items/{item_id}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[WriteAccess],
               responses={404: {"model": ErrorOut}, 409: {"model": ErrorOut}, 401: {"model": ErrorOut},
                          503: {"model": ErrorOut, "description": UNAVAILABLE_WRITE}})
def delete_item(item_id: ItemId, recommender: RecommenderDep, metrics: MetricsDep) -> Response:
    """Remove a registered item from the store and the index; it is never recommended again."""
    recommender.delete(item_id)
    metrics.items_deleted.inc()
    metrics.set_index_size(*recommender.index.count())
    return Response(status_code=status.HTTP_204_NO_CONTENT)
