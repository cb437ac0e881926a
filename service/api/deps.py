"""Typed dependencies: what routes receive from the lifespan's resources, and the write guard."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Header, HTTPException, Request, status
from prometheus_client import Counter

from service.api.recommend_batcher import RecommendBatcher
from service.config import Settings
from service.core.recommender import Recommender
from service.core.types import Recommendations
from service.metrics import Metrics
from service.store import Store

if TYPE_CHECKING:
    from service.api.reload import Reloader


class RequestTooLargeError(ValueError):
    """More items or interactions in one request than settings.max_batch_size (413)."""


class OutOfBoundsError(ValueError):
    """A query parameter beyond a configured limit (422)."""


class SwapGate:
    """Writes share it; swapping the recommender takes it alone, so no write can reach the old
    recommender after the new one's final catch-up (it would be missing from the new index).
    Waiting happens on the event loop, never on a pool thread the in-flight writes need to finish."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._active = 0
        self._swapping = False

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._swapping)
            self._active += 1
        try:
            yield
        finally:
            async with self._changed:
                self._active -= 1
                self._changed.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._swapping)
            self._swapping = True  # new writes queue from here: the in-flight ones drain
            try:
                await self._changed.wait_for(lambda: self._active == 0)
            except BaseException:
                self._swapping = False
                self._changed.notify_all()
                raise
        try:
            yield
        finally:
            async with self._changed:
                self._swapping = False
                self._changed.notify_all()


@dataclass(frozen=True)
class ServedCounters:
    """The /recommend counters' series, looked up once: `labels()` per request cost more than the counting."""

    personal: Counter
    fallback: Counter
    cold_items: Counter
    warm_items: Counter

    def count(self, answers: Sequence[Recommendations]) -> None:
        """Counted once per batch of answers: four increments per request cost more than a fold-in."""
        fallback = sum(a.fallback for a in answers)
        cold = sum(hit.is_cold for a in answers for hit in a.hits)
        self.fallback.inc(fallback)
        self.personal.inc(len(answers) - fallback)
        self.cold_items.inc(cold)
        self.warm_items.inc(sum(len(a.hits) for a in answers) - cold)

    @classmethod
    def of(cls, metrics: Metrics) -> ServedCounters:
        return cls(metrics.recommendations.labels(outcome="personal"),
                   metrics.recommendations.labels(outcome="fallback"),
                   metrics.recommended_items.labels(kind="cold"), metrics.recommended_items.labels(kind="warm"))


@dataclass
class Runtime:
    """Everything the lifespan opens for one app; routes reach it only through the aliases below."""

    settings: Settings
    metrics: Metrics
    store: Store | None = None
    recommender: Recommender | None = None
    cursor: str | None = None  # the event follower's position in the store's stream
    problems: list[str] = field(default_factory=list)
    gate: SwapGate = field(default_factory=SwapGate)  # replaced per lifespan: asyncio state is per loop
    reloader: Reloader | None = None
    served: ServedCounters = field(init=False)
    batcher: RecommendBatcher = field(init=False)  # replaced per lifespan, like the gate

    def __post_init__(self) -> None:
        self.served = ServedCounters.of(self.metrics)
        self.batcher = RecommendBatcher(self.metrics.recommend_batch, self.served.count)


# The dependencies below do no I/O: as `async def` they run on the event loop instead of costing a
# thread-pool round trip each (measured: 267 -> 398 req/s on /recommend, benchmarks/results/serve.md).
def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_runtime(request: Request) -> Runtime:
    return runtime_of(request)


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
