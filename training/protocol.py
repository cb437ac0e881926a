"""The two evaluation protocols, shared by every model in the harness.

    cold-only   rank the cold items only (as both papers do)
    all-items   rank warm and cold items together, the user's training items removed
                (what the service does); also reports the share of cold items in the top-20

A model is anything with `fit(dataset, split)` and `score(users, candidates)`. `fit` trains on
`split.train` only and may choose its hyper-parameters on the validation items; `score` returns
(B, C) scores of `candidates` for `users`, folded in from their training history.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp

from training.dataset import Dataset
from training.metrics import KS, mean_metrics, rank_top_k_batch, user_metrics
from training.split import ColdStartSplit

USER_BATCH = 512
COLD_SHARE_K = 20


class Recommender(Protocol):
    name: str

    def fit(self, dataset: Dataset, split: ColdStartSplit) -> None: ...

    def score(self, users: np.ndarray, candidates: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Task:
    """Who is ranked, over which candidates, against which truth."""

    users: np.ndarray
    candidates: np.ndarray  # item indices
    truth: sp.csr_matrix  # (U, I)
    exclude: sp.csr_matrix | None = None  # (U, I) items that may not be recommended
    cold: np.ndarray | None = None  # item indices counted for the cold share


def cold_only(split: ColdStartSplit, validation: bool = False) -> Task:
    if validation:
        return Task(split.val_users, split.val_items, split.val_truth)
    return Task(split.test_users, split.cold_items, split.test_truth)


def all_items(split: ColdStartSplit) -> Task:
    candidates = np.union1d(split.warm_items, split.cold_items)
    return Task(split.test_users, candidates, split.test_truth, exclude=split.train, cold=split.cold_items)


def evaluate(model: Recommender, task: Task, ks: Sequence[int] = KS) -> dict[str, float]:
    """Mean metrics over the task's users; `cold_share@20` too when the task marks cold items."""
    k_max = max(max(ks), COLD_SHARE_K)
    cand = task.candidates
    is_cold = np.isin(cand, task.cold) if task.cold is not None else None
    per_user: list[dict[str, float]] = []
    for start in range(0, task.users.size, USER_BATCH):
        users = task.users[start : start + USER_BATCH]
        scores = np.asarray(model.score(users, cand), dtype=np.float64)  # (B, C)
        if scores.shape != (users.size, cand.size):
            raise ValueError(f"{model.name}.score returned {scores.shape}, expected {(users.size, cand.size)}")
        if not np.isfinite(scores).all():
            raise ValueError(f"{model.name}.score returned NaN or infinite scores")
        truth = task.truth[users][:, cand].toarray() > 0  # (B, C)
        if task.exclude is not None:
            excluded = task.exclude[users][:, cand].toarray() > 0
            scores[excluded] = -np.inf
        tops = rank_top_k_batch(scores, truth, k_max)  # (B, k_max)
        for b in range(users.size):
            n_truth = int(truth[b].sum())
            if n_truth == 0:
                continue
            top = tops[b][tops[b] >= 0]
            m = user_metrics(top, truth[b], n_truth, tuple(ks))
            if is_cold is not None:
                m[f"cold_share@{COLD_SHARE_K}"] = float(is_cold[top[:COLD_SHARE_K]].mean())
            per_user.append(m)
    return mean_metrics(per_user)


def select_on_validation(
    make: Callable[[dict[str, Any]], Recommender],
    grid: Iterable[dict[str, Any]],
    dataset: Dataset,
    split: ColdStartSplit,
    criterion: str = "recall@20",
) -> tuple[Recommender, dict[str, Any], list[tuple[dict[str, Any], float]]]:
    """Fit one model per grid point; keep the best by `criterion` on the validation items."""
    task = cold_only(split, validation=True)
    best: tuple[float, Recommender, dict[str, Any]] | None = None
    trace: list[tuple[dict[str, Any], float]] = []
    for params in grid:
        model = make(params)
        model.fit(dataset, split)
        value = evaluate(model, task).get(criterion, 0.0)
        trace.append((params, value))
        if best is None or value > best[0]:
            best = (value, model, params)
    if best is None:
        raise ValueError("empty hyper-parameter grid")
    return best[1], best[2], trace
