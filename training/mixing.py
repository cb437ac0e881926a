"""Choosing how new items mix with trained ones, on validation (the policies: service/model/mixing.py).

Evaluation keeps each user's best K candidates of each population (`Tops`); a policy only reorders
those two lists, so a search over policies needs no scoring. `choose_policy` tries both families —
calibrated scores (scale, offset) and a fixed share of new items — on a validation task and keeps
the best by Recall@20 + NDCG@20 (the two figures a user of the service feels: how many of the right
items, and how high).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from service.model.mixing import NEW, RAW, TRAINED, Calibrated, Policy, Quota, merge_order
from training.metrics import list_metrics

Merged = tuple[np.ndarray, np.ndarray, np.ndarray]  # hit, is_new, filled: (U, K) bool each


@dataclass(frozen=True)
class Tops:
    """Each user's best K candidates per population, best first (ties broken against the truth)."""

    users: np.ndarray  # (U,)
    scores: np.ndarray  # (U, 2, K) float64 [trained, new], -inf pads a population with fewer candidates
    truth: np.ndarray  # (U, 2, K) bool
    n_truth: np.ndarray  # (U, 2) int: the user's truth in each population

    def head(self, k: int) -> Tops:
        return Tops(self.users, self.scores[:, :, :k], self.truth[:, :, :k], self.n_truth)


def merge(t: Tops, policy: Policy) -> Merged:
    """The merged lists' truth flags, new-item flags and filled slots, as the service would rank them."""
    order, filled = merge_order(policy, t.scores, tiebreak=t.truth)
    K = t.scores.shape[2]
    truth = np.concatenate([t.truth[:, TRAINED], t.truth[:, NEW]], axis=1)  # (U, 2K)
    return np.take_along_axis(truth, order, axis=1) & filled, (order >= K) & filled, filled


def model_policy(model: object) -> Policy:
    policy = getattr(model, "policy", None)
    return policy if policy is not None else RAW


def _value(t: Tops, policy: Policy) -> tuple[float, float]:
    """(Recall@20, NDCG@20) of the merged lists."""
    per_user = list_metrics(*merge(t, policy), t.n_truth, (20,))
    return float(np.nanmean(per_user["recall@20"])), float(np.nanmean(per_user["ndcg@20"]))


def offset_grid(t: Tops, scale: float, points: int = 41) -> np.ndarray:
    """Offsets that move the border between the populations across the top of the lists: quantiles
    of (trained score at rank r) - scale·(new score at rank r) over users, for r in 1, 5, 20."""
    trained, new = t.scores[:, TRAINED], t.scores[:, NEW]
    diffs = [trained[:, r] - scale * new[:, r] for r in (0, 4, 19) if r < trained.shape[1]]
    d = np.concatenate(diffs)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return np.zeros(1)
    return np.unique(np.concatenate([[0.0], np.quantile(d, np.linspace(0.0, 1.0, points))]))


def choose_policy(t: Tops,
                  scales: tuple[float, ...] = (0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6),
                  shares: tuple[float, ...] = tuple(np.round(np.linspace(0.0, 1.0, 21), 2)),
                  ) -> tuple[Policy, list[dict[str, Any]]]:
    """The best policy on a validation task's tops, and the trace of every policy tried."""
    t = t.head(20)  # Recall and NDCG at 20 read only the first 20 of either list, in both policies
    trace: list[dict[str, Any]] = []
    best: tuple[float, Policy] | None = None

    def consider(policy: Policy) -> None:
        nonlocal best
        recall, ndcg = _value(t, policy)
        trace.append({**policy.to_dict(), "recall@20": recall, "ndcg@20": ndcg})
        if best is None or recall + ndcg > best[0]:
            best = (recall + ndcg, policy)

    for scale in scales:
        grid = offset_grid(t, scale)
        for offset in grid:
            consider(Calibrated(scale, float(offset)))
        # refine between the best offset's neighbours
        here = [m for m in trace if m["policy"] == "calibrated" and m["scale"] == scale]
        top = max(here, key=lambda m: m["recall@20"] + m["ndcg@20"])["offset"]
        at = int(np.searchsorted(grid, top))
        lo, hi = grid[max(at - 1, 0)], grid[min(at + 1, grid.size - 1)]
        for offset in np.linspace(lo, hi, 11):
            consider(Calibrated(scale, float(offset)))
    for share in shares:
        consider(Quota(float(share)))
    assert best is not None
    return best[1], trace
