"""The evaluation protocols, shared by every model in the harness (DESIGN.md, "Evaluation protocol").

    hybrid      rank warm and cold items together, the user's history removed; the truth is the
                user's held-out warm interactions plus all their cold-item interactions. What a user
                of the service gets. Reported overall and split into its cold and warm parts.
    cold-only   rank the cold items only (both papers' protocol)

A model is anything with `fit(dataset, split)` and `score(users, candidates, history)`: `fit` trains
on `split.train` only and chooses its hyper-parameters and calibration on the validation tasks;
`score` returns (B, C) scores of `candidates` for `users` folded in from the rows of `history`
(-inf: the model cannot rank that candidate). A model may carry a `policy` (training/mixing.py), the
policy that merges its warm and cold candidates, chosen on validation; the default merges by score.

Evaluation keeps, per user, the best `K_MAX` candidates of each population (warm, cold) with their
truth flags (`Tops`). Any mixing policy only reorders those two lists, so calibration and exposure
are searched on them without scoring again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.sparse as sp

from service.model.mixing import Policy
from training.dataset import Dataset
from training.metrics import KS, list_metrics, rank_top_k_batch
from training.mixing import Tops, merge, model_policy
from training.split import ColdStartSplit

USER_BATCH = 512
K_MAX = max(KS)


class Recommender(Protocol):
    name: str

    def fit(self, dataset: Dataset, split: ColdStartSplit) -> None: ...

    def score(self, users: np.ndarray, candidates: np.ndarray, history: sp.csr_matrix) -> np.ndarray: ...


@dataclass(frozen=True)
class Task:
    """Who is ranked, over which candidates, against which truth, folded in from which history."""

    users: np.ndarray
    candidates: np.ndarray  # item indices
    cold: np.ndarray  # (C,) bool: candidate is a new (cold) item
    truth: sp.csr_matrix  # (U, I)
    history: sp.csr_matrix  # (U, I) what users are folded in from; never recommended back

    @property
    def mixed(self) -> bool:
        return bool(self.cold.any() and not self.cold.all())


def _task(candidates: np.ndarray, cold_items: np.ndarray, truth: sp.csr_matrix, history: sp.csr_matrix) -> Task:
    truth = sp.csr_matrix(truth)
    truth.eliminate_zeros()
    users = np.flatnonzero(truth.getnnz(axis=1) > 0)
    return Task(users, candidates, np.isin(candidates, cold_items), truth, sp.csr_matrix(history))


def hybrid(split: ColdStartSplit, validation: bool = False) -> Task:
    """Warm and cold ranked together; truth = warm holdout ∪ cold interactions."""
    if validation:
        return _task(np.union1d(split.warm_items, split.val_items), split.val_items,
                     split.val_warm_truth + split.val_truth, split.train)
    return _task(np.union1d(split.warm_items, split.cold_items), split.cold_items,
                 split.test_warm_truth + split.test_truth, split.history)


def cold_only(split: ColdStartSplit, validation: bool = False) -> Task:
    if validation:
        return _task(split.val_items, split.val_items, split.val_truth, split.train)
    return _task(split.cold_items, split.cold_items, split.test_truth, split.history)


def warm_only(split: ColdStartSplit, validation: bool = False) -> Task:
    """Rank the warm items for the warm holdout (a diagnostic of the warm recommender alone)."""
    truth = split.val_warm_truth if validation else split.test_warm_truth
    return _task(split.warm_items, np.empty(0, np.int64), truth, split.train if validation else split.history)


def tops(model: Recommender, task: Task, k: int = K_MAX) -> Tops:
    return tops_many(lambda users: [model.score(users, task.candidates, task.history)], 1, task, model.name, k)[0]


def tops_many(score: Callable[[np.ndarray], Iterable[np.ndarray]], n: int, task: Task, name: str, k: int = K_MAX
              ) -> list[Tops]:
    """`Tops` of n scorings of the task at once: `score(users)` gives each scoring's (B, C) scores of a
    batch of users, in turn (an iterator may reuse one buffer: each is read before the next is asked
    for). A search over many mixes of the same scores (training/collaborative_fit.py) reads each
    batch's truth and history once and never holds (U, C) scores."""
    cand = task.candidates
    columns = (np.flatnonzero(~task.cold), np.flatnonzero(task.cold))
    n_users = task.users.size
    out = [Tops(task.users, np.full((n_users, 2, k), -np.inf), np.zeros((n_users, 2, k), dtype=bool),
                np.zeros((n_users, 2), dtype=np.int64)) for _ in range(n)]
    for start in range(0, n_users, USER_BATCH):
        users = task.users[start : start + USER_BATCH]
        t = task.truth[users][:, cand].toarray() > 0  # (B, C)
        seen = task.history[users][:, cand].toarray() > 0
        rows = slice(start, start + users.size)
        given = 0
        for i, s in enumerate(score(users)):
            given += 1
            if i >= n:
                break
            s = np.asarray(s, dtype=np.float64)  # (B, C)
            if s.shape != (users.size, cand.size):
                raise ValueError(f"{name}.score returned {s.shape}, expected {(users.size, cand.size)}")
            if np.isnan(s).any() or (s == np.inf).any():
                raise ValueError(f"{name}.score returned NaN or +inf scores")
            s[seen] = -np.inf
            for population, cols in enumerate(columns):
                if cols.size == 0:
                    continue
                # np.take keeps rows contiguous; s[:, cols] is column-major, and every step after it pays
                ps, pt = np.take(s, cols, axis=1), np.take(t, cols, axis=1)
                out[i].n_truth[rows, population] = pt.sum(axis=1)
                kk = min(k, cols.size)
                top = rank_top_k_batch(ps, pt, kk)  # (B, kk), -1 pads
                valid = top >= 0
                safe = np.maximum(top, 0)
                out[i].scores[rows, population, :kk] = np.where(valid, np.take_along_axis(ps, safe, axis=1), -np.inf)
                out[i].truth[rows, population, :kk] = valid & np.take_along_axis(pt, safe, axis=1)
        if given != n:
            raise ValueError(f"{name}: {'more than ' if given > n else ''}{min(given, n)} scorings, expected {n}")
    return out


def mean_metrics(per_user: dict[str, np.ndarray], mixed: bool) -> dict[str, float]:
    """Means over the users who have truth in each part; parts and shares only for mixed tasks."""
    parts = ("cold_", "warm_", "truth_")
    return {key: float(np.nanmean(v)) for key, v in per_user.items()
            if (mixed or not key.startswith(parts)) and np.isfinite(v).any()}


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    per_user: dict[str, np.ndarray]
    users: np.ndarray


def evaluate_tops(t: Tops, policy: Policy, mixed: bool, ks: Sequence[int] = KS) -> Evaluation:
    hit, is_cold, filled = merge(t, policy)
    per_user = list_metrics(hit, is_cold, filled, t.n_truth, ks)
    return Evaluation(mean_metrics(per_user, mixed), per_user, t.users)


def evaluate(model: Recommender, task: Task, ks: Sequence[int] = KS) -> dict[str, float]:
    """Mean metrics over the task's users, under the model's own mixing policy."""
    return evaluate_full(model, task, ks).metrics


def evaluate_full(model: Recommender, task: Task, ks: Sequence[int] = KS) -> Evaluation:
    return evaluate_tops(tops(model, task), model_policy(model), task.mixed, ks)
