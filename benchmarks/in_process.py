"""What benchmarks/serve.py computes in process: benchmark users' index queries."""

from __future__ import annotations

import numpy as np

from service.core.recommender import Recommender

K = 20


def user_queries(recommender: Recommender, users: dict[str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Each user's queries (U, D') folded in from their history: for the trained items and for the new
    items, as /recommend searches them (the shipped model weighs new items apart)."""
    pairs = [recommender.user_query_pair(recommender.history_rows(h)) for h in users.values()]
    return np.concatenate([t for t, _ in pairs]), np.concatenate([n for _, n in pairs])
