"""How a list mixes trained (warm) and new (cold) items: calibration and exposure, chosen on validation.

Two policies, both applied to each user's best candidates of each population (`Tops`):

    Calibrated(scale, offset)   new items' scores mapped to scale·s + offset, then one list by score.
                                With scale > 0 the order inside each population is unchanged, so the
                                merged top-K is made of the two populations' own top lists.
    Quota(share)                a fixed share of new items: slot p (0-based) is new when
                                floor((p+1)·share) > floor(p·share); when one population runs out,
                                the other fills the rest. The service's `cold_share=`.

`choose_mixer` searches both families on a validation task and keeps the best by Recall@20 + NDCG@20
(the two figures a user of the service feels: how many of the right items, and how high). The
service applies the same policies (the chosen one is stored in the manifest).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from training.metrics import list_metrics

WARM, COLD = 0, 1
Merged = tuple[np.ndarray, np.ndarray, np.ndarray]  # hit, is_cold, filled: (U, L) bool each


@dataclass(frozen=True)
class Tops:
    """Each user's best K candidates per population, best first (ties broken against the truth)."""

    users: np.ndarray  # (U,)
    scores: np.ndarray  # (U, 2, K) float64, -inf pads a population with fewer candidates
    truth: np.ndarray  # (U, 2, K) bool
    n_truth: np.ndarray  # (U, 2) int: the user's truth in each population

    def subset(self, rows: np.ndarray) -> Tops:
        return Tops(self.users[rows], self.scores[rows], self.truth[rows], self.n_truth[rows])


class Mixer(Protocol):
    def merge(self, t: Tops) -> Merged: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Calibrated:
    scale: float = 1.0
    offset: float = 0.0

    def merge(self, t: Tops) -> Merged:
        K = t.scores.shape[2]
        scores = np.concatenate([t.scores[:, WARM], self.scale * t.scores[:, COLD] + self.offset], axis=1)
        truth = np.concatenate([t.truth[:, WARM], t.truth[:, COLD]], axis=1)  # (U, 2K)
        cold = np.zeros_like(truth)
        cold[:, K:] = True
        # best score first; among equal scores the non-truth first (a tie never flatters a model)
        order = np.lexsort((truth, -scores), axis=-1)[:, :K]
        return (np.take_along_axis(truth, order, axis=1), np.take_along_axis(cold, order, axis=1),
                np.isfinite(np.take_along_axis(scores, order, axis=1)))

    def describe(self) -> dict[str, Any]:
        return {"policy": "calibrated", **asdict(self)}


@dataclass(frozen=True)
class Quota:
    share: float

    def merge(self, t: Tops) -> Merged:
        K = t.scores.shape[2]
        n = np.isfinite(t.scores).sum(axis=2)  # (U, 2) candidates available per population
        slots = np.arange(1, K + 1)  # p + 1
        wanted = np.floor(slots * self.share + 1e-9).astype(np.int64)[None, :]  # (1, K) new items in p+1 slots
        # clipped so that a population that runs out hands its slots to the other
        cold_count = np.minimum(np.maximum(wanted, slots[None, :] - n[:, WARM:WARM + 1]), n[:, COLD:COLD + 1])
        previous = np.concatenate([np.zeros((n.shape[0], 1), np.int64), cold_count[:, :-1]], axis=1)
        is_cold = cold_count > previous  # (U, K)
        filled = slots[None, :] <= n.sum(axis=1, keepdims=True)
        cold_at = np.clip(cold_count - 1, 0, K - 1)  # index into the cold list of a cold slot
        warm_at = np.clip(slots[None, :] - cold_count - 1, 0, K - 1)
        hit = np.where(is_cold, np.take_along_axis(t.truth[:, COLD], cold_at, axis=1),
                       np.take_along_axis(t.truth[:, WARM], warm_at, axis=1))
        return hit & filled, is_cold & filled, filled

    def describe(self) -> dict[str, Any]:
        return {"policy": "quota", **asdict(self)}


IDENTITY = Calibrated()


def model_mixer(model: object) -> Mixer:
    mixer = getattr(model, "mixer", None)
    return mixer if mixer is not None else IDENTITY


def _value(t: Tops, mixer: Mixer) -> tuple[float, float]:
    """(Recall@20, NDCG@20) of the merged lists."""
    hit, is_cold, filled = mixer.merge(t)
    per_user = list_metrics(hit, is_cold, filled, t.n_truth, (20,))
    return float(np.nanmean(per_user["recall@20"])), float(np.nanmean(per_user["ndcg@20"]))


def offset_grid(t: Tops, scale: float, points: int = 41) -> np.ndarray:
    """Offsets that move the border between the populations across the top of the lists: quantiles
    of (warm score at rank r) - scale·(cold score at rank r) over users, for r in 1, 5, 20."""
    warm, cold = t.scores[:, WARM], t.scores[:, COLD]
    diffs = [warm[:, r] - scale * cold[:, r] for r in (0, 4, 19) if r < warm.shape[1]]
    d = np.concatenate(diffs)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return np.zeros(1)
    return np.unique(np.concatenate([[0.0], np.quantile(d, np.linspace(0.0, 1.0, points))]))


def choose_mixer(t: Tops,
                 scales: tuple[float, ...] = (0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6),
                 shares: tuple[float, ...] = tuple(np.round(np.linspace(0.0, 1.0, 21), 2)),
                 ) -> tuple[Mixer, list[dict[str, Any]]]:
    """The best policy on a validation task's tops, and the trace of every policy tried."""
    # Recall and NDCG at 20 read only the first 20 of either population (in both policies)
    t = Tops(t.users, t.scores[:, :, :20], t.truth[:, :, :20], t.n_truth)
    trace: list[dict[str, Any]] = []
    best: tuple[float, Mixer] | None = None

    def consider(mixer: Mixer) -> None:
        nonlocal best
        recall, ndcg = _value(t, mixer)
        trace.append({**mixer.describe(), "recall@20": recall, "ndcg@20": ndcg})
        if best is None or recall + ndcg > best[0]:
            best = (recall + ndcg, mixer)

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


def mixer_from_dict(d: dict[str, Any]) -> Mixer:
    if d.get("policy") == "quota":
        return Quota(float(d["share"]))
    return Calibrated(float(d.get("scale", 1.0)), float(d.get("offset", 0.0)))
