"""Typed dependencies: what routes receive from the lifespan's resources, and the write guard."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, status

from service.api.runtime import Runtime
from service.config import Settings
from service.core.recommender import Recommender
from service.metrics import Metrics


class RequestTooLargeError(ValueError):
    """More items or interactions in one request than settings.max_batch_size (413)."""


class OutOfBoundsError(ValueError):
    """A query parameter beyond a configured limit (422)."""


# The dependencies below do no I/O: as `async def` they run on the event loop instead of costing a
# thread-pool round trip each (benchmarks/results/serve.md).
async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_settings(runtime: RuntimeDep) -> Settings:
    return runtime.settings


async def get_metrics(runtime: RuntimeDep) -> Metrics:
    return runtime.metrics


_READS = frozenset({"GET", "HEAD", "OPTIONS"})


def serving(runtime: Runtime) -> Recommender:
    if runtime.recommender is None:  # only between process start and the end of the lifespan's start
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the model and index are still loading")
    return runtime.recommender


async def get_recommender(request: Request, runtime: RuntimeDep) -> AsyncIterator[Recommender]:
    """The recommender being served; writes hold the swap gate until they return (reads are right
    with either the old or the new recommender, so they never wait for a swap)."""
    if request.method in _READS:
        yield serving(runtime)
        return
    async with runtime.gate.shared():
        yield serving(runtime)


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RecommenderDep = Annotated[Recommender, Depends(get_recommender)]


async def require_api_key(
    settings: SettingsDep, x_api_key: Annotated[str | None, Header(description="required for writes")] = None
) -> None:
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    if x_api_key is None or not secrets.compare_digest(x_api_key.encode(), expected):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "writes need a valid X-API-Key header",
            headers={"WWW-Authenticate": "ApiKey"},
        )


WriteAccess = Depends(require_api_key)


def check_batch_size(n: int, settings: Settings, what: str) -> None:
    if n > settings.max_batch_size:
        raise RequestTooLargeError(f"{n} {what} in one request; send at most {settings.max_batch_size} per request")
