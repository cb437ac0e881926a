"""What the lifespan opens for one app (`Runtime`), the gate a reload swaps the recommender under,
and the served-recommendation counters.

The reloader is not held here: it holds the runtime (service/api/reload.py), and the lifespan keeps
it in `app.state.reloader` for the admin routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from prometheus_client import Counter

from service.api.recommend_batcher import RecommendBatcher
from service.config import Settings
from service.core.recommender import Recommender
from service.core.types import Recommendations
from service.metrics import Metrics
from service.store import Store


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
    held_out_items: Counter
    skipped_non_finite: Counter

    def count(self, answers: Sequence[Recommendations]) -> None:
        """Counted once per batch of answers: four increments per request cost more than a fold-in."""
        fallback = sum(a.fallback for a in answers)
        cold = sum(hit.is_cold for a in answers for hit in a.hits)
        held_out = sum(a.held_out for a in answers)  # served like new items, but not new: apart
        self.fallback.inc(fallback)
        self.personal.inc(len(answers) - fallback)
        self.cold_items.inc(cold - held_out)
        self.warm_items.inc(sum(len(a.hits) for a in answers) - cold)
        if held_out:
            self.held_out_items.inc(held_out)
        skipped = sum(a.skipped for a in answers)
        if skipped:
            self.skipped_non_finite.inc(skipped)

    @classmethod
    def of(cls, metrics: Metrics) -> ServedCounters:
        return cls(metrics.recommendations.labels(outcome="personal"),
                   metrics.recommendations.labels(outcome="fallback"),
                   metrics.recommended_items.labels(kind="cold"), metrics.recommended_items.labels(kind="warm"),
                   metrics.recommended_items.labels(kind="held_out"),
                   metrics.recommend_skipped.labels(reason="non_finite_score"))


@dataclass
class Runtime:
    """Everything the lifespan opens for one app; routes reach it only through deps.py."""

    settings: Settings
    metrics: Metrics
    store: Store | None = None
    recommender: Recommender | None = None
    cursor: str | None = None  # the event follower's position in the store's stream
    problems: list[str] = field(default_factory=list)
    gate: SwapGate = field(default_factory=SwapGate)  # replaced per lifespan: asyncio state is per loop
    served: ServedCounters = field(init=False)
    batcher: RecommendBatcher = field(init=False)  # replaced per lifespan, like the gate

    def __post_init__(self) -> None:
        self.served = ServedCounters.of(self.metrics)
        self.batcher = RecommendBatcher(self.metrics.recommend_batch, self.served.count)
