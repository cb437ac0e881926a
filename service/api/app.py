"""create_app(settings): the lifespan opens the artifact, store and index; errors map to HTTP here.

    uvicorn --factory service.api.app:create_app        (settings from M2REC_* variables)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import faiss
import torch
from fastapi import FastAPI, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from threadpoolctl import threadpool_limits

from service.api.deps import OutOfBoundsError, RequestTooLargeError
from service.api.middleware import Measure
from service.api.recommend_batcher import RecommendBatcher
from service.api.reload import Reloader, ReloadInProgressError
from service.api.routes import admin, health, interactions, items, recommend
from service.api.runtime import Runtime, SwapGate
from service.config import Settings
from service.core.recommender import Recommender
from service.core.types import InvalidItemError, TrainedItemConflictError, UnknownItemsError
from service.index import IndexConfig
from service.metrics import CONTENT_TYPE_LATEST, Metrics
from service.model.artifact import Artifact, ArtifactError, load_artifact
from service.store import SqliteStore, Store, StoreUnavailable

log = logging.getLogger("m2rec.service")

# domain error -> (status, ingest-error reason or None); the one place errors become HTTP
_ERRORS: dict[type[Exception], tuple[int, str | None]] = {
    InvalidItemError: (status.HTTP_422_UNPROCESSABLE_CONTENT, "invalid_item"),
    TrainedItemConflictError: (status.HTTP_409_CONFLICT, "trained_item"),
    UnknownItemsError: (status.HTTP_404_NOT_FOUND, None),
    RequestTooLargeError: (status.HTTP_413_CONTENT_TOO_LARGE, "too_large"),
    OutOfBoundsError: (status.HTTP_422_UNPROCESSABLE_CONTENT, None),
    StoreUnavailable: (status.HTTP_503_SERVICE_UNAVAILABLE, None),
    ArtifactError: (status.HTTP_422_UNPROCESSABLE_CONTENT, None),
    ReloadInProgressError: (status.HTTP_409_CONFLICT, None),
}


def open_store(settings: Settings) -> Store:
    limits = {"max_history": settings.max_history_length, "max_seen": settings.max_seen_items}
    if settings.uses_redis_cluster:
        from service.store.redis_cluster import RedisClusterStore  # only Redis deployments load the client

        return RedisClusterStore.from_url(settings.store_url, namespace=settings.redis_namespace,
                                          history_ttl=settings.history_ttl_seconds, **limits)
    if settings.uses_redis:
        from service.store.redis import RedisStore

        return RedisStore.from_url(settings.store_url, namespace=settings.redis_namespace,
                                   history_ttl=settings.history_ttl_seconds, **limits)
    return SqliteStore(settings.store_url, **limits)


def index_config(settings: Settings) -> IndexConfig:
    return IndexConfig(kind=settings.index_kind, nlist=settings.index_nlist, nprobe=settings.index_nprobe,
                       ivf_min_rows=settings.index_ivf_min_rows,
                       rerank=settings.index_rerank, row_codes=settings.index_row_codes)


def new_recommender(artifact: Artifact, store: Store, settings: Settings) -> Recommender:
    """Model loaded, index still empty: start_index or a reload fills it."""
    return Recommender(artifact, store, index_config(settings), max_history=settings.max_history_length)


def start_index(recommender: Recommender, settings: Settings, metrics: Metrics) -> str | None:
    """Snapshot plus the events after it when there is one for this model version, else a full build."""
    if settings.index_snapshot_dir is not None:
        try:
            loaded, cursor = recommender.maintainer.load_snapshot(settings.index_snapshot_dir)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:  # unreadable: rebuild from the store
            log.warning("ignoring index snapshot in %s: %s", settings.index_snapshot_dir, exc)
            loaded, cursor = False, None
        if loaded:
            return recommender.maintainer.follow(cursor).cursor
    metrics.index_rebuilds.labels(reason="startup").inc()
    return recommender.maintainer.build_index()


async def follow_events(runtime: Runtime) -> None:
    """Keep the served index in line with writes made through any replica (after a reload, the new one's)."""
    metrics = runtime.metrics
    while True:
        await asyncio.sleep(runtime.settings.event_poll_seconds)
        async with runtime.gate.shared():  # a reload swaps recommender and cursor together, never mid-follow
            recommender = runtime.recommender
            if recommender is None:
                continue
            try:
                followed = await run_in_threadpool(recommender.maintainer.follow, runtime.cursor)
            except StoreUnavailable as exc:
                metrics.follower_errors.labels(reason="store_unavailable").inc()
                metrics.store_errors.labels(source="follower").inc()
                log.warning("event follower: store unavailable (%s); retrying", exc)
                continue
            except Exception:
                metrics.follower_errors.labels(reason="error").inc()
                log.exception("event follower failed; retrying")
                continue
            runtime.cursor = followed.cursor
        if followed.rebuilt:
            metrics.index_rebuilds.labels(reason="events_trimmed").inc()
        for lag in followed.lags:
            metrics.ingest_lag.labels(source="stream").observe(max(lag, 0.0))
        metrics.events_applied.labels(kind="item").inc(len(followed.lags))
        metrics.set_index_size(*recommender.index.count())


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime: Runtime = app.state.runtime
    settings = runtime.settings
    torch.set_num_threads(settings.torch_threads)
    faiss.omp_set_num_threads(settings.faiss_threads)
    # NumPy's BLAS (fold-in) would start its own threads per tiny product and stall on a busy core
    blas_limit = threadpool_limits(settings.torch_threads, user_api="blas")
    artifact = await run_in_threadpool(load_artifact, settings.artifact_path)
    store = await run_in_threadpool(open_store, settings)
    runtime.store = store
    runtime.gate = SwapGate()  # asyncio state belongs to the loop running this lifespan
    runtime.batcher = RecommendBatcher(runtime.metrics.recommend_batch, runtime.served.count,
                                       settings.recommend_batch_max)
    reloader = app.state.reloader = Reloader(runtime, lambda a: new_recommender(a, store, settings))
    tasks: list[asyncio.Task[None]] = []
    try:
        recommender = await run_in_threadpool(new_recommender, artifact, store, settings)
        runtime.cursor = await run_in_threadpool(start_index, recommender, settings, runtime.metrics)
        runtime.metrics.set_model_version(recommender.version)
        runtime.metrics.set_index_size(*recommender.index.count())
        runtime.recommender = recommender
        # The start-up objects (model, vocabularies, id maps) live as long as the process: move them
        # out of the collector's reach so full collections do not rescan them inside requests.
        gc.collect()
        gc.freeze()
        tasks.append(asyncio.create_task(follow_events(runtime), name="m2rec-event-follower"))
        if settings.artifact_poll_seconds is not None:
            tasks.append(asyncio.create_task(reloader.follow_pointer(settings.artifact_poll_seconds),
                                             name="m2rec-artifact-poller"))
        log.info("serving model %s with %s items indexed", recommender.version, len(recommender.index))
        yield
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await reloader.close()
        app.state.reloader = None
        blas_limit.restore_original_limits()
        gc.unfreeze()  # what this app froze may be garbage now (tests build many apps in one process)
        if runtime.recommender is not None and settings.index_snapshot_dir is not None:
            try:
                await run_in_threadpool(runtime.recommender.maintainer.save_snapshot, settings.index_snapshot_dir,
                                        runtime.cursor)
            except Exception:  # the snapshot is an optimisation; the store still has everything
                log.exception("could not save the index snapshot")
        runtime.recommender = None
        runtime.store = None
        store.close()


def _error_handler(metrics: Metrics) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handle(request: Request, exc: Exception) -> Response:
        code, reason = next(v for t, v in _ERRORS.items() if isinstance(exc, t))
        detail = str(exc)
        if isinstance(exc, StoreUnavailable):
            metrics.store_errors.labels(source="request").inc()
            if request.method == "POST" and request.url.path.startswith("/items"):
                reason = "store_unavailable"
            if request.method not in ("GET", "HEAD"):  # the client's next move, in the answer itself
                detail = f"{detail}; the write may or may not have been applied; retrying is safe"
        if reason is not None:
            metrics.ingest_errors.labels(reason=reason).inc()
        return JSONResponse({"detail": detail}, status_code=code)

    return handle


def _invalid_request(metrics: Metrics) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handle(request: Request, exc: Exception) -> Response:
        """FastAPI's 422, without echoing inputs: they can be large, or NaN that JSON cannot carry."""
        assert isinstance(exc, RequestValidationError)
        if request.method == "POST" and request.url.path.startswith("/items"):
            metrics.ingest_errors.labels(reason="invalid_request").inc()
        errors = [_error(e) for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    return handle


def _error(e: Any) -> dict[str, Any]:
    if e.get("type") == "json_invalid":  # FastAPI's own words are "JSON decode error": say where and what
        return {"loc": ["body"], "type": "json_invalid",
                "msg": f"the body is not valid JSON: {e.get('ctx', {}).get('error', '')}"}
    return {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    """Starlette's 405 names only the methods of the first route whose path matched; `Allow` must
    list every method the path takes (GET and DELETE /items/{id} are two routes)."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code != status.HTTP_405_METHOD_NOT_ALLOWED:
        return await http_exception_handler(request, exc)
    allowed: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] is not Match.NONE:
            allowed |= route.methods
    if "GET" in allowed:
        allowed.add("HEAD")
    return JSONResponse({"detail": f"{request.method} is not allowed here; allowed: {', '.join(sorted(allowed))}"},
                        status_code=exc.status_code, headers={"Allow": ", ".join(sorted(allowed))})


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings if settings is not None else Settings()
    metrics = Metrics()
    app = FastAPI(
        title="m2rec", summary="Cold-start item recommendations: register an item, recommend it at once.",
        version="0.1.0", lifespan=lifespan,
    )
    app.state.runtime = Runtime(settings=settings, metrics=metrics)
    app.state.reloader = None  # the lifespan's, while it runs
    # Routes are matched in order: the hot read first. Their APIRoutes go straight into the app's
    # route list: `include_router` (FastAPI >= 0.160) wraps each router in a lazily resolved layer
    # that every request would pass through; the OpenAPI document is byte-identical either way.
    for router in (recommend.router, items.router, interactions.router, health.router, admin.router):
        app.router.routes.extend(router.routes)
    handler = _error_handler(metrics)
    app.add_exception_handler(RequestValidationError, _invalid_request(metrics))
    app.add_exception_handler(StarletteHTTPException, _method_not_allowed)
    for exc_type in _ERRORS:
        app.add_exception_handler(exc_type, handler)

    app.add_middleware(Measure, metrics=metrics, body_limit=settings.max_body_bytes)

    app.openapi = _openapi(app, settings)  # type: ignore[method-assign]  # FastAPI's documented hook

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        store = app.state.runtime.store
        if store is not None:  # bytes per item/user: sampled here, at most every store_sample_seconds
            metrics.sample_store(store)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _openapi(app: FastAPI, settings: Settings) -> Callable[[], dict[str, Any]]:
    """FastAPI documents every 422 as field errors (a list); domain checks (content dimension, k_max, a
    bad artifact) answer 422 with one message (a string). The document says both, as the service does.
    `k`'s maximum is this service's setting (M2REC_K_MAX), so it is written in here, not in the route."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        for operation in (op for ops in schema.get("paths", {}).values() for op in ops.values()):
            content = operation.get("responses", {}).get("422", {}).get("content", {}).get("application/json")
            if content is not None and "$ref" in content.get("schema", {}):
                content["schema"] = {"anyOf": [content["schema"], {"$ref": "#/components/schemas/ErrorOut"}]}
            for parameter in operation.get("parameters", []):
                if operation.get("operationId", "").startswith("recommend") and parameter["name"] == "k":
                    parameter["schema"]["maximum"] = settings.k_max
        return schema

    return openapi
