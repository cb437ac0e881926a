"""What benchmarks/serve.py computes in process: benchmark users' index queries."""

from __future__ import annotations

import numpy as np

from service.core.recommender import Recommender

K = 20


def user_queries(recommender: Recommender, users: dict[str, list[str]]) -> np.ndarray:
    """[h; 1] (U, D+1) of each user folded in from their history."""
    return np.concatenate([recommender.user_query(recommender.history_rows(h)) for h in users.values()])
