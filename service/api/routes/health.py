"""GET /healthz (the process answers) and GET /readyz (model loaded, store reachable, index built)."""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from fastapi.concurrency import run_in_threadpool

from service.api.deps import RuntimeDep
from service.api.schemas import Health, Readiness
from service.store import StoreUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", responses={503: {"model": Readiness}})
async def readyz(runtime: RuntimeDep, response: Response) -> Readiness:
    backend = "redis" if runtime.settings.uses_redis else "sqlite"
    recommender, store = runtime.recommender, runtime.store
    if recommender is None or store is None:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return Readiness(ready=False, store=backend, detail="model and index are loading")
    try:
        await run_in_threadpool(store.ping)
    except StoreUnavailable as exc:
        runtime.metrics.store_errors.labels(source="readiness").inc()
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return Readiness(ready=False, model_version=recommender.version, store=backend,
                         index_items=len(recommender.index), detail=f"store unreachable: {exc}")
    return Readiness(ready=True, model_version=recommender.version, store=backend,
                     index_items=len(recommender.index))
