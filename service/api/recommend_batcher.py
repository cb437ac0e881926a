"""Micro-batching of /recommend: the requests that reach the route in one event-loop pass are
answered by one `Recommender.recommend_many` call, in a worker thread, whatever the store.

A batch pays once what is fixed cost per call (a store read, one FAISS search per index segment,
NumPy dispatches), and the event loop never runs the fold-in, the search or a store read: it keeps
accepting requests meanwhile (benchmarks/results/serve.md measures batches of 1 against 16).
Nothing waits for a batch to fill: the flush is scheduled with `call_soon` when the first request
arrives and runs after one more pass of the loop (which polls the sockets once more, without a
timer), so a lone request waits for two passes of an otherwise idle loop: microseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import NamedTuple

from fastapi.concurrency import run_in_threadpool
from prometheus_client import Histogram

from service.core.recommender import Recommender
from service.core.types import Recommendations
from service.model.mixing import Policy

# Passes of the event loop a batch waits for more requests before it is answered. One more pass
# polls the sockets once more (no timer), so requests that arrive together share a batch; more
# passes only delay the first request.
_EXTRA_PASSES = 1


class _Pending(NamedTuple):  # a NamedTuple: one per request, cheaper to build than a frozen dataclass
    recommender: Recommender  # the one serving when the request arrived (a reload may swap it)
    user_id: str
    k: int
    explain: bool
    policy: Policy | None  # None: the artifact's
    answer: asyncio.Future[Recommendations]


class RecommendBatcher:
    """One per event loop (the app's lifespan makes it). `max_batch` bounds one call's work. A user's
    answer does not depend on which other requests share the batch: the fold-in runs one product per
    user, and FAISS scores batches of fewer than 20 queries one query at a time (its BLAS path starts
    at `faiss.cvar.distance_compute_blas_threshold`, 20), so `max_batch` stays below that."""

    def __init__(self, batch_sizes: Histogram, count: Callable[[list[Recommendations]], None],
                 max_batch: int = 16) -> None:
        if not 1 <= max_batch < 20:
            raise ValueError("max_batch must be 1..19: FAISS scores larger batches with BLAS, whose sums vary")
        self._batch_sizes = batch_sizes
        self._count = count  # the served-recommendation counters, once per batch
        self._max_batch = max_batch
        self._pending: list[_Pending] = []
        self._flush_scheduled = False
        self._in_threads: set[asyncio.Task[None]] = set()

    async def recommend(self, recommender: Recommender, user_id: str, k: int, explain: bool = False,
                        policy: Policy | None = None) -> Recommendations:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Recommendations] = loop.create_future()
        self._pending.append(_Pending(recommender, user_id, k, explain, policy, answer))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush, _EXTRA_PASSES)
        return await answer

    def _flush(self, passes_left: int) -> None:
        if passes_left > 0 and len(self._pending) < self._max_batch:
            asyncio.get_running_loop().call_soon(self._flush, passes_left - 1)
            return
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), self._max_batch):
            batch = pending[start : start + self._max_batch]
            by_model: dict[int, list[_Pending]] = {}
            for p in batch:
                by_model.setdefault(id(p.recommender), []).append(p)
            for group in by_model.values():
                self._batch_sizes.observe(len(group))
                task = asyncio.ensure_future(self._settle_from_thread(group))
                self._in_threads.add(task)  # held until done: the loop keeps only weak references
                task.add_done_callback(self._in_threads.discard)

    async def _settle_from_thread(self, group: list[_Pending]) -> None:
        self._settle(group, await run_in_threadpool(_outcome, group))

    def _settle(self, group: list[_Pending], outcome: list[Recommendations] | Exception) -> None:
        if not isinstance(outcome, Exception):
            self._count(outcome)
        for at, p in enumerate(group):
            if p.answer.done():  # the client went away and its request was cancelled
                continue
            if isinstance(outcome, Exception):
                p.answer.set_exception(outcome)
            else:
                p.answer.set_result(outcome[at])


def _outcome(group: list[_Pending]) -> list[Recommendations] | Exception:
    try:
        return group[0].recommender.recommend_many([(p.user_id, p.k) for p in group], [p.explain for p in group],
                                                   [p.policy for p in group])
    except Exception as exc:  # each request of the batch gets the error its own call would have raised
        return exc
