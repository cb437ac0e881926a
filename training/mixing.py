"""Choosing how new items mix with trained ones, on validation (the policies: service/model/mixing.py).

Evaluation keeps each user's best K candidates of each population (`Tops`); a policy only reorders
those two lists, so a search over policies needs no scoring. `choose_policy` tries both families —
calibrated scores (scale, offset) and a fixed share of new items — on a validation task and keeps
the best by Recall@20 + NDCG@20 (the two figures a user of the service feels: how many of the right
items, and how high).

Recall and NDCG read only where the true entries land, so the search places just those (`Placer`):
under a calibrated policy a true trained entry's place is its rank plus the new entries that precede
it, and the other way round. The same hit lists as `merge`, hence the same figures to the last bit;
a few hundred policies per validation pass cost what one full merge costs
(benchmarks/results/production-training.md).
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


def policy_figures(t: Tops, policy: Policy) -> tuple[float, float]:
    """(Recall@20, NDCG@20) of the merged lists."""
    return _figures(merge(t, policy)[0], t.n_truth)


def new_figures(t: Tops) -> tuple[float, float]:
    """(Recall@20, NDCG@20) of each user's new items ranked alone (the cold-only protocol's lists), over
    the users with new truth."""
    n_truth = t.n_truth.copy()
    n_truth[:, TRAINED] = 0
    return _figures(t.truth[:, NEW, :20], n_truth)


def _figures(hit: np.ndarray, n_truth: np.ndarray) -> tuple[float, float]:
    per_user = list_metrics(hit, None, None, n_truth, (20,))
    return float(np.nanmean(per_user["recall@20"])), float(np.nanmean(per_user["ndcg@20"]))


class Placer:
    """`policy_figures` of many policies on one Tops, placing only the true entries (module docstring).

    The count of entries that precede a true one follows `merge_order`'s keys: merged score, then
    truth last, then trained before new. It equals the merged place when each list keeps its order
    under the policy; a user whose list does not (two new scores that rounding makes equal, the true
    one first, or lists not best first) is merged in full instead.
    """

    def __init__(self, t: Tops) -> None:
        self.t = t
        s, truth = t.scores, t.truth  # (U, 2, K)
        K = s.shape[2]
        self.hit = np.zeros((s.shape[0], K), dtype=bool)
        placed = truth & np.isfinite(s)  # what `merge` can place at all
        self.u_trained, self.r_trained = np.nonzero(placed[:, TRAINED])  # the true trained entries
        self.a = s[self.u_trained, TRAINED, self.r_trained][:, None]  # (Ea, 1)
        self.new_of_a = s[self.u_trained, NEW]  # (Ea, K) their user's new list
        self.new_truth_of_a = truth[self.u_trained, NEW]
        self.u_new, self.r_new = np.nonzero(placed[:, NEW])  # the true new entries
        self.b = s[self.u_new, NEW, self.r_new][:, None]  # (Eb, 1)
        self.trained_of_b = s[self.u_new, TRAINED]  # (Eb, K)
        # Where a true entry is followed by a false one of the same list, equal merged scores would
        # swap them; a raw tie is already in merge order, one made by the policy's rounding is not.
        self.u_pair, r_pair = np.nonzero(truth[:, NEW, :-1] & ~truth[:, NEW, 1:])
        self.pair = s[self.u_pair, NEW, r_pair], s[self.u_pair, NEW, r_pair + 1]
        flipped = truth[:, :, :-1] & ~truth[:, :, 1:]
        raw = (s[:, :, 1:] > s[:, :, :-1]) | (s[:, :, 1:] == s[:, :, :-1]) & flipped
        self.unordered = raw.any(axis=(1, 2))  # (U,) lists not best first: always merged in full

    def value(self, policy: Policy) -> tuple[float, float]:
        if isinstance(policy, Quota):  # a few per search, and cheap to merge
            return policy_figures(self.t, policy)
        K = self.hit.shape[1]
        hit = self.hit
        hit[:] = False
        new, a = policy.new_scores(self.new_of_a), self.a  # (Ea, K), (Ea, 1)
        place = self.r_trained + ((new > a) | (new == a) & ~self.new_truth_of_a).sum(axis=1)
        keep = place < K
        hit[self.u_trained[keep], place[keep]] = True
        place = self.r_new + (self.trained_of_b >= policy.new_scores(self.b)).sum(axis=1)
        keep = place < K
        hit[self.u_new[keep], place[keep]] = True
        full = self.unordered.copy()
        full[self.u_pair[policy.new_scores(self.pair[0]) == policy.new_scores(self.pair[1])]] = True
        if full.any():
            rows = np.flatnonzero(full)
            t = self.t
            part = Tops(t.users[rows], t.scores[rows], t.truth[rows], t.n_truth[rows])
            hit[rows] = merge(part, policy)[0]
        return _figures(hit, self.t.n_truth)


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
    placer = Placer(t)
    trace: list[dict[str, Any]] = []
    best: tuple[float, Policy] | None = None

    def consider(policy: Policy) -> None:
        nonlocal best
        recall, ndcg = placer.value(policy)
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
