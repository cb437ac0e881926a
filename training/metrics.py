"""Ranking metrics with the standard definitions (DESIGN.md, "Evaluation protocol").

For one user with held-out truth T and a ranked list r_1, r_2, ...:

    Recall@K = |{r_1..r_K} ∩ T| / min(K, |T|)
    NDCG@K   = DCG@K / IDCG@K,  DCG@K = Σ_{i≤K} [r_i ∈ T] / log2(i + 1),
               IDCG@K = Σ_{i≤min(K,|T|)} 1 / log2(i + 1)
    HR@K     = 1 if any r_i ∈ T for i ≤ K else 0

Averages run over users with |T| ≥ 1; a user with empty truth is skipped, not counted as 0.
Ties in score are broken against the truth: among equal scores the non-truth candidates rank
first, so a model can never gain from a tie (a constant scorer gets 0 unless every candidate is
true). This is a choice; it is the one choice that cannot flatter a model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

KS = (10, 20, 50)
COLD_SHARE_K = 20


def rank_top_k(scores: np.ndarray, is_truth: np.ndarray, k: int) -> np.ndarray:
    """Indices of the top-k of `scores` (1-D), best first, ties broken against the truth."""
    if scores.ndim != 1 or scores.shape != is_truth.shape:
        raise ValueError("scores and is_truth must be 1-D arrays of the same length")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    k = min(k, scores.size)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    # The k-th best score; everything at or above it can be in the top-k.
    kth = np.partition(scores, scores.size - k)[scores.size - k]
    pool = np.flatnonzero(scores >= kth)
    # Primary key: score descending; secondary: non-truth (False) before truth (True).
    order = np.lexsort((is_truth[pool], -scores[pool]))
    return pool[order[:k]]


def rank_top_k_batch(scores: np.ndarray, is_truth: np.ndarray, k: int) -> np.ndarray:
    """Row-wise `rank_top_k` for (B, C) arrays -> (B, k) indices; -inf marks excluded candidates.

    Fast path: top-k, then order the k winners; rows with a tie straddling the k-th place
    (or with fewer than k allowed candidates) go through the exact one-row routine.
    """
    k = min(k, scores.shape[1])
    # torch.topk is several times faster than np.argpartition on (B, C) rows of this size.
    top_values, top_index = torch.topk(torch.from_numpy(np.ascontiguousarray(scores)), k, dim=1)
    part, top_scores = top_index.numpy(), top_values.numpy()  # (B, k), (B, k)
    kth = top_scores.min(axis=1)
    straddle = (scores >= kth[:, None]).sum(axis=1) > k
    short = ~np.isfinite(kth)
    # score desc, then non-truth first, then candidate position: deterministic like rank_top_k.
    order = np.lexsort((part, np.take_along_axis(is_truth, part, axis=1), -top_scores), axis=-1)
    out = np.take_along_axis(part, order, axis=1)
    for b in np.flatnonzero(straddle | short):
        allowed = np.flatnonzero(np.isfinite(scores[b]))
        ranked = allowed[rank_top_k(scores[b, allowed], is_truth[b, allowed], k)]
        out[b] = -1
        out[b, : ranked.size] = ranked
    return out


def user_metrics(top: np.ndarray, is_truth: np.ndarray, n_truth: int, ks: tuple[int, ...] = KS
                 ) -> dict[str, float]:
    """Recall, NDCG and HR at each K for one user, from their ranked top list (length >= max K)."""
    if n_truth <= 0:
        raise ValueError("a user with empty truth has no metrics; skip them")
    top = top[top >= 0]  # -1 pads a list shorter than K
    hits = is_truth[top].astype(np.float64)  # (L,) 1.0 where the i-th ranked item is true
    discounts = 1.0 / np.log2(np.arange(2, hits.size + 2))
    out: dict[str, float] = {}
    for k in ks:
        n_ideal = min(k, n_truth)
        h = hits[:k]
        out[f"recall@{k}"] = float(h.sum() / n_ideal)
        out[f"ndcg@{k}"] = float((h * discounts[: h.size]).sum() / discounts[:n_ideal].sum())
        out[f"hr@{k}"] = float(h.any())
    return out


def list_metrics(hit: np.ndarray, is_cold: np.ndarray | None, filled: np.ndarray | None, n_truth: np.ndarray,
                 ks: Sequence[int] = KS) -> dict[str, np.ndarray]:
    """Per-user metrics of merged lists: overall, and restricted to the cold and the warm truth.

    hit, is_cold (U, L) flags of each ranked slot; filled (U, L) slot holds a candidate; n_truth (U, 2).
    A part's metric is NaN for a user with no truth in that part (left out of its mean). Without
    is_cold and filled, the overall metrics alone.
    """
    L = hit.shape[1]
    discounts = 1.0 / np.log2(np.arange(2, L + 2))  # (L,)
    ideal = np.concatenate([[0.0], np.cumsum(discounts)])  # ideal[n] = IDCG of n hits
    out: dict[str, np.ndarray] = {}
    parts = {"": (hit, n_truth.sum(axis=1))}
    if is_cold is not None:
        parts.update({"cold_": (hit & is_cold, n_truth[:, 1]), "warm_": (hit & ~is_cold, n_truth[:, 0])})
    for prefix, (h, n) in parts.items():
        has = n > 0
        for k in ks:
            n_ideal = np.minimum(k, n)
            hits = h[:, :k].sum(axis=1)
            dcg = (h[:, :k] * discounts[:k]).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[f"{prefix}recall@{k}"] = np.where(has, hits / n_ideal, np.nan)
                out[f"{prefix}ndcg@{k}"] = np.where(has, dcg / ideal[np.minimum(n_ideal, L)], np.nan)
            out[f"{prefix}hr@{k}"] = np.where(has, (hits > 0).astype(np.float64), np.nan)
    if is_cold is None or filled is None:
        return out
    k = COLD_SHARE_K
    n_filled = filled[:, :k].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[f"cold_share@{k}"] = np.where(n_filled > 0, (is_cold[:, :k] & filled[:, :k]).sum(axis=1) / n_filled,
                                          np.nan)
        out["truth_cold_share"] = n_truth[:, 1] / n_truth.sum(axis=1)
    return out


def mean_metrics(per_user: list[dict[str, float]]) -> dict[str, float]:
    if not per_user:
        return {}
    keys = per_user[0].keys()
    return {key: float(np.mean([m[key] for m in per_user])) for key in keys}
