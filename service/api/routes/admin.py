"""POST /admin/reload (load another model without downtime) and GET /admin/reload (its progress); API key."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field

from service.api.deps import RuntimeDep, WriteAccess
from service.api.reload import RUNNING, Reloader, ReloadState, ReloadStatus
from service.api.routes.json_body import JsonBodyRoute
from service.api.schemas import ErrorOut
from service.model.artifact import VERSION_PATTERN

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[WriteAccess], route_class=JsonBodyRoute)


class ReloadIn(BaseModel):
    model_config = ConfigDict(extra="forbid",
                              json_schema_extra={"examples": [{"version": "20260101T000000Z-0123abcd"}]})

    version: str | None = Field(
        None, pattern=VERSION_PATTERN,
        description="a version directory under the configured artifact root; default: what the settings name "
        "(the root's `current` pointer)")


class ReloadOut(BaseModel):
    state: ReloadState = Field(description="embedding and catching_up while running; the last outcome otherwise")
    serving_version: str | None = Field(description="the model answering requests now")
    target_version: str | None = None
    items_done: int = Field(0, description="stored items re-embedded by the new model so far")
    items_planned: int = Field(0, description="stored items when the reload started")
    started_at: float | None = None
    finished_at: float | None = None
    detail: str | None = Field(None, description="why a reload was refused or failed")

    @classmethod
    def of(cls, s: ReloadStatus) -> ReloadOut:
        return cls(state=s.state, serving_version=s.serving_version, target_version=s.target_version,
                   items_done=s.items_done, items_planned=s.items_planned, started_at=s.started_at,
                   finished_at=s.finished_at, detail=s.detail)


def get_reloader(request: Request, runtime: RuntimeDep) -> Reloader:
    reloader: Reloader | None = request.app.state.reloader
    if reloader is None or runtime.recommender is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the model and index are still loading")
    return reloader


ReloaderDep = Annotated[Reloader, Depends(get_reloader)]


@router.post("/reload", status_code=status.HTTP_202_ACCEPTED, responses={
    200: {"model": ReloadOut, "description": "that version is already being served; nothing to do"},
    401: {"model": ErrorOut}, 409: {"model": ErrorOut, "description": "a reload is already running"},
    422: {"description": "the artifact is missing, corrupt or incompatible; the old model keeps serving"},
    503: {"model": ErrorOut}})
async def post_reload(reloader: ReloaderDep, response: Response,
                      body: Annotated[ReloadIn | None, Body()] = None) -> ReloadOut:
    """Verify the artifact, then re-embed the stored items and swap the index in the background;
    requests keep being served by the old model until the swap."""
    started = await reloader.start(None if body is None else body.version)
    if started.state not in RUNNING:
        response.status_code = status.HTTP_200_OK
    return ReloadOut.of(started)


@router.get("/reload", responses={401: {"model": ErrorOut}, 503: {"model": ErrorOut}})
def get_reload(reloader: ReloaderDep) -> ReloadOut:
    return ReloadOut.of(reloader.status())
