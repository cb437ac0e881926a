"""Server-side compute without HTTP, one thread, for benchmarks/serve.py: what a request costs the
recommender alone, alone or in a batch, and the index search alone."""

from __future__ import annotations

import time

import numpy as np

from service.core.recommender import Recommender
from service.index import VectorIndex

K = 20


def user_queries(recommender: Recommender, users: dict[str, list[str]]) -> np.ndarray:
    """[h; 1] (U, D+1) of each user folded in from their history."""
    return np.concatenate([recommender.user_query(recommender.history_rows(h)) for h in users.values()])


def recommend_alone(recommender: Recommender, users: list[str], n: int) -> dict[str, float]:
    """recommender.recommend(), one request at a time (the first 10 are warm-up)."""
    times = []
    for j in range(n):
        t0 = time.perf_counter()
        recommender.recommend(users[j % len(users)], K)
        times.append(time.perf_counter() - t0)
    return {**_percentiles(times[10:]), "mean_ms": round(float(np.mean(times[10:])) * 1e3, 3)}


def recommend_batched(recommender: Recommender, users: list[str], batch: int, rounds: int) -> dict[str, float]:
    """recommender.recommend_many() for `batch` users at a time, as the request batcher calls it:
    milliseconds per user (the batch's time / batch; the first 2 rounds are warm-up)."""
    per_user = []
    for j in range(rounds):
        chosen = [(users[(j * batch + b) % len(users)], K) for b in range(batch)]
        t0 = time.perf_counter()
        recommender.recommend_many(chosen)
        per_user.append((time.perf_counter() - t0) / batch)
    a = np.asarray(per_user[2:]) * 1e3
    return {"batch": batch, "p50_ms_per_user": round(float(np.percentile(a, 50)), 3),
            "mean_ms_per_user": round(float(a.mean()), 3)}


def search_alone(recommender: Recommender, index: VectorIndex, users: dict[str, list[str]]) -> dict[str, float]:
    """index.search alone for the users' real queries (history excluded), one at a time."""
    q = user_queries(recommender, users)
    seen = [set(h) for h in users.values()]
    times = []
    for j in range(len(q)):
        t0 = time.perf_counter()
        index.search(q[j : j + 1], K, exclude=[seen[j]])
        times.append(time.perf_counter() - t0)
    return _percentiles(times)


def _percentiles(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3)}
