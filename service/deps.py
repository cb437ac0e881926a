"""Typed dependencies: what routes receive from the lifespan's resources, and the write guard."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, status

from service.config import Settings
from service.metrics import Metrics
from service.recommender import Recommender
from service.store import Store


class RequestTooLargeError(ValueError):
    """More items or interactions in one request than settings.max_batch_size (413)."""


class OutOfBoundsError(ValueError):
    """A query parameter beyond a configured limit (422)."""


@dataclass
class Runtime:
    """Everything the lifespan opens for one app; routes reach it only through the aliases below."""

    settings: Settings
    metrics: Metrics
    store: Store | None = None
    recommender: Recommender | None = None
    cursor: str | None = None  # the event follower's position in the store's stream
    problems: list[str] = field(default_factory=list)


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_settings(runtime: RuntimeDep) -> Settings:
    return runtime.settings


def get_metrics(runtime: RuntimeDep) -> Metrics:
    return runtime.metrics


def get_recommender(runtime: RuntimeDep) -> Recommender:
    if runtime.recommender is None:  # only between process start and the end of the lifespan's start
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the model and index are still loading")
    return runtime.recommender


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RecommenderDep = Annotated[Recommender, Depends(get_recommender)]


def require_api_key(
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
